"""HRA's math as plain functions: the compact WY form of a product of Householder reflections, the low-rank factors
it turns the adapted weight into, the dense transform (the reference), the orthogonality penalty, PEFT's init."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ...core.frozen import WeightOperand, weight_matmul


def wy_factors(u: torch.Tensor, apply_gs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, T)`` with ``H_0 ⋯ H_{r−1} = I − U T Uᵀ``; u ``[d, r]``; U ``[d, r]``, T ``[r, r]``, fp32 or wider."""
    u = u.to(torch.promote_types(u.dtype, torch.float32))
    r = u.shape[1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    if apply_gs:
        q, _ = torch.linalg.qr(u)
        return q, 2.0 * eye
    unit = u / u.norm(dim=0, keepdim=True)
    t_inv = torch.triu(unit.t() @ unit, diagonal=1) + 0.5 * eye
    return unit, torch.linalg.solve_triangular(t_inv, eye, upper=True)


def hra_low_rank_factors(weight2d: WeightOperand, u: torch.Tensor, apply_gs: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [r, d_in], up [d_out, r])`` with ``W H = W + up · down``. ``W U`` runs in W's dtype (a 4-bit W:
    its compute dtype)."""
    unit, t = wy_factors(u, apply_gs)
    w_u = weight_matmul(weight2d, unit.to(weight2d.dtype)).to(t.dtype)
    return unit.t(), -(w_u @ t)


def reflections_cancel(u: torch.Tensor) -> torch.Tensor:
    """Whether u's columns come in identical adjacent pairs (PEFT's symmetric init), so that the product of the
    reflections is the identity exactly: a 0-d bool tensor, computed on u's device (no sync). False for odd r."""
    if u.shape[-1] % 2:
        return torch.zeros((), dtype=torch.bool, device=u.device)
    return (u[..., 0::2] == u[..., 1::2]).all()


def hra_dense_transform(u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """The dense ``H`` ``[d, d]`` by PEFT's recipe (reflection by reflection / ``I − 2QQᵀ``): the reference."""
    d, r = u.shape
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    if apply_gs:
        q = []
        for i in range(r):
            v = u[:, i]
            for prev in q:
                v = v - (prev @ v) * prev
            q.append(v / v.norm())
        q = torch.stack(q, dim=1)
        return eye - 2 * q @ q.t()
    unit = u / u.norm(dim=0)
    h = eye
    for i in range(r):
        ui = unit[:, i:i + 1]
        h = h - 2 * (h @ ui) @ ui.t()
    return h


def orthogonality_penalty(u: torch.Tensor) -> torch.Tensor:
    """HRA's regulariser ``‖ÛᵀÛ − I‖²_F`` over the normalised columns Û of u (a scalar)."""
    unit = u / u.norm(dim=0, keepdim=True)
    gram = unit.t() @ unit
    return (gram - torch.eye(gram.shape[0], device=u.device, dtype=gram.dtype)).pow(2).sum()


def init_hra_(u: torch.Tensor, symmetric: bool = True) -> None:
    """PEFT's init: even r pairs each column with a copy of itself, so ``H = I`` at the start."""
    with torch.no_grad():
        r = u.shape[1]
        if symmetric and r % 2 == 0:
            half = torch.empty(u.shape[0], r // 2, dtype=u.dtype, device=u.device)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u.copy_(half.repeat_interleave(2, dim=1))
        else:
            if symmetric:
                warnings.warn("HRA's symmetric (identity) initialisation needs an even r; using a random init")
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
