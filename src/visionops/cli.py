"""The `visionops` command: one subcommand per pipeline stage (what dvc.yaml calls).

Only the standard library is imported at module level so that `visionops --help` answers fast;
each subcommand imports its stage (and torch, GX, ...) when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visionops import layout

COMMANDS: dict[str, Command] = {}


@dataclass
class Command:
    fn: Callable  # fn(params, args, run) -> result dict; `run` is the MLflow StageRun (or BackgroundRun) or None
    help: str
    description: str
    sections: tuple[str, ...] = ()  # params sections a pipeline stage reads (tracked when non-empty)
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    tracked_in_process: bool = False  # the stage logs epochs or models; else a helper process keeps its run
    up_to_date: Callable | None = None  # up_to_date(params) -> result dict when there is nothing to do, else None


def command(
    name: str, help: str, description: str, sections: tuple[str, ...] = (), arguments=None, tracked_in_process=False,
    up_to_date=None,
):
    """Register a subcommand; it runs after params.yaml is validated (inside an MLflow run if `sections`),
    unless `up_to_date` finds, cheaply and before any run opens, that there is nothing to do."""

    def wrap(fn):
        COMMANDS[name] = Command(fn, help, description, sections, arguments, tracked_in_process, up_to_date)
        return fn

    return wrap


def _task(params):
    """The configured task (params.yaml `task`): it supplies every stage's work."""
    from visionops.tasks import get_task

    return get_task(params.task)


def _finish(run, result: dict, reports_dir: Path) -> dict:
    if run is not None:
        run.log_result(result, reports_dir)
    return result


@command(
    "check",
    "validate params.yaml and exit",
    "Load params.yaml through the typed schema and report the first problem, naming the key. "
    "Every stage does this before any work; run it alone to check an edit.",
)
def _check(params, args, run) -> dict:
    return params.model_dump(by_alias=True)


@command(
    "download",
    "fetch the data source and write the canonical dataset",
    "Read data.source, resize to data.image_size (data.resize: squash or letterbox) and data.channels, and "
    "assign each image to holdout, val, test or train by a seeded hash of its file's bytes or source pixels "
    "(adding images or changing the size or channels never moves one; duplicates, and for files near duplicates "
    "within data.near_duplicate_max_distance bits of perceptual hash (data.near_duplicate_hash), stay together). "
    "Classification: digits (embedded, no network), cifar10 (the official archive from data.url, MD5-verified, "
    "retried) or folder (an ImageFolder tree at data.root). Detection: canvases (embedded digits composed on "
    "larger images, written as COCO and read back), coco, voc or yolo at data.root. Segmentation: canvases "
    "(written as PNG masks), coco (polygons or RLE) or masks (PNG index masks beside the images). Writes "
    f"train/val/test (uint8 NHWC arrays, labels or boxes or masks, manifests) to {layout.DATASET}/ and the frozen "
    f"holdout to {layout.HOLDOUT}/, atomically. A path that leads outside data.root is refused by name unless "
    "data.allowed_roots lists its folder; a source file whose bytes changed under the same name since the last "
    "download fails it, naming the file (data.on_changed_file), and added or removed files are listed.",
    sections=("data",),
)
def _download(params, args, run) -> dict:
    result = _task(params).download(params, layout.DATASET, layout.HOLDOUT)
    return _finish(run, result, None)


@command(
    "validate",
    "check the dataset with Great Expectations",
    "Build a per-image manifest (and, for detection and segmentation, a per-object one) and run an expectation "
    "suite on it: labels in the class set, consistent shapes, no unreadable files, no exact duplicates across "
    "splits, pixel statistics in range; boxes inside their image with positive area; masks of their image's "
    "size with values in the class set; images without objects counted. Critical failures exit non-zero "
    "naming the files (and objects); imbalance above validate.max_imbalance_ratio (segmentation: train pixels "
    "above validate.max_pixel_imbalance_ratio too) is a warning, and so are duplicates whose labels differ "
    "unless validate.on_label_conflict is error. Writes "
    f"summary.json, manifest.csv, class_counts.csv and data_docs/ to {layout.VALIDATE_REPORTS}/.",
    sections=("validate",),
)
def _validate(params, args, run) -> dict:
    from visionops.errors import ValidationFailed

    try:
        result = _task(params).validate(params, layout.DATASET, layout.VALIDATE_REPORTS)
    except ValidationFailed as exc:
        _finish(run, {"success": 0}, layout.VALIDATE_REPORTS)  # the failing run keeps its reports
        raise exc
    return _finish(run, result, layout.VALIDATE_REPORTS)


