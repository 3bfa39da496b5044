"""Machine-dependent figures (timings, speeds) are kept out of the files DVC hashes.

A stage's result carries them: the CLI prints them and MLflow logs them. The files DVC hashes must be
pure functions of their deps and params, so a stage writes its measured figures to `measured.json`
beside its reports, a file no dvc.yaml entry names. The rest of its result goes to `details.json`, and
a few headline numbers of it to `metrics.json`, the stage's DVC metrics (`write_reports`).
"""

from __future__ import annotations

from pathlib import Path

from visionops.atomic import write_json

MEASURED_SUFFIXES = ("_seconds", "_ms", "_per_second", "speedup")
MEASURED_FILE = "measured.json"


def is_measured(key: str) -> bool:
    """Whether `key` names a timing or a speed (by its suffix: seconds, ms, per_second, speedup)."""
    return key == "seconds" or key.endswith(MEASURED_SUFFIXES)


def pure(row: dict) -> dict:
    """`row` without its measured figures: what may go into a file DVC hashes."""
    return {k: v for k, v in row.items() if not is_measured(k)}


def write(reports_dir: Path | str, result: dict, **extra: object) -> None:
    """The measured figures of `result` (and `extra`) as reports_dir/measured.json."""
    write_json(Path(reports_dir) / MEASURED_FILE, {**{k: v for k, v in result.items() if is_measured(k)}, **extra})


def write_reports(reports_dir: Path | str, result: dict, headline: tuple[str, ...]) -> None:
    """details.json (`result` without its timings), metrics.json (its `headline` keys: the DVC metrics,
    kept to a few numbers so that `dvc metrics show` fits a terminal) and measured.json (the timings)."""
    reports_dir = Path(reports_dir)
    write_json(reports_dir / "details.json", pure(result))
    write_json(reports_dir / "metrics.json", {k: result[k] for k in headline})
    write(reports_dir, result)
