"""Measuring what training costs: parameters, memory after model creation, peak memory, step time.

The names below are loaded on first use, so that ``python -m slimtune.memory.profile`` runs the module
once (as ``__main__``) rather than also importing it through this package first.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "options", "METHODS": "options", "ProfileOptions": "options",
    "CPU_MEMORY": "result", "CUDA_MEMORY": "result", "ProfileResult": "result", "median_step_time": "result",
    "TrainingSession": "profile", "profile_options": "profile", "profile_training": "profile",
    "run_children": "subproc", "SavedTensorMeter": "accounting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