@command(
    "label_issues",
    "list the train images whose labels are likely wrong (confident learning)",
    "Classification: cross-train label_issues.model on label_issues.folds stratified folds of the train split, so "
    "that every image gets predicted probabilities from a model that never saw its label, and hand them to "
    "cleanlab's confident learning (label_issues.filter_by). Writes issues.csv (rank, train index, path as in the "
    "manifest, given and suggested class, label quality: the out-of-fold probability of the given class), "
    f"gallery.png of the worst, details.json and metrics.json to {layout.LABEL_ISSUES_REPORTS}/; "
    "balance.drop_label_issues makes prepare leave them out of training. Detection and segmentation list no image "
    "yet, and say why in one line.",
    sections=("label_issues", "augment"),
)
def _label_issues(params, args, run) -> dict:
    result = _task(params).label_issues(params, layout.DATASET, layout.LABEL_ISSUES_REPORTS)
    return _finish(run, result, layout.LABEL_ISSUES_REPORTS)


@command(
    "prepare",
    "apply the class-balance strategy and record the augmentation policy",
    "Apply balance.strategy to the train split (classification: none, oversample, undersample, class_weights, "
    "logit_adjust, after balance.simulate_imbalance_factor; detection: repeat_factor sampling as in LVIS; "
    "segmentation: class_weights, per-pixel weights from class frequencies), leave out the train images label_issues "
    "listed when balance.drop_label_issues is set, record the augmentation policy "
    f"for training, and count the class distribution before and after. Writes {layout.PREPARED}/ and "
    f"{layout.PREPARE_REPORTS}/.",
    sections=("balance", "augment"),
)
def _prepare(params, args, run) -> dict:
    result = _task(params).prepare(params, layout.DATASET, layout.PREPARED, layout.PREPARE_REPORTS)
    return _finish(run, result, layout.PREPARE_REPORTS)


def _pretrain_disabled(params) -> dict | None:
    """With pretrain.enabled false: the stub backbone written (no MLflow run opens), else None."""
    if params.pretrain.enabled:
        return None
    from visionops.training.pretrain import run_pretrain

    return run_pretrain(params, layout.DATASET, layout.BACKBONE, layout.PRETRAIN_REPORTS, None)


@command(
    "pretrain",
    "pretrain train.model's encoder on unlabelled images (SimSiam), when pretrain.enabled",
    "SimSiam (Chen & He, CVPR 2021): train train.model's encoder, without labels, to map two strong views of an "
    "image (random resized crop, flip, colour jitter, greyscale, blur; pretrain.*) to the same point, on every "
    "train image (those data.label_fraction leaves unlabelled too) and the images under pretrain.unlabelled_root "
    "(inside data.root or data.allowed_roots). Logs each epoch's loss and output_std (about 1 while the outputs "
    "spread, 0 when they collapse); resumes from its checkpoint after a crash. For classification it scores a kNN "
    "probe on val against the same encoder untrained (knn_acc, knn_acc_random_init). Writes "
    f"{layout.BACKBONE} (the encoder under canonical names, for train.init: pretrain) and "
    f"{layout.PRETRAIN_REPORTS}/details.json, and registers the file as mlflow.backbone_model_name. With "
    "pretrain.enabled false it writes a stub backbone saying so, trains nothing and opens no MLflow run.",
    sections=("pretrain",),
    tracked_in_process=True,
    up_to_date=_pretrain_disabled,
)
def _pretrain(params, args, run) -> dict:
    from visionops.training.pretrain import register, run_pretrain

    result = run_pretrain(params, layout.DATASET, layout.BACKBONE, layout.PRETRAIN_REPORTS,
                          layout.CHECKPOINTS / "pretrain.pt", on_epoch=run.log_epoch if run else None)
    if run is not None:
        result["registered"] = register(layout.BACKBONE, params.mlflow.backbone_model_name, run.lineage_tags)
    return _finish(run, result, layout.PRETRAIN_REPORTS)


