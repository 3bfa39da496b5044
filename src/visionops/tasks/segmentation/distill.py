"""Stage `distill` for segmentation: pixel-wise Hinton knowledge distillation into a smaller network.

The student is trained with `alpha * T^2 * KL(teacher_T || student_T)` per pixel plus `(1 - alpha)` x the
weighted pixel CE (`losses.PixelDistillationLoss`), on the teacher's augmentation and normalisation. Then
on the test split: teacher vs student mIoU and pixel accuracy, parameters, CPU latency, the student's
ONNX export with an onnxruntime parity check of its raw per-pixel logits, and (with `distill.quantize`)
its static int8 quantization with the int8 model's test mIoU and ONNX Runtime speed, and the student's
membership-inference audit against the frozen holdout (`evaluation.membership`).

Writes the student to `student_path`, and to `reports_dir`: metrics.json (`HEADLINE`), details.json,
history.csv, student.onnx, student.int8.onnx (with `distill.quantize`), report.md/.html (timings in
measured.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionops import atomic, measured
from visionops.config import AugmentConfig, DistillConfig, TrainConfig
from visionops.evaluation import membership, report_html
from visionops.evaluation.latency import measure_latency
from visionops.models import count_parameters
from visionops.serving import export
from visionops.tasks.segmentation import membership as member_signals
from visionops.tasks.segmentation import segmenter
from visionops.tasks.segmentation.baseline import split_scores, student_config
from visionops.tasks.segmentation.losses import PixelDistillationLoss
from visionops.tasks.segmentation.metrics import segmentation_metrics
from visionops.tasks.segmentation.train import load_teacher, setup
from visionops.training.baseline_record import read_baseline
from visionops.training.outputs import fingerprint, run_seconds, write_history

HEADLINE = ("student_miou", "teacher_miou", "kd_gain", *membership.HEADLINE)
PARITY_IMAGES = 64


def _cpu_latency(model, image_shape) -> dict:
    return measure_latency(model.cpu(), image_shape, torch.device("cpu"), batch_size=64)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _int8(onnx_path: Path, int8_path: Path, calibration: np.ndarray, test_images: np.ndarray, truth: np.ndarray,
          class_names: list[str], image_shape) -> dict:
    """Static int8 quantization of the student's ONNX model: its test mIoU beside the fp32 ONNX model's, the
    share of test pixels whose class both give, sizes, and ONNX Runtime throughput (the two timed in turns)."""
    q = export.quantize_onnx(onnx_path, int8_path, calibration)
    masks = {name: export.ort_logits(export.ort_session(path), test_images).argmax(1)
             for name, path in (("fp32", onnx_path), ("int8", int8_path))}
    miou = {name: segmentation_metrics(torch.from_numpy(mask), torch.from_numpy(truth), class_names)["miou"]
            for name, mask in masks.items()}
    fp32_ort, int8_ort = export.ort_throughput([onnx_path, int8_path], image_shape)
    return {
        "int8_method": q["method"], "int8_calibration_images": q["calibration_images"], "int8_miou": miou["int8"],
        "fp32_onnx_miou": miou["fp32"], "int8_miou_drop": miou["fp32"] - miou["int8"],
        "int8_pixel_agreement_with_fp32": float((masks["int8"] == masks["fp32"]).mean()),
        "onnx_bytes": Path(onnx_path).stat().st_size, "int8_bytes": q["bytes"],
        "fp32_ort_images_per_second": fp32_ort["images_per_second"], "int8_ort_images_per_second": int8_ort["images_per_second"],
        "int8_speedup": int8_ort["images_per_second"] / fp32_ort["images_per_second"],
    }  # fmt: skip


def _int8_lines(m: dict) -> list[str]:
    if m.get("int8_miou") is None:
        return ["- int8: quantization disabled (`distill.quantize: false`)"]
    how = "static (QDQ, per-channel int8 weights)" if m["int8_method"] != "dynamic" else "dynamic (static quantization failed)"
    return [
        f"- int8 ({how}, calibrated on {m['int8_calibration_images']} train images): test mIoU {_f(m['int8_miou'])} "
        f"against {_f(m['fp32_onnx_miou'])} for the fp32 ONNX model; {m['int8_pixel_agreement_with_fp32']:.4f} of test "
        f"pixels get the same class; {m['int8_bytes'] / 1024:.1f} KiB against {m['onnx_bytes'] / 1024:.1f} (ONNX Runtime "
        "speeds: measured.json)",
    ]


def _report(m: dict) -> str:
    rows = [
        ("mIoU (test)", _f(m["teacher_miou"]), _f(m["student_miou"])),
        ("pixel accuracy (test)", _f(m["teacher_pixel_accuracy"]), _f(m["student_pixel_accuracy"])),
        ("parameters", str(m["teacher_parameters"]), str(m["student_parameters"])),
    ]
    return "\n".join([
        f"# Distillation: `{m['teacher']}` → `{m['student']}` (segmentation)", "",
        f"Pixel-wise Hinton KD, T = {m['temperature']}, alpha = {m['alpha']}.", "",
        "| | teacher | student |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows), "",
        f"- student trained alone (baseline): mIoU {_f(m['baseline_miou'])}; KD gain {_f(m['kd_gain'])}",
        *(["- both students started from the teacher's strongest channels (`distill.init: teacher`), so the gain "
           "is the distillation loss's alone"] if m["init"] == "teacher" else []),
        f"- ONNX ({m['onnx_exporter']}): max |onnx - torch| logit {m['onnx_max_abs_diff']:.3g} on {m['onnx_images']} "
        f"images, argmax agreement {m['onnx_argmax_agreement']:.4f}",
        *_int8_lines(m), "",
        "Per-epoch loss and val mIoU: history.csv (`dvc plots show`, and the stage's MLflow run).", "",
        *membership.report_section(m, None),
    ])  # fmt: skip


def run_distill(dataset_dir: Path, prepared_dir: Path, teacher_path: Path, cfg: DistillConfig, train_cfg: TrainConfig,
                augment_cfg: AugmentConfig, student_path: Path, reports_dir: Path, checkpoint_dir: Path,
                on_epoch=None, baseline_path: Path | None = None, holdout_dir: Path | None = None) -> dict:
    reports_dir = Path(reports_dir)
    baseline = read_baseline(baseline_path, cfg)
    student_cfg = student_config(cfg, train_cfg)
    s = setup(dataset_dir, prepared_dir, student_cfg, augment_cfg)
    teacher, info = load_teacher(teacher_path, s, student_cfg.channels_last)
    criterion = PixelDistillationLoss(s.hard, teacher, cfg.alpha, cfg.temperature)
    digest = fingerprint("student_kd", student_cfg.model_dump(), cfg.model_dump(), info["arch"], *s.digest_parts,
                         arrays=(*s.arrays, np.frombuffer(Path(teacher_path).read_bytes(), np.uint8)))
    student, state = s.fit(cfg.student, student_cfg, criterion, Path(checkpoint_dir) / "student_kd.pt", digest, "distill",
                           on_epoch, start=teacher if cfg.init == "teacher" else None)
    if not s.dist_info.is_main:
        return {"rank": s.dist_info.rank}
    t_scores = split_scores(s, teacher, train_cfg.eval_batch_size)
    st_scores = split_scores(s, student, train_cfg.eval_batch_size)
    audit, _ = membership.audit_splits(member_signals.signals(student, s.device, train_cfg.eval_batch_size),
                                       s.ds.splits["train"], membership.load_nonmembers(holdout_dir, s.ds.class_names, s.ds.image_shape))
    test_images = np.asarray(s.ds.splits["test"].images)[:PARITY_IMAGES]
    student = student.cpu().eval()
    segmenter.save(student_path, student, cfg.student, s.ds.class_names, s.ds.image_shape,
                   history=[measured.pure(r) for r in state.history], **s.ds.model_record())
    onnx_info = export.export_onnx(student, s.ds.image_shape, reports_dir / "student.onnx")
    parity = export.onnx_parity(student, reports_dir / "student.onnx", test_images, cfg.onnx_atol, cfg.onnx_rtol)
    int8_path = reports_dir / "student.int8.onnx"
    int8 = {}
    if cfg.quantize:
        calibration = np.asarray(s.arrays[0])[export.calibration_pick(len(s.arrays[0]), train_cfg.seed)]
        test = s.ds.splits["test"]
        int8 = _int8(reports_dir / "student.onnx", int8_path, calibration, np.asarray(test.images),
                     np.asarray(test.targets["masks"]), s.ds.class_names, s.ds.image_shape)
    else:
        int8_path.unlink(missing_ok=True)
    t_lat, s_lat = _cpu_latency(teacher, s.ds.image_shape), _cpu_latency(student, s.ds.image_shape)
    baseline_miou = baseline["test_miou"] if baseline else None
    m = {
        "teacher": info["arch"], "student": cfg.student, "init": cfg.init, "temperature": cfg.temperature, "alpha": cfg.alpha,
        "teacher_miou": t_scores["miou"], "student_miou": st_scores["miou"],
        "teacher_pixel_accuracy": t_scores["pixel_accuracy"], "student_pixel_accuracy": st_scores["pixel_accuracy"],
        "baseline_miou": baseline_miou,
        "kd_gain": st_scores["miou"] - baseline_miou if baseline_miou is not None else None,
        "teacher_parameters": count_parameters(teacher), "student_parameters": count_parameters(student),
        "onnx_exporter": onnx_info["exporter"], "onnx_max_abs_diff": parity["max_abs_diff"],
        "onnx_argmax_agreement": parity["argmax_agreement"], "onnx_images": parity["images"], "onnx_parity": parity["passed"],
        "epochs_run": state.epoch, "steps_run": state.steps, "best_val_miou": state.best_acc,
        "teacher_cpu_batch_ms": t_lat["batch_ms"], "student_cpu_batch_ms": s_lat["batch_ms"],
        "cpu_speedup": t_lat["batch_ms"] / s_lat["batch_ms"], "int8_miou": None, **int8,
        **run_seconds(state.history, len(s.arrays[0])), **audit,
    }  # fmt: skip
    write_history([measured.pure(r) for r in state.history], reports_dir)
    measured.write_reports(reports_dir, m, HEADLINE)
    atomic.write_text(reports_dir / "report.md", _report(m))
    report_html.write(reports_dir / "report.md", "visionops distillation")
    (Path(checkpoint_dir) / "student_kd.pt").unlink(missing_ok=True)
    return m
