"""Two ATen backward kernels the lean layers (:mod:`.lean_layers`) call directly: SiLU's and GELU's input gradients,
the very ops autograd's own ``SiluBackward0`` / ``GeluBackward0`` nodes run. Called from inside a custom backward,
they replace a nested ``torch.autograd.grad`` pass through ``F.silu`` / ``F.gelu`` — the same numbers, bit for bit,
without starting the autograd engine again (tens of microseconds of host time per call, dozens of calls per UNet step).

They are ATen operators (``torch.ops.aten``), not Python-level API, so they are kept here alone;
``tests/core/test_aten_grads.py`` compares each with autograd's result bit for bit, in every float dtype, and fails
loudly if a PyTorch release renames them or changes what they compute.
"""
from __future__ import annotations

import torch


def silu_grad(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d silu(h) / dh · grad`` as autograd computes it (``aten.silu_backward``); grad and h of one shape and dtype."""
    return torch.ops.aten.silu_backward(grad, h)


def gelu_grad(grad: torch.Tensor, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``d gelu(x) / dx · grad`` as autograd computes it for ``F.gelu(x, approximate=...)``
    (``aten.gelu_backward``)."""
    return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)