@command(
    "resolve_init",
    "resolve train.init to what it names now (a registered alias to its version)",
    "Write models/init.json: train.init, and for models:/<name>@<alias> or models:/<name>/<version> the version "
    "it resolves to now, its run id and file MD5; for a model file's path, the file's MD5. The file is rewritten "
    "only when that changes, and train depends on it: DVC cannot see the registry, so this stage runs on every "
    "`dvc repro` (always_changed), and train reruns exactly when the starting point moved (e.g. @champion).",
)
def _resolve_init(params, args, run) -> dict:
    from visionops.training.resolve_init import write_resolved

    return write_resolved(params.train.init, params.mlflow, params.data.root)


@command(
    "train",
    "train the teacher model (GPU when there is one)",
    "Train train.model on the prepared train split with the augmentation policy applied on the fly, "
    "early-stopped on val. Uses cuda, then mps, then cpu (train.device); bf16 autocast and channels_last "
    "(train.amp, train.channels_last: on CUDA, or `always` for the CPU too) and "
    "optional torch.compile on CUDA. A checkpoint is written every epoch: rerunning after a crash resumes. "
    "For several GPUs: torchrun --nproc_per_node N -m visionops train. "
    "train.init picks the starting weights (scratch, imagenet, pretrain, models:/<name>@<alias>, a model file); "
    "what was loaded, new or skipped is printed and recorded in details.json and the MLflow run. "
    "At the end it stores the served rule in the model file (classification: the test-time augmentation "
    "train.tta that selected it and the temperature fitted on val; detection: the NMS thresholds). "
    f"Writes {layout.TEACHER} and {layout.TRAIN_REPORTS}/ (metrics.json, history.csv); "
    "`visionops register` registers it.",
    sections=("train", "augment", "detection"),
    tracked_in_process=True,
)
def _train(params, args, run) -> dict:
    result = _task(params).train(
        params,
        layout.DATASET,
        layout.PREPARED,
        layout.TEACHER,
        layout.TRAIN_REPORTS,
        layout.CHECKPOINTS / "train.pt",
        on_epoch=run.log_epoch if run else None,
    )
    if run is not None:  # None when tracking is off, and on every DDP rank but 0
        run.log_init(result["init"])
        _finish(run, result, layout.TRAIN_REPORTS)
    return result


@command(
    "evaluate",
    "measure the teacher on the test split, with figures and explanations",
    "Classification: accuracy, balanced accuracy, macro-F1, top-k and per-class precision/recall/F1, a confusion "
    "matrix, ECE and reliability before and after the model's temperature, Grad-CAM overlays and a gallery of "
    "mistakes. Detection: COCO mAP@[.5:.95], mAP@.5 and per-class AP, precision-recall curves, images with "
    "predicted and true boxes. Segmentation: mIoU, per-class IoU, pixel accuracy and Dice, mask overlays. "
    "All of the served predictor, with latency, throughput, parameters and size on the current device, tied "
    f"together in report.md (figures in figures/). Writes {layout.EVALUATE_REPORTS}/.",
    sections=("evaluate", "segmentation"),
)
def _evaluate(params, args, run) -> dict:
    if run is not None:
        run.wait_open()  # the latency measurement must not share the CPU with the tracking helper
    result = _task(params).evaluate(params, layout.DATASET, layout.TEACHER, layout.EVALUATE_REPORTS, layout.HOLDOUT)
    return _finish(run, result, layout.EVALUATE_REPORTS)


@command(
    "baseline",
    "train the distillation student alone, for distill's comparison",
    "Train distill.student without a teacher (the task's plain loss; the same initial weights, seed, schedule "
    "and augmentation as the distilled student), measure it on the test split, and write baseline.json (with "
    f"its per-epoch history) and history.png to {layout.BASELINE_REPORTS}/. With distill.init teacher (detection "
    "and segmentation) both students start from the teacher's strongest channels, so the KD gain is the distillation "
    "loss's alone. Its own stage, so that changing the KD settings reruns distill only. With distill.baseline false it trains nothing and "
    "baseline.json says so (distill then reports no KD gain).",
    sections=("distill", "train", "detection"),
    tracked_in_process=True,
)
def _baseline(params, args, run) -> dict:
    result = _task(params).baseline(
        params,
        layout.DATASET,
        layout.PREPARED,
        layout.TEACHER,
        layout.BASELINE_REPORTS,
        layout.CHECKPOINTS,
        on_epoch=run.log_epoch if run else None,
    )
    if run is not None:  # None when tracking is off, and on every DDP rank but 0
        _finish(run, result, layout.BASELINE_REPORTS)
    return result


