"""ONNX export of a classifier, its parity check against PyTorch, and int8 quantization.

The exported graph takes float32 images in [0, 1], N x C x H x W, named "images" (dynamic batch),
and returns "logits"; normalisation is inside the graph (it is part of `Classifier`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionops.atomic import atomic_path
from visionops.errors import VisionopsError

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def _bar(desc: str, total: int | None = None, unit: str = "it"):
    """A progress bar on stderr, off when stderr is not a terminal (tqdm's disable=None)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None, file=sys.stderr)


class OnnxParityError(VisionopsError):
    """The exported ONNX model disagrees with the PyTorch model beyond the tolerance."""


class ExportError(VisionopsError):
    """The model could not be exported to ONNX."""


def _to_nchw_float(images_uint8_nhwc) -> np.ndarray:
    """uint8 N x H x W x C → float32 N x C x H x W in [0, 1]."""
    arr = np.asarray(images_uint8_nhwc)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def export_onnx(model: nn.Module, image_shape: tuple[int, int, int], path: Path | str) -> dict:
    """Export `model` (CPU, eval) to ONNX at `path`, atomically; returns which exporter and opset were used.

    Tries PyTorch's default (torch.export-based) exporter first; where that is unavailable (it needs
    onnxscript, which is not installed) or fails, uses the TorchScript exporter (`dynamo=False`) at
    its default opset.
    """
    import onnx

    path = Path(path)
    h, w, c = image_shape
    net = copy.deepcopy(model).cpu().eval()
    example = (torch.rand(2, c, h, w),)  # batch 2: a batch of 1 would be specialised by torch.export
    errors = []
    exporters = ("dynamo", "torchscript") if importlib.util.find_spec("onnxscript") else ("torchscript",)
    for exporter in exporters:
        bar = _bar(f"ONNX export ({exporter})")
        try:
            with bar, atomic_path(path) as tmp:
                if exporter == "dynamo":
                    batch = torch.export.Dim("batch", min=1)
                    torch.onnx.export(
                        net, example, str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                        dynamic_shapes=({0: batch},), external_data=False, dynamo=True,
                    )
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
                        torch.onnx.export(
                            net, example, str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False,
                        )
                proto = onnx.load(str(tmp))
                onnx.checker.check_model(proto)
            opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            return {"path": str(path), "exporter": exporter, "opset": opset, "bytes": path.stat().st_size}
        except Exception as exc:  # noqa: BLE001  (any exporter failure: try the next one)
            errors.append(f"{exporter}: {type(exc).__name__}: {exc}")
            if exporter == "dynamo":
                print(f"export: the default ONNX exporter failed ({type(exc).__name__}); using dynamo=False", file=sys.stderr)
    raise ExportError(f"{path}: ONNX export failed:\n  " + "\n  ".join(errors))


def ort_session(onnx_path: Path | str, threads: int | None = None):
    """An onnxruntime CPU inference session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_logits(session, images_uint8_nhwc, batch_size: int = 256) -> np.ndarray:
    """Logits of an ONNX session on uint8 N x H x W x C images, run in batches."""
    out = []
    for start in range(0, len(images_uint8_nhwc), batch_size):
        x = _to_nchw_float(images_uint8_nhwc[start : start + batch_size])
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def onnx_parity(
    model: nn.Module, onnx_path: Path | str, images_uint8_nhwc, atol: float, rtol: float = 1e-3, batch_size: int = 256
) -> dict:
    """Compare onnxruntime (CPU) with PyTorch (CPU) on real images.

    Every logit must satisfy |onnx - torch| <= atol + rtol * |torch| (numpy.allclose's rule: float32
    kernels differ in summation order, so large logits need a relative allowance); else OnnxParityError.
    """
    if len(images_uint8_nhwc) == 0:
        raise OnnxParityError(f"{onnx_path}: no images to check ONNX parity on")
    net = copy.deepcopy(model).cpu().eval()
    session = ort_session(onnx_path)
    onnx_out = ort_logits(session, images_uint8_nhwc, batch_size)
    torch_out = []
    with torch.no_grad():
        for start in range(0, len(images_uint8_nhwc), batch_size):
            x = torch.from_numpy(_to_nchw_float(images_uint8_nhwc[start : start + batch_size]))
            torch_out.append(net(x).float().numpy())
    torch_out = np.concatenate(torch_out)
    if onnx_out.shape != torch_out.shape:
        raise OnnxParityError(f"{onnx_path}: ONNX logits have shape {onnx_out.shape}, PyTorch {torch_out.shape}")
    abs_diff = np.abs(onnx_out - torch_out)
    diff = float(abs_diff.max())
    excess = float((abs_diff - rtol * np.abs(torch_out)).max())
    agree = float((onnx_out.argmax(1) == torch_out.argmax(1)).mean())
    result = {
        "images": len(torch_out), "max_abs_diff": diff, "argmax_agreement": agree, "atol": atol, "rtol": rtol,
        "passed": excess <= atol,
    }
    if not result["passed"]:
        raise OnnxParityError(
            f"{onnx_path}: ONNX and PyTorch logits differ by up to {diff:.3g} (beyond atol {atol:g} + rtol {rtol:g} * |logit|) on "
            f"{len(torch_out)} images; argmax agreement {agree:.4f}"
        )
    return result


CALIBRATION_IMAGES = 256  # train images int8 static quantization calibrates on


def calibration_pick(n_images: int, seed: int) -> np.ndarray:
    """Sorted indices of the (seeded) `CALIBRATION_IMAGES` train images to calibrate on."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_images, size=min(CALIBRATION_IMAGES, n_images), replace=False))


def _calibration_reader(images_uint8_nhwc, batch_size: int = 32):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            batch = next(self._batches, None)
            if batch is None:
                self._bar.close()
            else:
                self._bar.update(len(batch[INPUT_NAME]))
            return batch

        def rewind(self):
            self._bar = _bar("int8 calibration", len(images_uint8_nhwc), "img")
            self._batches = iter(
                {INPUT_NAME: _to_nchw_float(images_uint8_nhwc[s : s + batch_size])}
                for s in range(0, len(images_uint8_nhwc), batch_size)
            )

    return ImageReader()


def quantize_onnx(onnx_path: Path | str, out_path: Path | str, calibration_images, static: bool = True) -> dict:
    """int8-quantize an fp32 ONNX model, atomically.

    Static (default): QDQ format, per-channel int8 weights, uint8 activations calibrated (MinMax)
    on `calibration_images` (uint8 N x H x W x C). Falls back to dynamic quantization if static
    quantization fails; the returned `method` says which was used.
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    errors = []
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix="visionops-quant-") as work:
        pre = Path(work) / "preprocessed.onnx"
        try:
            quant_pre_process(str(onnx_path), str(pre))
            source = pre
        except Exception as exc:  # noqa: BLE001  (pre-processing is an optimisation only)
            errors.append(f"pre-process: {type(exc).__name__}: {exc}")
            source = onnx_path
        method = None
        if static:
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    quantize_static(
                        str(source), str(tmp), _calibration_reader(calibration_images),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    )
                method = "static_qdq_per_channel"
            except Exception as exc:  # noqa: BLE001
                errors.append(f"static: {type(exc).__name__}: {exc}")
                print(f"quantize: static quantization failed ({exc}); using dynamic", file=sys.stderr)
        if method is None:
            quantize_dynamic(str(source), str(tmp), per_channel=True, weight_type=QuantType.QInt8)
            method = "dynamic"
        size = tmp.stat().st_size
    return {
        "path": str(out_path),
        "method": method,
        "calibration_images": len(calibration_images) if method != "dynamic" else 0,
        "bytes": size,
        "notes": errors,
    }


def ort_throughput(
    onnx_paths: Path | str | list[Path | str], image_shape: tuple[int, int, int], batch_size: int = 64, repeats: int = 20,
    warmup: int = 3, threads: int | None = None,
) -> dict | list[dict]:
    """Median onnxruntime CPU time per batch of random [0, 1] images, and images per second.

    Given several models (fp32 and int8), all sessions live in this process and their batches alternate
    (a, b, a, b, ...), so a change in the machine's load hits every model alike and their ratio is fair.
    Returns one dict per model (a single dict for a single path)."""
    paths = onnx_paths if isinstance(onnx_paths, list) else [onnx_paths]
    sessions = [ort_session(p, threads) for p in paths]
    h, w, c = image_shape
    x = np.random.default_rng(0).random((batch_size, c, h, w), dtype=np.float32)
    times: list[list[float]] = [[] for _ in sessions]
    with _bar("ONNX Runtime timing", warmup + repeats, "round") as bar:
        for i in range(warmup + repeats):
            for session, kept in zip(sessions, times):
                t0 = time.perf_counter()
                session.run([OUTPUT_NAME], {INPUT_NAME: x})
                if i >= warmup:
                    kept.append(time.perf_counter() - t0)
            bar.update(1)
    out = []
    for kept in times:
        batch_s = sorted(kept)[len(kept) // 2]
        out.append({"batch_size": batch_size, "batch_ms": batch_s * 1e3, "images_per_second": batch_size / batch_s,
                    "alternated_with": len(paths) - 1})
    return out if isinstance(onnx_paths, list) else out[0]
