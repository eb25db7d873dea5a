"""The LoRA training path for a dense base weight, as one autograd Function.

``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with x ``[..., d_in]``, W ``[d_out, d_in]`` (frozen), A ``[r, d_in]``,
B ``[d_out, r]``.

What it saves for backward: x itself (the very tensor object, so q/k/v projections that share an input store
it once), the parameters (no copies), and for dropout an integer seed from which backward redraws the mask —
never ``x Aᵀ``, never a dropped copy of x, never an fp32 copy. A 4-bit base (``weight`` a
:class:`~slimtune.quant.frozen.QuantizedWeight` handle) is dequantised right before each GEMM that needs it
(forward, and ``dx`` in backward) and dropped after; only the handle is kept. All GEMMs run in x's dtype (bf16 GEMMs
accumulate in fp32); fp32 master adapter weights are cast for the GEMM and their gradients returned in fp32.

Backward has two ways to get dA and dB (RunLoRA's choice by FLOP count, :func:`choose_backward`):
``"recompute"`` rebuilds ``x Aᵀ`` (``[N, r]``) and works with thin GEMMs; ``"gram"`` forms ``G = dyᵀ x``
(``[d_out, d_in]``) once and projects it, which is cheaper only when tokens vastly outnumber a small layer's
size. The plain composition in :func:`slimtune.adapters.lora.lora_linear_reference` is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.frozen import WeightOperand, is_quantized, materialize, save_with_weight, saved_with_weight

Variant = str  # "recompute" | "gram"


def backward_flops(variant: Variant, tokens: int, d_in: int, d_out: int, r: int) -> int:
    """FLOPs to get dA and dB (dx is the same for both variants)."""
    if variant == "recompute":
        # x Aᵀ, dyᵀ(xAᵀ), dy B, (dyB)ᵀ x
        return 2 * tokens * r * (2 * d_in + 2 * d_out)
    if variant == "gram":
        # G = dyᵀ x, G Aᵀ, Bᵀ G, plus dy B for dx's adapter term
        return 2 * d_out * d_in * (tokens + 2 * r) + 2 * tokens * d_out * r
    raise ValueError(f"unknown LoRA backward variant {variant!r}")


def choose_backward(tokens: int, d_in: int, d_out: int, r: int) -> Variant:
    """The backward variant with fewer FLOPs (ties go to ``"recompute"``, which allocates less)."""
    return min(("recompute", "gram"), key=lambda v: backward_flops(v, tokens, d_in, d_out, r))


def dropout_keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The scaled keep mask ``bernoulli(1 - p) / (1 - p)`` for ``like``, redrawable from ``seed``."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p, generator=gen)
    return mask.mul_(1.0 / (1.0 - p))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s`` in place, skipped for s = 1 (alpha = r, the common case)."""
    return t if s == 1.0 else t.mul_(s)


class LoraLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``; see the module docstring for what is saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, seed: int):
        dtype = x.dtype
        a, b = _cast(lora_a, dtype), _cast(lora_b, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 * dropout_keep_mask(x2, dropout_p, seed) if dropout_p > 0 else x2
        xa = xd @ a.t()  # [N, r]
        y = F.linear(x2, materialize(weight, dtype), bias)
        y.addmm_(xa, b.t(), alpha=scaling)
        save_with_weight(ctx, weight, x, lora_a, lora_b)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, (x, lora_a, lora_b) = saved_with_weight(ctx)
        s, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dtype = x.dtype
        a, b = _cast(lora_a, dtype), _cast(lora_b, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = _cast(dy.reshape(-1, dy.shape[-1]), dtype)
        mask = dropout_keep_mask(x2, p, ctx.seed) if p > 0 and (need_a or need_b or need_x) else None
        xd = x2 * mask if mask is not None else x2

        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        dya = None  # s · dy B, [N, r]
        if need_a or need_b or need_x:
            dya = _scaled(dy2 @ b, s)
        grad_x2 = dy2 @ materialize(weight, dtype) if need_x else None  # the big GEMM first: the device works
        if need_a or need_b:                                              # while the host queues the small ones
            tokens, d_in = x2.shape
            if choose_backward(tokens, d_in, dy2.shape[1], a.shape[0]) == "gram":
                gram = dy2.t() @ xd  # [d_out, d_in]
                if need_b:
                    grad_b = _scaled(gram @ a.t(), s)
                if need_a:
                    grad_a = _scaled(b.t() @ gram, s)
                del gram
            else:
                if need_b:
                    grad_b = _scaled(dy2.t() @ (xd @ a.t()), s)
                if need_a:
                    grad_a = dya.t() @ xd
            grad_a = _cast(grad_a, lora_a.dtype) if grad_a is not None else None
            grad_b = _cast(grad_b, lora_b.dtype) if grad_b is not None else None
        del xd
        if need_x:
            if mask is None:
                grad_x2.addmm_(dya, a)
            else:
                grad_x2.add_((dya @ a).mul_(mask))
            grad_x = grad_x2.view(x.shape)
        if need_w and not is_quantized(weight):
            grad_w = dy2.t() @ x2
        if need_bias and ctx.has_bias:
            grad_bias = dy2.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def lora_linear(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Apply :class:`LoraLinearFunction`. A dense ``weight`` and ``bias`` must already be in x's dtype; a
    quantised ``weight`` is dequantised to it."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