@command(
    "distill",
    "distill a small student from the trained teacher, export it to ONNX and int8",
    "Train distill.student from the teacher under the same augmentation (classification: Hinton knowledge "
    "distillation, temperature and alpha, KL scaled by T^2; segmentation: the same per pixel; detection: the "
    "method the README names); with distill.baseline, the result of `visionops baseline` (the same student "
    "alone) shows what distillation gained. Compares teacher and student on the test split (the task's "
    "headline metric, parameters, size, CPU latency), exports the student to ONNX with an ONNX Runtime parity "
    "check, and (classification, distill.quantize) int8-quantizes it. "
    f"Writes {layout.STUDENT} and {layout.DISTILL_REPORTS}/; `visionops register` registers it.",
    sections=("distill", "train", "detection"),
    tracked_in_process=True,
)
def _distill(params, args, run) -> dict:
    result = _task(params).distill(
        params,
        layout.DATASET,
        layout.PREPARED,
        layout.TEACHER,
        layout.STUDENT,
        layout.DISTILL_REPORTS,
        layout.CHECKPOINTS,
        layout.BASELINE_REPORTS / "baseline.json",
        on_epoch=run.log_epoch if run else None,
        holdout_dir=layout.HOLDOUT,
    )
    if run is not None:  # None when tracking is off, and on every DDP rank but 0
        _finish(run, result, layout.DISTILL_REPORTS)
    return result


def _nothing_to_register(params) -> dict | None:
    """The register stage's result when it would change nothing in the registry (read without MLflow), else None."""
    from visionops.serving.registered import reader, registered_already
    from visionops.tracking.lineage import experiment_name

    if not params.mlflow.enabled:
        return None
    files = {params.mlflow.teacher_model_name: layout.TEACHER, params.mlflow.student_model_name: layout.STUDENT}
    found = registered_already(reader(params.mlflow), files, experiment_name())
    if found is None:
        return None
    return {"registered": [{**r, "created": False} for r in found], "up_to_date": True}


@command(
    "register",
    "register the teacher and the student in the MLflow model registry",
    f"Register {layout.TEACHER} as mlflow.teacher_model_name, then {layout.STUDENT} as "
    "mlflow.student_model_name tagged visionops.teacher_version, each as a new version with the alias "
    "challenger, inside this stage's MLflow run. Idempotent: a file whose content (MD5) is already "
    "registered is not registered again. A model with no champion yet has the version just registered "
    f"judged by the promotion gates on {layout.HOLDOUT}/ once, and made champion if it passes. "
    "Under `dvc exp run` (DVC_EXP_NAME set) it only registers: the versions are tagged "
    "visionops.experiment=<name>, and no alias moves (promote one with `visionops promote --version N`). "
    "DVC reruns it on every `dvc repro` (the registry is state DVC cannot see): when every file is registered "
    "already, holds its alias and was judged, it says so in one line and opens no MLflow run. Each new version "
    f"carries the inference log's settings (params monitor), embedding projection and reference profile "
    f"({layout.DATASET}/'s val split): served, it writes the log (monitor.log_uri).",
    sections=("mlflow", "promote", "evaluate", "monitor"),
    tracked_in_process=True,
    up_to_date=_nothing_to_register,
)
def _register_models(params, args, run) -> dict:
    from visionops.tracking.lineage import experiment_name

    if run is None:
        return {"registered": [], "note": "mlflow.enabled is false: nothing registered"}
    experiment = experiment_name()
    teacher = _register(params, run, layout.TEACHER, layout.EVALUATE_REPORTS, params.mlflow.teacher_model_name,
                        experiment=experiment, started=layout.TRAIN_REPORTS / "details.json")
    link = {"visionops.teacher_version": teacher["version"]}
    student = _register(params, run, layout.STUDENT, layout.DISTILL_REPORTS, params.mlflow.student_model_name, link,
                        experiment)
    result = {"registered": [teacher, student]}
    if experiment:
        result["experiment"] = experiment
    run.log_result({"new_versions": sum(r["created"] for r in result["registered"])})
    return result


