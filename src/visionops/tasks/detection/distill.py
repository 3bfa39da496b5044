"""Stage `distill` for detection: dense KD (`kd.py`) of the small student from the trained teacher, then
teacher vs student on the test split (mAP@.5, mAP, parameters, CPU latency), ONNX Runtime parity of
the student's raw maps and (with `distill.quantize`) the static int8 quantization of its ONNX model, whose
maps the same rule decodes into the detections its test mAP is scored on, and the student's
membership-inference audit against the frozen holdout (`evaluation.membership`).

Writes the student to `student_path` and, to `reports_dir`: metrics.json (`HEADLINE`), details.json,
measured.json (timings), history.csv, student.onnx, student.int8.onnx (with `distill.quantize`),
report.md and report.html.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionops import atomic, measured
from visionops.config import AugmentConfig, DetectionConfig, DistillConfig, TrainConfig
from visionops.data.fetch import file_md5
from visionops.evaluation import membership, report_html
from visionops.evaluation.latency import measure_latency
from visionops.models import count_parameters
from visionops.serving import export
from visionops.tasks.detection import detector
from visionops.tasks.detection import membership as member_signals
from visionops.data import dataset
from visionops.tasks.detection.evaluate import score_detections, score_split
from visionops.tasks.detection.kd import check_pair, kd_criterion
from visionops.tasks.detection.student import train_student
from visionops.training.baseline_record import read_baseline
from visionops.training.outputs import run_seconds, write_history
from visionops.training.trainer import EpochCallback

HEADLINE = ("student_map_50", "teacher_map_50", "kd_gain", *membership.HEADLINE)
CHECKPOINT = "student_kd.pt"


def _int8(student: detector.Detector, onnx_path: Path, int8_path: Path, calibration: np.ndarray, test: dataset.Split,
          class_names: list[str], image_shape) -> dict:
    """Static int8 quantization of the student's ONNX model: the test mAP and image accuracy of its decoded
    maps beside the fp32 ONNX model's, sizes, and ONNX Runtime throughput (the two timed in turns)."""
    q = export.quantize_onnx(onnx_path, int8_path, calibration)
    rule = student.rule
    scored = {}
    for name, path in (("fp32", onnx_path), ("int8", int8_path)):
        maps = torch.from_numpy(export.ort_logits(export.ort_session(path), test.images))
        ranked = detector.as_arrays(student.decode(maps, ranked=True))
        scored[name] = score_detections(ranked, test, class_names, rule)
    fp32_ort, int8_ort = export.ort_throughput([onnx_path, int8_path], image_shape)
    return {
        "int8_method": q["method"], "int8_calibration_images": q["calibration_images"],
        "int8_map_50": scored["int8"]["map_50"], "fp32_onnx_map_50": scored["fp32"]["map_50"],
        "int8_map_50_drop": scored["fp32"]["map_50"] - scored["int8"]["map_50"],
        "int8_map": scored["int8"]["map"], "fp32_onnx_map": scored["fp32"]["map"],
        "int8_image_accuracy": scored["int8"]["image_accuracy"], "fp32_onnx_image_accuracy": scored["fp32"]["image_accuracy"],
        "onnx_bytes": Path(onnx_path).stat().st_size, "int8_bytes": q["bytes"],
        "fp32_ort_images_per_second": fp32_ort["images_per_second"], "int8_ort_images_per_second": int8_ort["images_per_second"],
        "int8_speedup": int8_ort["images_per_second"] / fp32_ort["images_per_second"],
    }  # fmt: skip


def _int8_line(m: dict) -> str:
    if m.get("int8_map_50") is None:
        return "int8: quantization disabled (`distill.quantize: false`)."
    how = "static (QDQ, per-channel int8 weights)" if m["int8_method"] != "dynamic" else "dynamic (static quantization failed)"
    return (f"int8 (`student.int8.onnx`, {how}, calibrated on {m['int8_calibration_images']} train images; its maps "
            f"decoded by the same rule): test mAP@.5 {m['int8_map_50']:.4f} against {m['fp32_onnx_map_50']:.4f} for the fp32 "
            f"ONNX model, mAP@[.5:.95] {m['int8_map']:.4f} against {m['fp32_onnx_map']:.4f}, images fully right "
            f"{m['int8_image_accuracy']:.4f} against {m['fp32_onnx_image_accuracy']:.4f}; {m['int8_bytes'] / 1024:.1f} KiB "
            f"against {m['onnx_bytes'] / 1024:.1f} (ONNX Runtime speeds: measured.json).")


