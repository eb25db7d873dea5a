"""The dtype adapter GEMMs run in, and the two cast helpers every Function uses."""
from __future__ import annotations

import contextlib

import torch

_NO_CONTEXT = contextlib.nullcontext()


def compute_setting(x: torch.Tensor) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """The dtype adapter GEMMs run in (autocast's when it is on, else x's), and a context that turns autocast
    off around our own kernels (a no-op context when autocast is off: the common, cheap path). Meta tensors
    (the memory estimator's simulated step) have no autocast: x's dtype."""
    device = x.device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device), torch.autocast(device, enabled=False)
    return x.dtype, _NO_CONTEXT


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (``t`` itself when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def cast_optional(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else cast(t, dtype)


def scaled_(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s`` in place, skipped for s = 1 (alpha = r, the common case)."""
    return t if s == 1.0 else t.mul_(s)
