"""The MLflow model registry side of visionops: a servable pyfunc model, metric-gated promotion,
rollback and batch prediction.

Aliases, never stages: `challenger` (the newest logged candidate), `champion` (what serves),
`previous` (the champion before the current one, the rollback target).

Imports are lazy so that the served model (which unpickles `visionops.serving.pyfunc`) does not
pull in the evaluation stack (scikit-learn, scipy, pydantic, tqdm).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageClassifierModel": "pyfunc",
    "ImageInputError": "pyfunc",
    "log_classifier": "pyfunc",
    "CHALLENGER": "pyfunc",
    "CHAMPION": "pyfunc",
    "PREVIOUS": "pyfunc",
    "Decision": "promotion",
    "NoChallengerError": "promotion",
    "RegistryError": "pyfunc",
    "RollbackError": "promotion",
    "evaluate_version": "promotion",
    "predict_paths": "promotion",
    "promote": "promotion",
    "rollback": "promotion",
}

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS",
    "Decision",
    "ImageClassifierModel",
    "ImageInputError",
    "NoChallengerError",
    "RegistryError",
    "RollbackError",
    "evaluate_version",
    "log_classifier",
    "predict_paths",
    "promote",
    "rollback",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
