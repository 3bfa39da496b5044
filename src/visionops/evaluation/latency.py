"""Inference speed and size of a model on the current device."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the serialised state dict (what a deployment ships)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def measure_latency(
    model: nn.Module, image_shape: tuple[int, int, int], device: torch.device, batch_size: int = 64, repeats: int = 20, warmup: int = 3
) -> dict:
    """Median wall time of a forward pass on uint8 inputs: per batch, per image at batch 1, and throughput."""
    model = model.to(device).eval()
    h, w, c = image_shape

    def timed(n: int) -> float:
        x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, device=device)
        times = []
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    batch_s, single_s = timed(batch_size), timed(1)
    return {
        "device": str(device),
        "batch_size": batch_size,
        "batch_ms": batch_s * 1e3,
        "single_image_ms": single_s * 1e3,
        "images_per_second": batch_size / batch_s,
    }


def call_latency_ms(call: Callable[[], object], repeats: int = 15, warmup: int = 2) -> float:
    """Median wall time of `call()` in ms (an absolute figure: it depends on the machine and its load)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired_latency(challenger: Callable[[], object], champion: Callable[[], object], rounds: int = 15, warmup: int = 2) -> dict:
    """Time two calls in turns under the same load: each round runs both, the one first alternating.

    The machine's load is shared by both halves of a round, so the median of the per-round ratios
    (challenger / champion) is what a latency gate can fairly judge; the medians in ms are for reading.
    """
    calls = (challenger, champion)
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[], []]
    for i in range(rounds):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            calls[j]()
            times[j].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(*times)]
    return {
        "challenger_ms": statistics.median(times[0]) * 1e3,
        "champion_ms": statistics.median(times[1]) * 1e3,
        "ratio": statistics.median(ratios),
        "rounds": rounds,
    }