def _register(
    params, run, model_path: Path, reports_dir: Path, name: str, extra_tags: dict[str, str] | None = None,
    experiment: str | None = None, started: Path | None = None,
) -> dict:
    """Register `model_path` unless a version with its content exists; a new version carries the
    membership-inference audit of `reports_dir`'s details.json (the stage that measured the file), the
    starting point recorded in `started` (the train stage's details.json), and the inference log's
    projection and reference profile (of data/dataset's val split, `monitoring.reference`).

    On the main line (`experiment` None) the version gets the alias challenger (unless it is the
    champion), and a model without a champion has it judged by the gates once (on the holdout) and made
    champion if it passes. A DVC experiment's version is tagged with its name and moves no alias.
    """
    from visionops.monitoring import reference
    from visionops.serving.promotion import (
        CHAMPION,
        find_version_by_file,
        has_champion,
        promote,
        record_audit,
        record_init,
    )
    from visionops.serving.pyfunc import CHALLENGER, EXPERIMENT_TAG, RegistryError

    if not Path(model_path).is_file():
        raise RegistryError(f"{model_path}: no model file to register (run `dvc repro` or `visionops train`/`distill`)")
    version = find_version_by_file(name, model_path)
    created = version is None
    if created:
        tags = {**run.lineage_tags, "visionops.stage": run.stage, **(extra_tags or {})}
        if experiment:
            tags[EXPERIMENT_TAG] = experiment
        import tempfile

        with tempfile.TemporaryDirectory(prefix="visionops-profile-") as tmp:
            profile = reference.build(params.task, model_path, layout.DATASET, params.monitor.model_dump(), Path(tmp), name)
            version = _task(params).log_model(model_path, name, tags, None if experiment else CHALLENGER, profile)
        details = Path(reports_dir) / "details.json"
        if details.is_file():
            record_audit(name, str(version.version), json.loads(details.read_text()))
        if started is not None and started.is_file():
            record_init(name, str(version.version), json.loads(started.read_text()).get("init"))
    registered = {"name": name, "version": str(version.version), "created": created}
    if experiment:
        return registered
    if not created:
        import mlflow

        client = mlflow.MlflowClient()
        if not {CHAMPION, CHALLENGER} & set(client.get_model_version(name, str(version.version)).aliases or ()):
            # registered before by an experiment (or replaced since): the main line's model is the challenger
            client.set_registered_model_alias(name, CHALLENGER, str(version.version))
    judged = "promotion.decision" in (version.tags or {})
    if not has_champion(name) and not judged:
        decision = promote(name, layout.HOLDOUT, params.promote, params.evaluate, version=str(version.version))
        registered["promotion"] = decision.to_dict()
    return registered


def _registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered model name (default: mlflow.teacher_model_name)")
    p.add_argument("--student", action="store_true", help="use mlflow.student_model_name")


def _promote_arguments(p: argparse.ArgumentParser) -> None:
    _registry_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="the version to judge (default: the one holding --alias)")
    which.add_argument("--alias", default="challenger", help="judge the version holding this alias (default: %(default)s)")


def _registered_name(params, args) -> str:
    from visionops.tracking.store import configure

    configure(params.mlflow)
    return args.model or (params.mlflow.student_model_name if args.student else params.mlflow.teacher_model_name)


