"""Where each stage reads and writes, relative to the project root (dvc.yaml uses the same paths)."""

from pathlib import Path

DATASET = Path("data/dataset")
HOLDOUT = Path("data/holdout")  # frozen split for promotion and monitoring only (one split: "holdout")
IMPORTS = Path("data/imports.csv")  # the files `import-labels` added to data.root; download depends on it
PREPARED = Path("data/prepared")
REPORTS = Path("reports")
VALIDATE_REPORTS = REPORTS / "validate"
LABEL_ISSUES_REPORTS = REPORTS / "label_issues"
PREPARE_REPORTS = REPORTS / "prepare"
PRETRAIN_REPORTS = REPORTS / "pretrain"
MODELS = Path("models")
TEACHER = MODELS / "teacher.pt"
STUDENT = MODELS / "student.pt"
BACKBONE = MODELS / "backbone.pt"  # stage pretrain's encoder (a stub when pretrain.enabled is false)
CHECKPOINTS = MODELS / "checkpoints"
TRAIN_REPORTS = REPORTS / "train"
EVALUATE_REPORTS = REPORTS / "evaluate"
BASELINE_REPORTS = REPORTS / "baseline"
DISTILL_REPORTS = REPORTS / "distill"
