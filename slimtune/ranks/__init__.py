"""Budgeted rank allocation (LoRAMBo): measure how sensitive each layer is, then spend a parameter budget where it
gains most.

:func:`allocate_ranks` returns a config whose ``rank_pattern`` / ``alpha_pattern`` slimtune and PEFT both read;
:func:`plan_ranks` the whole :class:`Allocation` (per-layer table, budget used); :func:`reallocate` re-allocates an
adapted model once, after warm-up steps, keeping what it has learned. Modules: :mod:`.sensitivity` (and
:mod:`.hessian`) measure, :mod:`.costs` counts parameters per rank, :mod:`.allocate` decides, :mod:`.plan` writes
the config, :mod:`.report` shows it, :mod:`.online` re-allocates during training. ``slimtune allocate`` reads its calibration text as ``slimtune train``
reads its data (:mod:`slimtune.train.calibration`).
"""
from .allocate import ALLOCATORS
from .budget import Budget, parse_budget
from .calibration import LayerSensitivity
from .online import reallocate, transfer_ranks
from .plan import Allocation, LayerAllocation, allocate_from, allocate_ranks, plan_ranks
from .sensitivity import METHODS, estimate_sensitivity

__all__ = ["ALLOCATORS", "Allocation", "Budget", "LayerAllocation", "LayerSensitivity", "METHODS", "allocate_from",
           "allocate_ranks", "estimate_sensitivity", "parse_budget", "plan_ranks", "reallocate", "transfer_ranks"]
