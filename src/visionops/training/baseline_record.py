"""The `baseline` stage's record, `baseline.json`, for every task: the distillation student trained alone,
which `distill` reads to report what distillation gained (the task trains and scores the student)."""

from __future__ import annotations

import json
from pathlib import Path

from visionops import atomic, measured
from visionops.config import DistillConfig
from visionops.errors import VisionopsError
from visionops.evaluation import plots

RESULT = "baseline.json"
CHECKPOINT = "student_alone.pt"


class BaselineMismatchError(VisionopsError):
    """baseline.json is missing, or was made for another student or settings than distill's."""


def write_skipped(reports_dir: Path, student: str) -> dict:
    """The record of `distill.baseline: false`: nothing trained (and no stale plot or timings left beside it)."""
    result = {"skipped": True, "reason": "distill.baseline is false", "student": student}
    for stale in ("history.png", measured.MEASURED_FILE):
        (Path(reports_dir) / stale).unlink(missing_ok=True)
    atomic.write_json(Path(reports_dir) / RESULT, result)
    return result


def write_result(reports_dir: Path, result: dict, history: list[dict]) -> None:
    """baseline.json (`result` without its timings, then the per-epoch `history`), history.png and measured.json."""
    reports_dir = Path(reports_dir)
    plots.training_curves(history, reports_dir / "history.png", f"student alone: {result['student']}")
    atomic.write_json(reports_dir / RESULT, {**measured.pure(result), "history": history})
    measured.write(reports_dir, result)


def read_baseline(path: Path | None, cfg: DistillConfig) -> dict | None:
    """The baseline result for `cfg` (None with distill.baseline false); a missing or mismatched file is an error."""
    if not cfg.baseline:
        return None
    if path is None or not Path(path).is_file():
        raise BaselineMismatchError(f"{path}: no baseline result; run `visionops baseline` (or `dvc repro`) first")
    result = json.loads(Path(path).read_text())
    if result.get("skipped") or result.get("student") != cfg.student:
        raise BaselineMismatchError(
            f"{path}: the baseline is for student {result.get('student')!r} (skipped: {bool(result.get('skipped'))}), "
            f"distill has {cfg.student!r} with distill.baseline true; run `visionops baseline` again"
        )
    return result
