"""Measuring what training costs: parameters, memory after model creation and after a step, peak memory
broken down by part (and activations by module kind), step time; plots and sweeps of configurations.

The names below are loaded on first use, so that ``python -m slimtune.memory.profile`` runs the module
once (as ``__main__``) rather than also importing it through this package first.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "options", "METHODS": "options", "QUANTS": "options", "ProfileOptions": "options",
    "BREAKDOWN_KEYS": "result", "CPU_MEMORY": "result", "CUDA_MEMORY": "result", "ProfileResult": "result",
    "median_step_time": "result",
    "TrainingSession": "profile", "profile_options": "profile", "profile_training": "profile",
    "run_children": "subproc", "ACTIVATION_KINDS": "accounting", "SavedTensorMeter": "accounting",
    "plot_results": "plot", "SweepSpec": "sweep", "run_sweep": "sweep", "sweep_configs": "sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