@command(
    "promote",
    "make a version champion if it beats the champion significantly on the frozen holdout",
    f"Score the challenger (or --version N, or the version with --alias) and the current champion on the same "
    f"images of the frozen holdout {layout.HOLDOUT}/ (never trained on), then apply the gates in params.yaml "
    "`promote`: min_score; a gain over the champion of at least min_gain in the task's per-image measure that is "
    "significant at `significance` by the task's one-sided paired test (classification: exact McNemar on accuracy; "
    "detection and segmentation: Wilcoxon signed-rank on per-image F1 or mIoU); min_class_score for every class "
    "(recall, AP@.5 or IoU); max_ece of the served "
    "probabilities; and max_latency_ratio, the challenger's time per batch over the champion's, timed in turns "
    "in this run. Without a champion only the absolute gates apply (no gain, significance or latency gate). "
    "min_score and min_class_score `auto` (the default) fit the data: what a predictor that learnt nothing (the most "
    "frequent class, no box, every pixel the most frequent class) scores on the same holdout, plus auto_margin of the "
    "gap to 1. Each refusal names the gate, the measured value, the floor and the params.yaml key that changes it. "
    "On a pass, champion moves to the version and the old champion gets the alias previous; on a fail the "
    "reasons (with the p-value and the number of holdout images) are printed, and the exit code is 1. Either "
    "way the decision, the test that judged, its p-value and counts and the sample size are recorded on the "
    "version. The champion itself is not judged again.",
    arguments=_promote_arguments,
)
def _promote(params, args, run) -> dict:
    from visionops.errors import VisionopsError
    from visionops.serving.promotion import NoChallengerError, promote

    name = _registered_name(params, args)
    try:
        decision = promote(name, layout.HOLDOUT, params.promote, params.evaluate, version=args.version, alias=args.alias)
    except NoChallengerError:
        raise VisionopsError(_nothing_to_promote(name, args.alias)) from None
    result = decision.to_dict()
    if not decision.promoted:
        print(json.dumps(result, indent=2, default=str) if args.json else _summary("promote", result))
        raise VisionopsError(f"{name} version {decision.challenger_version} rejected: " + "; ".join(decision.reasons))
    return result


def _nothing_to_promote(name: str, alias: str) -> str:
    """What is true when no version holds `alias`: nothing registered, a champion already, or neither."""
    versions = _versions(name)
    if not versions:
        return f"no version of {name!r} is registered yet: {REGISTER_FIRST}"
    champion = _alias_version(name, "champion")
    if champion is not None:
        return (f"{name} v{champion} is already champion and no version holds the alias {alias!r}; nothing to promote "
                "(the register stage makes a changed model the next challenger; `--version N` judges another version)")
    return f"{name} has no {alias!r} and no champion: {_why_no_champion(name, versions)}"


@command(
    "rollback",
    "move the champion alias back to the previous champion",
    "Point champion at the version that held it before (alias previous), recording the rollback on both "
    "versions' tags and descriptions.",
    arguments=_registry_arguments,
)
def _rollback(params, args, run) -> dict:
    from visionops.serving.promotion import rollback

    return rollback(_registered_name(params, args))


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--model", default=None, help="model URI (default: models:/<mlflow.teacher_model_name>@champion)")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)


@command(
    "predict",
    "classify, detect or segment image files or folders with a registered model",
    "Run a registered model on PNG/JPEG files (folders are searched recursively), preprocessing them "
    "exactly as in training and serving (the same per-row path and image size limit as the served model), and "
    "write a CSV of path, the model's answer and error (empty unless the file could not be read or decoded). "
    "The answer is a classifier's label and probability, a detector's detections (JSON: boxes in the image's "
    "pixels, labels, scores, after NMS), or a segmenter's mask (base64 PNG at the image's size) and classes. "
    "Every row is written first; then the exit code is 1 if any file failed. A model whose weights file changed "
    "since it was registered (its SHA-256 differs from the one recorded) is refused before anything is predicted. "
    "Each image is also a row of the inference log: in the model's monitor.log_uri as registered (default "
    "logs/inference/, a Parquet folder per day, relative to the working directory), or $VISIONOPS_LOG_URI when set "
    "(empty: no log); a model registered before the log existed logs only when that variable is set.",
    arguments=_predict_arguments,
)
def _predict(params, args, run) -> dict:
    from visionops.serving.promotion import predict_paths
    from visionops.tracking.store import configure

    configure(params.mlflow)
    uri = args.model or f"models:/{params.mlflow.teacher_model_name}@champion"
    _require_alias(uri)
    rows = predict_paths(uri, args.paths, args.out, batch_size=args.batch_size)
    return {"model": uri, "images": rows, "csv": str(args.out)}


