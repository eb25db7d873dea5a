"""LoHa folded on a dense Linear as one autograd Function over the two Triton kernels — the GPU hot path.

Imports triton (through :mod:`.triton_kernels`): reached only behind :func:`~slimtune.core.triton.use_triton`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.rebuild import keep_input, kept_input
from .triton_kernels import fold, fold_grads


class FusedLohaLinear(torch.autograd.Function):
    """LoHa's folded path on a dense Linear, as one autograd Function over the two kernels — the GPU hot path.

    ``y = x (W + ΔW)ᵀ + b``: forward :func:`fold` then one GEMM; backward ``G = dyᵀx``, :func:`fold_grads` (the
    four factor gradients and ``W'`` in one launch), ``dx = dy W'``. Saves x, W and the factors only (what
    :class:`~slimtune.core.structured.FoldedFunction` saves); ``W'`` lives only inside forward and backward.
    The generic path (``FoldedFunction`` with ``LohaFoldOp``) computes the same; this one skips its layers of
    Python, which a host-bound step pays per layer. W (``[d_out, d_in]``, x's dtype, frozen) and b must already be
    in x's dtype; fp32 factors are cast for the kernels and their gradients returned in fp32. ``scale``: the
    number ``s`` or ``s · mask`` ``[d_out]`` (S below).

    Backward, with ``W' = W + (S·w1a w1b) ⊙ (w2a w2b) = W + W1 ⊙ W2`` — as the code does it:

    * ``G = dyᵀ x`` ``[d_out, d_in]``: the gradient with respect to W' (``y = x W'ᵀ``);
    * one kernel (:func:`fold_grads`): ``dW1 = G ⊙ W2``, ``dW2 = G ⊙ W1`` tile by tile, then the low-rank products'
      gradients ``dw1a = S·(G ⊙ W2) w1bᵀ``, ``dw1b = (S·w1a)ᵀ (G ⊙ W2)``, ``dw2a = (G ⊙ W1) w2bᵀ``,
      ``dw2b = w2aᵀ (G ⊙ W1)`` — and, when x needs a gradient, W' written on the way;
    * ``dx = dy W'``; ``db = Σ dy``. W is frozen: no ``dW``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, w1a, w1b, w2a, w2b):
        dtype = x.dtype
        factors = [f if f.dtype == dtype else f.to(dtype) for f in (w1a, w1b, w2a, w2b)]
        y = F.linear(x, fold(weight, *factors, scale), bias)
        ctx.save_for_backward(*keep_input(ctx, x), weight, w1a, w1b, w2a, w2b)  # x, or its recipe (core.rebuild)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, (weight, *params) = kept_input(ctx, ctx.saved_tensors)
        dtype = x.dtype
        need_x = ctx.needs_input_grad[0]
        factors = [p if p.dtype == dtype else p.to(dtype) for p in params]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != dtype:
            dy2 = dy2.to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        *grads, w_eff = fold_grads(dy2.t() @ x2, *factors, ctx.scale, w=weight if need_x else None)
        grad_x = (dy2 @ w_eff).view(x.shape) if need_x else None
        grad_b = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grads = [g if p.dtype == dtype and wanted else (g.to(p.dtype) if wanted else None)
                 for g, p, wanted in zip(grads, params, ctx.needs_input_grad[4:])]
        return grad_x, None, grad_b, None, *grads
