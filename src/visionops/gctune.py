"""Garbage-collector settings for the short-lived command-line processes (a stage, its tracking helper)."""

from __future__ import annotations

import atexit
import gc


def tune_gc() -> None:
    """Spare the process the full garbage collections that free nothing (~1-2 s per stage).

    Importing torch, MLflow & co. creates ~600k objects that live until exit: the default thresholds
    run about ten full collections over them meanwhile (~1 s), and the interpreter runs more at exit
    (~0.7 s). Here a full collection waits for 100 younger ones (not 10), and the exit skips them:
    atexit runs `gc.freeze` after the handlers registered later (MLflow's).
    """
    gc.set_threshold(700, 10, 100)
    atexit.register(gc.freeze)
