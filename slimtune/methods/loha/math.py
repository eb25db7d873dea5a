"""LoHa's math as plain functions: the dense update (merge and tests only), the Tucker core, PEFT's init.

``ΔW = s · (w1a w1b) ⊙ (w2a w2b)`` (Tucker form on convolutions: ``W_i = tucker_weight(t_i, w_i_a, w_i_b)``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...core.products import Grad, tucker_weight


def loha_delta_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                      t1: torch.Tensor | None, t2: torch.Tensor | None, scaling: float,
                      shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The dense ``s · W1 ⊙ W2`` in the base weight's ``shape``, float32 or wider. Merge and tests only."""
    dtype = torch.promote_types(w1a.dtype, torch.float32)
    w1a, w1b, w2a, w2b = (t.to(dtype) for t in (w1a, w1b, w2a, w2b))
    if t1 is not None:
        w1, w2 = tucker_weight(t1.to(dtype), w1a, w1b), tucker_weight(t2.to(dtype), w2a, w2b)
    else:
        w1, w2 = w1a @ w1b, w2a @ w2b
    return (w1 * w2 * scaling).reshape(shape)


def core_kr(t1: torch.Tensor, t2: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """The Tucker core ``C[(i, i'), (j, j'), ·] = t1[i, j, ·] t2[i', j', ·]``: ``[r², r², *kernel]``."""
    r = t1.shape[0]
    a, b = t1.reshape(r, r, -1), t2.reshape(r, r, -1)
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(r * r, r * r, *kernel)


def core_kr_grad(g: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, need_1: bool, need_2: bool
                 ) -> tuple[Grad, Grad]:
    """``(dt1, dt2)`` of :func:`core_kr` for ``g`` ``[r², r², *kernel]``."""
    r = t1.shape[0]
    a, b = t1.reshape(r, r, -1), t2.reshape(r, r, -1)
    g5 = g.reshape(r, r, r, r, -1)  # [i, i', j, j', k]
    d1 = (g5 * b[None, :, None, :]).sum((1, 3)).reshape(t1.shape) if need_1 else None
    d2 = (g5 * a[:, None, :, None]).sum((0, 2)).reshape(t2.shape) if need_2 else None
    return d1, d2


def init_loha_(params: dict[str, nn.Parameter], init_weights: bool) -> None:
    """PEFT's init: everything kaiming-uniform (a=√5) except ``hada_w2_b = 0`` (ΔW = 0) unless ``init_weights``
    is False (all random)."""
    with torch.no_grad():
        for name, p in params.items():
            if name == "hada_w2_b" and init_weights:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
