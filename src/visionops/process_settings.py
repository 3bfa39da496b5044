"""Process-wide settings for the command-line processes (a stage, its tracking helper, a flow): the garbage
collector's, the C allocator's, and the libraries' analytics, off."""

from __future__ import annotations

import atexit
import gc
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own adaptive threshold on 64-bit
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # or glibc.malloc.* in GLIBC_TUNABLES

# What only the environment turns off (the project's files turn off the rest: .dvc/config core.analytics,
# prefect.toml server.analytics_enabled). MLflow 3 reads its switch once, at `import mlflow`; Prefect's SDK
# events stop at DO_NOT_TRACK (1/true/yes), MLflow's at DO_NOT_TRACK=true; GX 1.x reads GX_ANALYTICS_ENABLED.
ANALYTICS_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}


def no_analytics() -> None:
    """Turn every library's analytics off for this process and its children, before any of them is imported
    (a value the user set is kept)."""
    for key, value in ANALYTICS_OFF.items():
        os.environ.setdefault(key, value)


def tune_gc() -> None:
    """Spare the process the full garbage collections that free nothing (~1-2 s per stage).

    Importing torch, MLflow & co. creates ~600k objects that live until exit: the default thresholds
    run about ten full collections over them meanwhile (~1 s), and the interpreter runs more at exit
    (~0.7 s). Here a full collection waits for 100 younger ones (not 10), and the exit skips them:
    atexit runs `gc.freeze` after the handlers registered later (MLflow's).
    """
    gc.set_threshold(700, 10, 100)
    atexit.register(gc.freeze)


def tune_malloc() -> bool:
    """Let glibc's malloc reuse freed memory instead of mapping fresh pages; True if it took the settings.

    By default glibc serves blocks over an adaptive threshold (128 KiB at first) with fresh mappings and gives
    the free top of its heap back to the system, so a CPU training step, which frees its multi-megabyte
    activations and allocates them again the next step, page-faults them in every time: an elementwise op
    on a 2.9 MB tensor then took 0.75 ms inside a step against 0.1 ms on reused memory. Here blocks up to
    32 MiB come from the heap and the heap keeps up to 1 GiB free, as PyTorch's CPU tuning guide gets
    from jemalloc or tcmalloc (bench/bench_malloc.py: the segmentation teacher's step and the distillation
    step). Does nothing outside glibc, or where the user set these thresholds through glibc's environment.
    """
    if any(k in os.environ for k in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it: the parameters above are glibc's)
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
