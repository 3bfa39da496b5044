"""Stage `distill`: Hinton knowledge distillation of a small student from the frozen teacher.

The student is trained with `alpha * KD(student, teacher, T) + (1 - alpha) * CE(labels)` under the
teacher's augmentation policy and normalisation. With `distill.baseline` the `baseline` stage trains the
same student alone (plain CE; same init, seed and settings) and this stage reads its result, so the
report shows what distillation gained without retraining the baseline whenever the teacher changes.
Then, on the test split: accuracy, parameter/size/CPU-latency ratios, ONNX export with an
onnxruntime parity check, (with `distill.quantize`) static int8 quantization, and the student's
membership-inference audit against the frozen holdout (`evaluation.membership`).

Writes the student to `student_path` and, to `reports_dir`: metrics.json (DVC metrics: `HEADLINE`),
details.json, history.csv, student.onnx, student.int8.onnx and report.md/.html, which DVC hashes, and
the machine-dependent speed figures to measured.json and speed.md, which it does not. Resumable:
the run checkpoints every epoch under `checkpoint_dir`.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from visionops import atomic, measured
from visionops.config import AugmentConfig, DistillConfig, TrainConfig
from visionops.errors import VisionopsError
from visionops.evaluation import membership, report_html
from visionops.evaluation.latency import measure_latency, model_size_bytes
from visionops.models import count_parameters
from visionops.serving import export
from visionops.tasks.classification import classifier
from visionops.tasks.classification import membership as member_signals
from visionops.tasks.classification.baseline import accuracy, student_setup, train_student
from visionops.tasks.classification.losses import kd_loss
from visionops.tasks.classification.train import set_served_rule
from visionops.training.baseline_record import read_baseline
from visionops.training.device import memory_format, select_device
from visionops.training.outputs import fingerprint, run_seconds, write_history
from visionops.training.privacy import PrivacySettingsError, compose
from visionops.training.trainer import EpochCallback

# what `dvc metrics show` shows (it must fit a terminal); the baseline's accuracy is student_acc - kd_gain
HEADLINE = ("student_acc", "kd_gain", "student_gap", "int8_acc", *membership.HEADLINE)
SPEED_REPORT = "speed.md"


class TeacherMismatchError(VisionopsError):
    """The teacher was trained on other classes or another image shape than the dataset."""


class DistillationLoss:
    """`alpha * kd_loss(student, teacher(inputs), T) + (1 - alpha) * hard(student, targets)`.

    A trainer criterion: called as (logits, targets, inputs) with the augmented [0, 1] batch as
    inputs, so the teacher sees exactly what the student sees. The teacher runs frozen (eval, no
    grad) and is never run when alpha == 0; the hard term is skipped when alpha == 1.
    """

    def __init__(self, hard: nn.Module, teacher: nn.Module | None = None, alpha: float = 0.0, temperature: float = 4.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if alpha > 0 and teacher is None:
            raise ValueError("a teacher is needed when alpha > 0")
        self.hard, self.teacher, self.alpha, self.temperature = hard, teacher, alpha, temperature
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.teacher(inputs).float()

    def __call__(self, logits: Tensor, targets: Tensor, inputs: Tensor) -> Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * self.hard(logits, targets)
        if self.alpha > 0:
            loss = loss + self.alpha * kd_loss(logits, self.teacher_logits(inputs), self.temperature)
        return loss


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_latency(model: nn.Module, image_shape, batch_size: int = 64) -> dict:
    """CPU latency of the served predictor (test-time augmentation and temperature included)."""
    served = classifier.Served(copy.deepcopy(model).cpu())
    return measure_latency(served, image_shape, torch.device("cpu"), batch_size=batch_size)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def run_distill(
    dataset_dir: Path,
    prepared_dir: Path,
    teacher_path: Path,
    cfg: DistillConfig,
    train_cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    student_path: Path,
    reports_dir: Path,
    checkpoint_dir: Path,
    on_epoch: EpochCallback | None = None,
    baseline_path: Path | None = None,
    holdout_dir: Path | None = None,
) -> dict:
    """Distil, compare, audit (against the frozen holdout in `holdout_dir`) and export; the student-alone
    figures come from the `baseline` stage's `baseline_path` (required when distill.baseline is true)."""
    teacher_path, student_path = Path(teacher_path), Path(student_path)
    reports_dir, checkpoint_dir = Path(reports_dir), Path(checkpoint_dir)
    base = read_baseline(baseline_path, cfg)
    device = select_device(train_cfg.device)
    teacher, teacher_info = classifier.load(teacher_path, device)
    if train_cfg.privacy.enabled and not teacher_info.get("privacy"):
        raise PrivacySettingsError(f"{teacher_path}: distill with train.privacy.enabled needs a teacher trained with "
                                   "DP-SGD: a non-private teacher's soft labels leak the train images to the student; "
                                   "retrain the teacher with train.privacy.enabled")
    mean, std = teacher.mean.flatten().tolist(), teacher.std.flatten().tolist()
    s = student_setup(dataset_dir, prepared_dir, cfg, train_cfg, augment_cfg, mean, std)
    device, dist_info, ds = s.device, s.dist_info, s.ds
    class_names, image_shape = ds.class_names, ds.image_shape
    if teacher_info["class_names"] != class_names or tuple(teacher_info["image_shape"]) != tuple(image_shape):
        raise TeacherMismatchError(
            f"{teacher_path}: teacher was trained on classes {teacher_info['class_names']} / shape "
            f"{teacher_info['image_shape']}, the dataset has {class_names} / {list(image_shape)}; retrain it"
        )
    teacher = teacher.to(device, memory_format=memory_format(device, train_cfg.channels_last))
    teacher.eval().requires_grad_(False)
    val, test = ds.splits["val"], ds.splits["test"]
    images, labels = s.arrays[0], s.labels

    teacher_digest = _file_digest(teacher_path)
    kd_digest = fingerprint("distill", cfg.alpha, cfg.temperature, teacher_digest, *s.common, arrays=s.arrays)
    criterion = DistillationLoss(s.hard, teacher, cfg.alpha, cfg.temperature)
    student, state = train_student(s, "distill", criterion, checkpoint_dir / "distill.pt", kd_digest, on_epoch)
    set_served_rule(student, train_cfg.tta, val, device, train_cfg.eval_batch_size)  # judged, and saved, as served
    if not dist_info.is_main:
        return {"rank": dist_info.rank}

    # --- evaluation on the test split ---------------------------------------------------------
    teacher_acc = accuracy(teacher, test.images, test.labels, device)
    student_acc = accuracy(student, test.images, test.labels, device)
    audit, _ = membership.audit_splits(member_signals.signals(student, device, train_cfg.eval_batch_size),
                                       ds.splits["train"], membership.load_nonmembers(holdout_dir, class_names, image_shape))
    baseline_acc = base["test_acc"] if base is not None else None
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    teacher_bytes, student_bytes = model_size_bytes(teacher), model_size_bytes(student)
    teacher_lat, student_lat = _cpu_latency(teacher, image_shape), _cpu_latency(student, image_shape)
    student_cpu = copy.deepcopy(student).cpu().eval()

    onnx_path = reports_dir / "student.onnx"
    onnx_info = export.export_onnx(student_cpu, image_shape, onnx_path)
    check_images = test.images if len(test) else val.images  # parity needs real images; any split will do
    parity = export.onnx_parity(student_cpu, onnx_path, check_images, cfg.onnx_atol, cfg.onnx_rtol)
    int8_path = reports_dir / "student.int8.onnx"
    int8 = None
    if cfg.quantize:
        pick = export.calibration_pick(len(images), train_cfg.seed)
        int8 = export.quantize_onnx(onnx_path, int8_path, np.asarray(images[pick]))
        int8["acc"] = int8["fp32_onnx_acc"] = int8["agreement_with_fp32"] = None
        if len(test):
            int8_pred = export.ort_logits(export.ort_session(int8_path), test.images).argmax(1)
            fp32_pred = export.ort_logits(export.ort_session(onnx_path), test.images).argmax(1)
            test_labels = np.asarray(test.labels)
            int8["acc"] = float((int8_pred == test_labels).mean())
            int8["fp32_onnx_acc"] = float((fp32_pred == test_labels).mean())
            int8["agreement_with_fp32"] = float((int8_pred == fp32_pred).mean())
        int8["fp32_ort"], int8["int8_ort"] = export.ort_throughput([onnx_path, int8_path], image_shape)  # alternating
        int8["speedup"] = int8["int8_ort"]["images_per_second"] / int8["fp32_ort"]["images_per_second"]
    else:
        int8_path.unlink(missing_ok=True)

    metrics = {
        "teacher": teacher_info["arch"],
        "student": cfg.student,
        "device": str(device),
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "teacher_acc": teacher_acc,
        "student_acc": student_acc,
        "baseline_acc": baseline_acc,
        "kd_gain": _diff(student_acc, baseline_acc),
        "student_gap": _diff(teacher_acc, student_acc),
        "student_best_val_acc": state.best_acc,
        "student_tta": student.tta,
        "student_temperature": student.temperature,
        "baseline_best_val_acc": base["best_val_acc"] if base is not None else None,
        "epochs_run": state.epoch, "steps_run": state.steps,
        "best_epoch": state.best_epoch,
        **run_seconds(state.history, len(labels)),
        "teacher_parameters": teacher_params,
        "student_parameters": student_params,
        "param_ratio": student_params / teacher_params,
        "teacher_size_bytes": teacher_bytes,
        "student_size_bytes": student_bytes,
        "size_ratio": student_bytes / teacher_bytes,
        "teacher_cpu_images_per_second": teacher_lat["images_per_second"],
        "student_cpu_images_per_second": student_lat["images_per_second"],
        "cpu_speedup": student_lat["images_per_second"] / teacher_lat["images_per_second"],
        "teacher_cpu_single_image_ms": teacher_lat["single_image_ms"],
        "student_cpu_single_image_ms": student_lat["single_image_ms"],
        "onnx_exporter": onnx_info["exporter"],
        "onnx_opset": onnx_info["opset"],
        "onnx_bytes": onnx_info["bytes"],
        "onnx_max_abs_diff": parity["max_abs_diff"],
        "onnx_argmax_agreement": parity["argmax_agreement"],
        "onnx_parity": parity["passed"],
        "int8_method": int8["method"] if int8 else None,
        "int8_acc": int8["acc"] if int8 else None,
        "int8_acc_drop": _diff(int8["fp32_onnx_acc"], int8["acc"]) if int8 else None,
        "int8_agreement_with_fp32": int8["agreement_with_fp32"] if int8 else None,
        "int8_bytes": int8["bytes"] if int8 else None,
        "int8_size_ratio": _ratio(int8["bytes"], onnx_info["bytes"]) if int8 else None,
        "fp32_ort_images_per_second": int8["fp32_ort"]["images_per_second"] if int8 else None,
        "int8_ort_images_per_second": int8["int8_ort"]["images_per_second"] if int8 else None,
        "int8_speedup": int8["speedup"] if int8 else None,
        **audit,
    }

    extra = {
        "history": [measured.pure(row) for row in state.history],
        "teacher": {
            "arch": teacher_info["arch"], "path": str(teacher_path), "digest": teacher_digest,
            "parameters": teacher_params, "test_acc": teacher_acc,
        },
        "distill": cfg.model_dump(),
        **ds.model_record(),
    }
    if state.privacy:
        extra["privacy"] = compose(state.privacy, teacher_info["privacy"])
        metrics |= {"dp_epsilon": extra["privacy"]["epsilon"], "dp_delta": extra["privacy"]["delta"],
                    "dp_student_epsilon": state.privacy["epsilon"], "dp_teacher_epsilon": teacher_info["privacy"]["epsilon"]}
    classifier.save(student_path, student_cpu, cfg.student, class_names, image_shape, **extra)
    write_history(extra["history"], reports_dir)
    measured.write_reports(reports_dir, metrics, HEADLINE)
    atomic.write_text(reports_dir / "report.md", _report(metrics, int8, cfg.model_dump()))
    report_html.write(reports_dir / "report.md", f"Distillation: {metrics['teacher']} → {cfg.student}")
    atomic.write_text(reports_dir / SPEED_REPORT, _speed_report(metrics, teacher_lat, student_lat, int8))
    (checkpoint_dir / "distill.pt").unlink(missing_ok=True)
    return metrics


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _fmt(x, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _report(m: dict, int8: dict | None, cfg: dict) -> str:
    """Accuracy, size and ONNX parity: figures that depend only on the deps and params (DVC hashes it)."""
    kb = 1024
    lines = [
        f"# Distillation: {m['teacher']} → {m['student']}",
        "",
        (f"Hinton KD, T = {cfg['temperature']:g}, alpha = {cfg['alpha']:g} (KD weight; {1 - cfg['alpha']:g} on the labels), "
        f"{cfg['epochs']} epochs at lr {cfg['lr']:g}. Accuracy on the test split. CPU speed depends on the machine "
        f"and its load, so it is in `{SPEED_REPORT}` and `{measured.MEASURED_FILE}` beside this report (and the MLflow run)."),
        "",
        "| model | arch | parameters | size (KiB) | test acc |",
        "|---|---|---:|---:|---:|",
        f"| teacher | {m['teacher']} | {m['teacher_parameters']:,} | {m['teacher_size_bytes'] / kb:.1f} | {_fmt(m['teacher_acc'])} |",
        (f"| student (distilled) | {m['student']} | {m['student_parameters']:,} | {m['student_size_bytes'] / kb:.1f} "
        f"| {_fmt(m['student_acc'])} |"),
    ]
    if m["baseline_acc"] is not None:
        lines.append(
            f"| student alone (baseline) | {m['student']} | {m['student_parameters']:,} | {m['student_size_bytes'] / kb:.1f} "
            f"| {_fmt(m['baseline_acc'])} |"
        )
    lines += [
        "",
        f"- KD gain (distilled − alone): {_fmt(m['kd_gain'], '+.4f')}",
        f"- gap to the teacher (teacher − distilled): {_fmt(m['student_gap'], '+.4f')}",
        f"- parameter ratio (student / teacher): {m['param_ratio']:.4f}",
        f"- size ratio (student / teacher): {m['size_ratio']:.4f}",
        "",
        "Per-epoch loss and accuracy: history.csv (`dvc plots show`, and the stage's MLflow run).",
        "",
        "## ONNX",
        "",
        (f"`student.onnx` ({m['onnx_bytes'] / kb:.1f} KiB; {m['onnx_exporter']} exporter, opset {m['onnx_opset']}): "
        f"float32 `images` in [0, 1], N x C x H x W (dynamic batch) → `logits`."),
        (f"onnxruntime (CPU) vs PyTorch on the test split: max |Δlogit| = {m['onnx_max_abs_diff']:.3g}, "
        f"argmax agreement {m['onnx_argmax_agreement']:.4f} — parity {'passed' if m['onnx_parity'] else 'FAILED'}."),
        "",
        "## int8",
        "",
    ]
    if int8 is None:
        lines.append("Quantization disabled (`distill.quantize: false`).")
    else:
        how = (
            f"static quantization (QDQ, per-channel int8 weights, uint8 activations calibrated on {int8['calibration_images']} train images)"
            if int8["method"] != "dynamic"
            else "dynamic quantization (static quantization failed: " + "; ".join(int8["notes"]) + ")"
        )
        lines += [
            f"`student.int8.onnx` by {how}.",
            "",
            "| | size (KiB) | test acc |",
            "|---|---:|---:|",
            f"| fp32 ONNX | {m['onnx_bytes'] / kb:.1f} | {_fmt(int8['fp32_onnx_acc'])} |",
            f"| int8 ONNX | {int8['bytes'] / kb:.1f} | {_fmt(int8['acc'])} |",
            "",
            f"- int8 argmax agreement with fp32: {_fmt(int8['agreement_with_fp32'])}",
        ]
    lines += ["", *membership.report_section(m, None)]
    return "\n".join(lines) + "\n"


def _speed_report(m: dict, teacher_lat: dict, student_lat: dict, int8: dict | None) -> str:
    """CPU speed of teacher and student, and of the ONNX models: measured here, now (not hashed by DVC)."""
    lines = [
        f"# CPU speed: {m['teacher']} → {m['student']}",
        "",
        f"PyTorch on the CPU, served predictor (TTA and temperature included), batch {student_lat['batch_size']}. "
        "Measured on this machine, under its current load: compare ratios, not absolute figures.",
        "",
        "| model | CPU images/s | CPU ms / image (batch 1) |",
        "|---|---:|---:|",
        f"| teacher ({m['teacher']}) | {teacher_lat['images_per_second']:,.0f} | {teacher_lat['single_image_ms']:.3f} |",
        f"| student ({m['student']}) | {student_lat['images_per_second']:,.0f} | {student_lat['single_image_ms']:.3f} |",
        "",
        f"- CPU throughput speedup (student / teacher): {m['cpu_speedup']:.2f}x",
    ]
    if int8 is not None:
        lines += [
            "",
            f"onnxruntime, batch {int8['int8_ort']['batch_size']}, both models in one process with their batches "
            f"alternating: fp32 {int8['fp32_ort']['images_per_second']:,.0f} images/s, "
            f"int8 {int8['int8_ort']['images_per_second']:,.0f} images/s: int8 is {int8['speedup']:.2f}x the fp32 speed"
            + (" (slower: int8 does not pay for this model on this CPU)." if int8["speedup"] < 1 else "."),
        ]
    return "\n".join(lines) + "\n"
