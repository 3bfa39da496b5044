"""dvc.yaml says what DVC shows: committed metrics and plot data, exactly the declared plots, no file in git
under reports/ that no stage writes, and a baseline stage that depends on the student's settings and not on
the teacher."""

import subprocess
from pathlib import Path

import yaml

from visionops.config import DistillConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _entries(stage: dict, key: str) -> dict[str, dict]:
    return {next(iter(e)) if isinstance(e, dict) else e: next(iter(e.values())) if isinstance(e, dict) else {} for e in stage.get(key, [])}


def test_metrics_and_plot_data_are_committed_not_cached():
    """Metrics and plot files are `cache: false` (git keeps them); every stage plot has the properties it is
    drawn with (no auto-plot); no plain out is `cache: false`, which would stop DVC's run cache for its stage."""
    uncached = set()
    for name, stage in DVC["stages"].items():
        for path, opts in _entries(stage, "outs").items():
            assert opts.get("cache", True), f"{name}: {path}: a plain cache: false out disables the run cache"
        for key in ("metrics", "plots"):
            for path, opts in _entries(stage, key).items():
                assert opts.get("cache") is False, path
                uncached.add(path)
        for path, opts in _entries(stage, "plots").items():
            # images (one, or a directory of the task's figures) draw themselves; data plots need their properties
            assert path.endswith((".png", "/figures")) or {"template", "x", "y", "title"} <= set(opts), path
    plot_files = set()
    for plot in DVC["plots"]:
        (props,) = plot.values()
        plot_files |= set(props["y"])
    assert plot_files <= uncached  # every declared plot's data is in git, for `dvc plots diff` in any clone
    # .gitignore keeps exactly those files of reports/ in git
    candidates = sorted(uncached | {p for s in DVC["stages"].values() for p in _entries(s, "outs") if p.startswith("reports/")})
    as_file = {p: f"{p}/figure.png" if p.endswith("/figures") else p for p in candidates}  # a directory: one of its images
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *as_file.values()], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    assert {p for p, f in as_file.items() if f not in ignored} == uncached


def test_baseline_depends_on_the_student_settings_only():
    """Every train setting the student uses (all but model, epochs, steps and lr, which distill sets, and the
    teacher's progressive resizing and starting point), and distill's student, epochs, steps, lr, baseline and
    init: not distill's KD settings. The teacher's file, which the student starts from with distill.init: teacher."""
    baseline = DVC["stages"]["baseline"]
    teacher_only = {"train.model", "train.epochs", "train.steps", "train.lr", "train.progressive_start",
                    "train.progressive_epochs", "train.init", "train.freeze_epochs", "train.backbone_lr_scale"}
    want = {f"train.{k}" for k in TrainConfig.model_fields} - teacher_only
    want |= {f"distill.{k}" for k in ("student", "epochs", "steps", "lr", "baseline", "init")}
    assert set(baseline["params"]) == want | {"task", "detection"}  # detection: the student's prediction rule
    assert {p.split(".")[1] for p in want if p.startswith("distill.")} <= set(DistillConfig.model_fields)
    assert "models/teacher.pt" in baseline["deps"]
    assert "reports/baseline/baseline.json" in DVC["stages"]["distill"]["deps"]


def test_every_file_in_git_under_reports_is_written_by_a_stage():
    """Each is a declared out, metric or plot of a stage, or in a declared directory (evaluate's figures) one
    the committed task's evaluate writes there: a stale file would be drawn by `dvc plots show` and uploaded
    to MLflow beside the real ones."""
    from visionops.tasks.classification.evaluate import OUTPUTS

    declared = {p for stage in DVC["stages"].values() for key in ("outs", "metrics", "plots") for p in _entries(stage, key)}
    tracked = subprocess.run(["git", "ls-files", "reports"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked
    in_dirs = {f for f in tracked if f not in declared}
    assert {f for f in in_dirs if not any(f.startswith(f"{d}/") for d in declared)} == set()
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["task"] == "classification"  # the reports in git are its
    assert in_dirs - {f"reports/evaluate/{name}" for name in OUTPUTS} == set()
