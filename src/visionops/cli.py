"""The `visionops` command: one subcommand per pipeline stage (what dvc.yaml calls).

Only the standard library is imported at module level so that `visionops --help` answers fast;
each subcommand imports its stage (and torch, GX, ...) when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visionops import layout

STAGES = {}


def stage(name: str, help: str, description: str):
    """Register a subcommand; `fn(params, args)` runs it after params.yaml is validated."""

    def wrap(fn):
        STAGES[name] = (fn, help, description)
        return fn

    return wrap


@stage(
    "check",
    "validate params.yaml and exit",
    "Load params.yaml through the typed schema and report the first problem, naming the key. "
    "Every stage does this before any work; run it alone to check an edit.",
)
def _check(params, args) -> dict:
    return params.model_dump(by_alias=True)


@stage(
    "download",
    "fetch the data source and write the canonical dataset",
    "Read data.source (digits: embedded, no network; cifar10: the official archive from data.url, "
    "MD5-verified, retried; folder: an ImageFolder tree at data.root), resize to data.image_size and "
    "data.channels, carve stratified, seeded train/val/test splits and write them (uint8 NHWC arrays, "
    f"labels, manifests) atomically to {layout.DATASET}/.",
)
def _download(params, args) -> dict:
    from visionops.stages.download import run_download

    return run_download(params.data, layout.DATASET)


@stage(
    "validate",
    "check the dataset with Great Expectations",
    "Build a per-image manifest and run an expectation suite on it: labels in the class set, consistent "
    "shapes, no unreadable files, no empty class, no exact duplicates across splits, pixel statistics in "
    f"range. Critical failures exit non-zero naming the files; imbalance above validate.max_imbalance_ratio "
    f"is a warning. Writes summary.json, manifest.csv, class_counts.csv and data_docs/ to {layout.VALIDATE_REPORTS}/.",
)
def _validate(params, args) -> dict:
    from visionops.stages.validate import run_validate

    return run_validate(layout.DATASET, params.validate_, layout.VALIDATE_REPORTS)


@stage(
    "prepare",
    "apply the class-balance strategy and record the augmentation policy",
    "Apply balance.simulate_imbalance_factor and balance.strategy (none, oversample, undersample, "
    "class_weights, logit_adjust) to the train split, record the augmentation policy for training, and "
    f"plot the class distribution before and after. Writes {layout.PREPARED}/ and {layout.PREPARE_REPORTS}/.",
)
def _prepare(params, args) -> dict:
    from visionops.stages.prepare import run_prepare

    return run_prepare(layout.DATASET, params.balance, params.augment, layout.PREPARED, layout.PREPARE_REPORTS)


@stage(
    "train",
    "train the teacher model (GPU when there is one)",
    "Train train.model on the prepared train split with the augmentation policy applied on the fly, "
    "early-stopped on val. Uses cuda, then mps, then cpu (train.device); bf16 autocast, channels_last and "
    "optional torch.compile on CUDA. A checkpoint is written every epoch: rerunning after a crash resumes. "
    "For several GPUs: torchrun --nproc_per_node N -m visionops train. "
    f"Writes {layout.TEACHER} and {layout.TRAIN_REPORTS}/ (metrics.json, history.csv, history.png).",
)
def _train(params, args) -> dict:
    from visionops.stages.train import recorded_augment, run_train

    return run_train(
        layout.DATASET,
        layout.PREPARED,
        params.train,
        recorded_augment(layout.PREPARED),
        layout.TEACHER,
        layout.TRAIN_REPORTS,
        layout.CHECKPOINTS / "train.pt",
    )


@stage(
    "evaluate",
    "measure the teacher on the test split, with calibration and Grad-CAM explanations",
    "Accuracy, balanced accuracy, macro-F1, top-k and per-class precision/recall/F1; a confusion matrix; "
    "ECE and a reliability diagram before and after temperature scaling fitted on val; latency, throughput, "
    "parameters and size on the current device; Grad-CAM overlays of right and wrong predictions and a "
    f"gallery of mistakes; all tied together in report.md. Writes {layout.EVALUATE_REPORTS}/.",
)
def _evaluate(params, args) -> dict:
    from visionops.stages.evaluate import run_evaluate

    return run_evaluate(
        layout.DATASET,
        layout.TEACHER,
        params.evaluate,
        layout.EVALUATE_REPORTS,
        params.train.eval_batch_size,
        params.train.device,
    )


@stage(
    "distill",
    "distill a small student from the trained teacher, export it to ONNX and int8",
    "Train distill.student with Hinton knowledge distillation from the teacher (temperature, alpha; KL "
    "term scaled by T^2) under the same augmentation, and (distill.baseline) the same student alone to show "
    "what distillation gained. Compares teacher and student on the test split (accuracy, parameters, size, "
    "CPU latency), exports the student to ONNX with an ONNX Runtime parity check, and (distill.quantize) "
    f"int8-quantizes it. Writes {layout.STUDENT} and {layout.DISTILL_REPORTS}/.",
)
def _distill(params, args) -> dict:
    from visionops.stages.distill import run_distill
    from visionops.stages.train import recorded_augment

    return run_distill(
        layout.DATASET,
        layout.PREPARED,
        layout.TEACHER,
        params.distill,
        params.train,
        recorded_augment(layout.PREPARED),
        layout.STUDENT,
        layout.DISTILL_REPORTS,
        layout.CHECKPOINTS,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionops",
        description="Train, check and ship image classifiers reproducibly. Each subcommand is one stage "
        "of the DVC pipeline (dvc.yaml); `dvc repro` runs them in order.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_, description) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file (default: %(default)s)")
    return parser


def _version() -> str:
    from visionops import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from visionops.errors import USER_ERRORS

    fn = STAGES[args.command][0]
    try:
        from visionops.config import load_params

        result = fn(load_params(args.params), args)
    except USER_ERRORS as exc:
        print(f"visionops {args.command}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
