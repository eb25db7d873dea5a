"""DoRA's product ``z = drop(x) Wᵀ + s·(drop(x) Aᵀ) Bᵀ`` with its norm's parts, and its backward — LoRA's product
and factor gradients on ``drop(x)`` — shared by the Linear layer's Functions (:mod:`.function`).

Shapes: x ``[..., d_in]`` (N tokens), W ``[d_out, d_in]`` (dense, or a 4-bit handle dequantised right before each
use), A ``[r, d_in]``, B ``[d_out, r]``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...core.compute import add_product, cast, mm_scaled
from ...core.frozen import WeightOperand, is_quantized, materialize
from ...core.lowrank import dropout_keep_mask, factor_grads
from ...core.tracing import compiling
from .norm import factored_norm_parts, weight_row_norm_sq


def dora_product(xd: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 lead: tuple[int, ...]) -> torch.Tensor:
    """``z = xd Wᵀ + s·(xd Aᵀ) Bᵀ`` ``[*lead, d_out]`` (eagerly not a view: the sum lands in the base GEMM's output;
    under compile out of place, :func:`~slimtune.core.compute.add_product`) from the 2-D ``xd``; all in xd's dtype."""
    z = F.linear(xd.view(*lead, xd.shape[-1]), w)
    summed = add_product(z.view(-1, z.shape[-1]), F.linear(xd, a), b.t(), scaling)
    return summed.view(z.shape) if compiling() else z


def dropped_input(x2: torch.Tensor, dropout_p: float, seed: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(drop(x), keep mask or None)`` for the 2-D x; the mask is redrawn from ``seed`` (forward and backward)."""
    mask = dropout_keep_mask(x2, dropout_p, seed) if dropout_p > 0 else None
    return (x2 * mask if mask is not None else x2), mask


def product_forward(x: torch.Tensor, weight: WeightOperand, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, dropout_p: float, seed: Any, weight_sq: torch.Tensor | None, norm: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                               torch.Tensor | None]:
    """``(z, rest, W Aᵀ, A Aᵀ, ‖W‖²_row)``: the product ``z = drop(x) Wᵀ + s·(drop(x) Aᵀ) Bᵀ`` ``[..., d_out]``,
    ``rest = (x − drop(x)) Wᵀ`` (dropout only, else None) and the norm's parts (None for each without ``norm``: the
    vectors were formed ahead), W dequantised / cast once; the big GEMMs are queued before the norm's small ones."""
    dtype, lead, d_in = x.dtype, tuple(x.shape[:-1]), x.shape[-1]
    x2 = x.reshape(-1, d_in)
    a, b = cast(lora_a, dtype), cast(lora_b, dtype)
    xd, mask = dropped_input(x2, dropout_p, seed)
    w = materialize(weight, dtype)
    z = dora_product(xd, w, a, b, scaling, lead)
    mixed = gram = None
    if norm:
        if weight_sq is None:
            weight_sq = weight_row_norm_sq(w)
        mixed, gram = factored_norm_parts(w, a)
    rest = F.linear((x2 - xd).view(*lead, d_in), w) if mask is not None else None
    return z, rest, mixed, gram, weight_sq


def product_backward(ctx: Any, weight: WeightOperand, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     dz2: torch.Tensor | None, drest2: torch.Tensor | None,
                     needs: tuple[bool, bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dW, dA, dB)`` of the product (:class:`~.function.DoraProductFunction`'s docstring, line by line) from ``dz2``
    ``[N, d_out]`` (None: only rest got a gradient) and ``drest2`` (dropout only); ``ctx`` holds scaling,
    dropout_p and seed; ``needs``: which of x, W, A, B want a gradient."""
    need_x, need_w, need_a, need_b = needs
    s, dtype, p = ctx.scaling, x.dtype, ctx.dropout_p
    a, b = cast(lora_a, dtype), cast(lora_b, dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if dz2 is None:
        dz2 = torch.zeros(x2.shape[0], b.shape[0], dtype=dtype, device=x.device)
    dz2 = cast(dz2, dtype)
    drest2 = cast(drest2, dtype) if drest2 is not None else None
    grad_x = grad_w = grad_a = grad_b = grad_x2 = rest = None
    dya = mm_scaled(dz2, b, s) if (need_a or need_x) else None  # s·dz B, [N, r]
    if need_x:  # the big GEMMs first (a dequantised weight is dropped right after them)
        w = materialize(weight, dtype)
        grad_x2 = dz2 @ w
        rest = drest2 @ w if p > 0 and drest2 is not None else None
        del w
    xd, mask = dropped_input(x2, p, ctx.seed)
    grad_a, grad_b = factor_grads(dz2, xd, a, b, s, need_a, need_b, dy_up=dya)
    grad_a = cast(grad_a, lora_a.dtype) if grad_a is not None else None
    grad_b = cast(grad_b, lora_b.dtype) if grad_b is not None else None
    if need_x:
        grad_x2 = add_product(grad_x2, dya, a)
        if mask is not None:  # mask ⊙ (dz W + dya A) + (1 − mask) ⊙ drest W
            if rest is not None:
                grad_x2.sub_(rest).mul_(mask).add_(rest)
            else:
                grad_x2.mul_(mask)
        grad_x = grad_x2.view(x.shape)
    if need_w and not is_quantized(weight):
        grad_w = dz2.t() @ xd
        if mask is not None and drest2 is not None:
            grad_w.addmm_(drest2.t(), x2 - xd)
        grad_w = cast(grad_w, weight.dtype)
    return grad_x, grad_w, grad_a, grad_b


def as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])