def _import_labels_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="the reviewed images, labelled, in the layout of data.source")
    p.add_argument("--dry-run", action="store_true", help="check and count only; copy nothing")


@command(
    "import-labels",
    "add reviewed, labelled images (e.g. the inference log's samples) to the data source",
    "Read FOLDER with data.source's reader (folder, voc, yolo or masks, in that source's layout) and check every "
    "image and label as validate would (decodable, classes in data.root's class set, boxes inside their image, "
    "mask sizes and values, not blank): any problem fails naming the files, and nothing is copied. Then copy each "
    "file into data.root where the source reads it, atomically, never overwriting (the same bytes are skipped, "
    "other bytes fail naming both), and list them in "
    f"{layout.IMPORTS}, which download depends on: the next `dvc repro` places the new images by the stable "
    "splits, moving none already placed. Generated sources (digits, cifar10, canvases) and coco are refused.",
    arguments=_import_labels_arguments,
)
def _import_labels(params, args, run) -> dict:
    from visionops.data.import_labels import import_labels

    return import_labels(params, args.folder, dry_run=args.dry_run)


REGISTER_FIRST = ("run `dvc repro` (or `make run`): its register stage registers the trained models and makes the "
                  "first version that passes the promotion gates champion")


def _why_no_champion(name: str, versions: list[str]) -> str:
    """Why registered versions hold no champion, from the newest decision recorded on them, and what helps."""
    from mlflow import MlflowClient

    client = MlflowClient()
    listed = f"version {versions[0]} is" if len(versions) == 1 else f"versions {', '.join(versions)} are"
    judged = [v for v in reversed(versions) if "promotion.decision" in (client.get_model_version(name, v).tags or {})]
    if not judged:
        return (f"{listed} registered but none was judged yet (a DVC experiment's versions move no alias): judge one "
                "with `visionops promote --version N`")
    tags = client.get_model_version(name, judged[0]).tags
    try:
        reasons = "; ".join(json.loads(tags.get("promotion.reasons", "[]")))
    except ValueError:
        reasons = tags.get("promotion.reasons", "")
    return (f"{listed} registered, and v{judged[0]}, the newest judged, was {tags['promotion.decision']} "
            f"by the promotion gates ({reasons}): train a better model (`dvc repro` registers and judges it), or judge a "
            "version again under other params.yaml `promote` gates with `visionops promote --version N`")


def _require_alias(uri: str) -> None:
    """For `models:/NAME@ALIAS`: a one-line RegistryError when the model or the alias does not exist."""
    from visionops.serving.pyfunc import RegistryError

    name, at, alias = uri.removeprefix("models:/").partition("@")
    if not uri.startswith("models:/") or not at:
        return
    versions = _versions(name)
    if not versions:
        raise RegistryError(f"no model named {name!r} is registered yet: {REGISTER_FIRST}")
    if _alias_version(name, alias) is not None:
        return
    if alias == "champion":
        raise RegistryError(f"model {name!r} has no champion: {_why_no_champion(name, versions)}")
    raise RegistryError(f"model {name!r} has no version with the alias {alias!r} (versions {', '.join(versions)} are registered)")