def _report(m: dict) -> str:
    rows = [("mAP@.5 (test)", "teacher_map_50", "student_map_50", ".4f"), ("mAP@[.5:.95] (test)", "teacher_map", "student_map", ".4f"),
            ("parameters", "teacher_parameters", "student_parameters", "d")]
    lines = [f"# Distillation: {m['teacher']} → {m['student']}", "",
             ("Method: dense knowledge distillation for a CenterNet-style detector — Hinton et al. (2015) temperature "
              "soft targets per heatmap location and class, plus the teacher's box sizes and offsets as soft "
              f"regression targets weighted by its confidence (T = {m['temperature']}, alpha = {m['alpha']})."), "",
             "| | teacher | student |", "|---|---|---|"]
    lines += [f"| {name} | {m[t]:{f}} | {m[s]:{f}} |" for name, t, s, f in rows]
    if m["baseline_map_50"] is not None:
        start = "the teacher's strongest channels (`distill.init: teacher`)" if m["init"] == "teacher" else "random weights"
        lines += ["", (f"Student trained alone (same init, seed, schedule, augmentation): mAP@.5 {m['baseline_map_50']:.4f}; "
                       f"distillation gain {m['kd_gain']:+.4f}. Both students started from {start}.")]
    lines += ["", (f"ONNX (`student.onnx`, {m['onnx_exporter']} exporter, opset {m['onnx_opset']}): onnxruntime vs PyTorch raw "
                   f"maps on the test images, max |Δ| = {m['onnx_max_abs_diff']:.3g} — parity {'passed' if m['onnx_parity'] else 'FAILED'}."),
              "CPU latency (forward + decoding + NMS) is in measured.json (machine-dependent).",
              _int8_line(m), "",
              "Per-epoch loss and val mAP@.5: history.csv (`dvc plots show`, and the stage's MLflow run).", "",
              *membership.report_section(m, None)]
    return "\n".join(lines)


def run_distill(dataset_dir: Path, prepared_dir: Path, teacher_path: Path, cfg: DistillConfig, train_cfg: TrainConfig,
                augment_cfg: AugmentConfig, rule: DetectionConfig, student_path: Path, reports_dir: Path,
                checkpoints_dir: Path, on_epoch: EpochCallback | None = None, baseline_path: Path | None = None,
                holdout_dir: Path | None = None) -> dict:
    base = read_baseline(baseline_path, cfg)
    teacher, tinfo = detector.load(teacher_path)
    for p in teacher.parameters():
        p.requires_grad_(False)

    def criterion_for(student):
        check_pair(teacher, student)
        return kd_criterion(teacher, student, cfg.alpha, cfg.temperature)

    checkpoint = checkpoints_dir / CHECKPOINT
    ds, student, state, facts, images = train_student(
        dataset_dir, prepared_dir, cfg, train_cfg, augment_cfg, rule, checkpoint, "distill", on_epoch,
        criterion_for=criterion_for, extra_fingerprint=(file_md5(teacher_path), cfg.alpha, cfg.temperature), teacher=teacher)
    teacher = teacher.cpu()
    test = ds.splits["test"]
    t_score, s_score = score_split(teacher, test, ds.class_names), score_split(student, test, ds.class_names)
    audit, _ = membership.audit_splits(member_signals.signals(student, train_cfg.eval_batch_size), ds.splits["train"],
                                       membership.load_nonmembers(holdout_dir, ds.class_names, ds.image_shape))
    cpu = torch.device("cpu")
    t_lat = measure_latency(detector.Detect(teacher), ds.image_shape, cpu, batch_size=64, repeats=10)
    s_lat = measure_latency(detector.Detect(student), ds.image_shape, cpu, batch_size=64, repeats=10)
    onnx_path = reports_dir / "student.onnx"
    onnx_info = export.export_onnx(student, ds.image_shape, onnx_path)
    parity = export.onnx_parity(student, onnx_path, test.images, cfg.onnx_atol, cfg.onnx_rtol)
    int8_path = reports_dir / "student.int8.onnx"
    int8 = {"int8_map_50": None}
    if cfg.quantize:
        calibration = np.asarray(images[export.calibration_pick(len(images), train_cfg.seed)])
        int8 = _int8(student, onnx_path, int8_path, calibration, test, ds.class_names, ds.image_shape)
    else:
        int8_path.unlink(missing_ok=True)
    metrics = {
        "teacher": tinfo["arch"],
        "student": cfg.student,
        "init": cfg.init,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "teacher_map_50": t_score["map_50"],
        "student_map_50": s_score["map_50"],
        "teacher_map": t_score["map"],
        "student_map": s_score["map"],
        "baseline_map_50": base["test_map_50"] if base else None,
        "kd_gain": s_score["map_50"] - base["test_map_50"] if base else None,
        "student_gap": t_score["map_50"] - s_score["map_50"],
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
        "best_val_map_50": state.best_acc,
        "epochs_run": state.epoch, "steps_run": state.steps,
        "onnx_exporter": onnx_info["exporter"],
        "onnx_opset": onnx_info["opset"],
        "onnx_max_abs_diff": parity["max_abs_diff"],
        "onnx_parity": parity["passed"],
        "teacher_latency_batch_ms": t_lat["batch_ms"],
        "student_latency_batch_ms": s_lat["batch_ms"],
        "teacher_latency_single_image_ms": t_lat["single_image_ms"],
        "student_latency_single_image_ms": s_lat["single_image_ms"],
        **int8,
        **run_seconds(state.history, len(images)),
        **audit,
    }
    if facts["is_main"]:
        history = [measured.pure(row) for row in state.history]
        detector.save(student_path, student, cfg.student, ds.class_names, ds.image_shape, history=history,
                      **ds.model_record())
        write_history(history, reports_dir)
        atomic.write_text(reports_dir / "report.md", _report(metrics))
        report_html.write(reports_dir / "report.md", f"Distillation: {cfg.student}")
        measured.write_reports(reports_dir, metrics, HEADLINE)
        checkpoint.unlink(missing_ok=True)
    return metrics