def _versions(name: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted((str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")), key=int)


def _alias_version(name: str, alias: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionops",
        description="Train, check and ship image classifiers, detectors and segmenters reproducibly (params.yaml "
        "`task`). Each subcommand is one stage "
        "of the DVC pipeline (dvc.yaml); `dvc repro` runs them in order.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file (default: %(default)s)")
        p.add_argument("--json", action="store_true", help="print the full result as JSON (for scripts) instead of a summary")
        if cmd.arguments is not None:
            cmd.arguments(p)
    return parser


def _version() -> str:
    from visionops import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from visionops.errors import VisionopsError
    from visionops.process_settings import no_analytics, tune_gc, tune_malloc

    no_analytics()
    tune_gc()
    tune_malloc()

    cmd = COMMANDS[args.command]
    try:
        from visionops.config import apply_threads, load_params

        params = load_params(args.params)
        if args.command in TORCH_COMMANDS:
            apply_threads(params.train.threads)
        if cmd.up_to_date is not None and (done := cmd.up_to_date(params)) is not None:
            result = done
        elif cmd.sections:
            from visionops.tracking.stage_run import track_stage

            with track_stage(args.command, params, cmd.sections, cmd.tracked_in_process) as run:
                result = cmd.fn(params, args, run)
        else:
            result = cmd.fn(params, args, None)
    except VisionopsError as exc:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"visionops {args.command}: error: {exc}", file=sys.stderr)
        return 1
    summary = f"{args.params} is valid" if args.command == "check" else _summary(args.command, result)
    print(json.dumps(result, indent=2, default=str) if args.json else summary)
    return 0


TORCH_COMMANDS = ("label_issues", "pretrain", "train", "evaluate", "distill")  # the commands that apply train.threads

# The headline values of each command's result, in the order the summary shows them.
HEADLINES = {
    "download": ("source", "classes", "image_shape", "splits", "rejected"),
    "validate": ("success", "images", "warnings"),
    "label_issues": ("train_images", "label_issues", "label_issue_fraction", "out_of_fold_accuracy", "note"),
    "pretrain": ("note", "images", "epochs_run", "final_loss", "final_output_std", "knn_acc", "knn_acc_random_init",
                 "train_seconds", "registered"),
    "train": ("epochs_run", "best_val_acc", "train_seconds", "train_images_per_second"),
    "resolve_init": ("init", "version", "run_id", "md5"),
    "evaluate": ("accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_calibrated",  # classification
                 "map_50", "map", "source_map_50", "image_accuracy",  # detection
                 "miou", "pixel_accuracy", "dice", "source_miou",  # segmentation
                 "mia_auc", "mia_tpr_at_1pct_fpr",  # membership-inference audit (every task)
                 "latency_batch_ms"),
    "import-labels": ("dry_run", "imported", "skipped", "label_files", "per_class", "record", "next"),
    "distill": ("student_acc", "baseline_acc", "kd_gain", "teacher_acc", "int8_acc", "mia_auc", "cpu_speedup"),
}
REPORTS = {"validate": layout.VALIDATE_REPORTS, "label_issues": layout.LABEL_ISSUES_REPORTS, "prepare": layout.PREPARE_REPORTS,
           "pretrain": layout.PRETRAIN_REPORTS, "train": layout.TRAIN_REPORTS,
           "evaluate": layout.EVALUATE_REPORTS, "distill": layout.DISTILL_REPORTS}


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
    return str(v)


def _registered_line(r: dict) -> str:
    line = f"{r['name']} v{r['version']}: " + ("registered" if r["created"] else "already registered (same file)")
    decision = r.get("promotion")
    if decision is None:
        return line
    if decision["promoted"]:
        return line + "; champion after the gates"
    return line + "; not champion after the gates: " + "; ".join(decision["reasons"])


def _summary(command: str, result: dict) -> str:
    """A few human lines for the end of a command (`--json` prints the whole result)."""
    if command == "predict":
        return f"predicted {result['images']} images with {result['model']}; wrote {result['csv']}"
    if command in ("promote", "rollback") and "promoted" in result:
        verdict = "PROMOTED" if result["promoted"] else "REJECTED"
        head = (f"{verdict}: version {result['challenger_version']} (champion before: {result['champion_version'] or 'none'}, "
                f"{result.get('holdout_n')} holdout images)")
        return "\n".join([head] + [f"  {c}" for c in result.get("checks") or result.get("reasons") or []])
    if command == "register" and result.get("up_to_date"):
        held = ", ".join(f"{r['name']} v{r['version']} ({' and '.join(r['aliases']) or 'experiment'})" for r in result["registered"])
        return f"register: nothing to register: the model files are registered already as {held}"
    if command == "register" and "registered" in result:
        return "\n".join([_registered_line(r) for r in result["registered"]] or [result.get("note", "nothing registered")])
    keys = [k for k in HEADLINES.get(command, ()) if result.get(k) is not None]
    keys = keys or [k for k, v in result.items() if isinstance(v, int | float | str)][:8]
    lines = [f"{command}: done"] + [f"  {k:<24} {_value(result[k])}" for k in keys]
    if command in REPORTS:
        lines.append(f"  reports in {REPORTS[command]}/ (--json prints the whole result)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
