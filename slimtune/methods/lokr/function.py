"""LoKr's structured path on a Linear, as one autograd Function: ``y = x Wᵀ + b + (x (s·w1 ⊗ w2)ᵀ) ⊙ mask``.

With ``d_out = a_out·b_out``, ``d_in = a_in·b_in``, w1 ``[a_out, a_in]`` and w2 ``[b_out, b_in]`` (each a full
matrix or a low-rank product, built by the layer's ``LokrFactors``), x viewed ``[N, a_in, b_in]`` gives, per token,
``w1 X w2ᵀ`` — two small contractions, never the ``[d_out, d_in]`` Kronecker product. Which factor goes first
(``order``, :func:`~.math.kron_order`):

* ``"w2"``: ``t = X w2ᵀ`` (one GEMM over ``[N·a_in, b_in]``), then ``y3 += w1 t`` (a batched GEMM with w1
  broadcast, accumulating into y). Backward: ``u = w1ᵀ dy3``; ``dx += u w2``; ``dw2 = uᵀ X``;
  ``dw1 = Σ_n dy3[n] t[n]ᵀ`` with t recomputed.
* ``"w1"``: ``t = w1 X`` (batched), ``y += t w2ᵀ``. Backward: ``v = dy3 w2``; ``dx3 += w1ᵀ v``;
  ``dw1 = Σ_n v[n] X[n]ᵀ``; ``dw2 = dyᵀ (w1 X)`` recomputed.

``mask`` (rank dropout over output rows, ``[d_out]``, without s) multiplies the update's rows. Saved: x, the base
weight (a 4-bit base: only its handle, dequantised right before each GEMM that needs it) and the parameters —
nothing of size ``N·d`` — and the built ``s·w1``, ``w2`` (factor-sized) are kept for backward. This is the hot path
of a host-bound step, so it is one Function with direct tensor calls; the general structured machinery
(:class:`~slimtune.core.structured.StructuredFunction`) serves LoKr's convolutions. Reference: the dense
``x (W + s·kron(w1, w2))ᵀ`` (the tests, in float64).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...core.frozen import is_quantized, materialize, save_with_weight, saved_with_weight
from ...core.rebuild import keep_input, kept_input
from ...core.products import sum_bmm

#: ``(a_out, a_in, b_out, b_in, order)``: the factor shapes and which one contracts first
KronGeometry = tuple[int, int, int, int, str]


class KronLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + (x (s·w1 ⊗ w2)ᵀ) ⊙ mask``; see the module docstring. ``factors``: the layer's
    ``LokrFactors`` (``build`` / ``needs`` / ``grads``); ``s``: the scaling (a number); ``mask``: ``[d_out]`` in x's
    dtype, or None.

    Backward, with X = x viewed ``[N, a_in, b_in]``, ``dY = (dy ⊙ mask)`` viewed ``[N, a_out, b_out]`` and the update
    ``Y = w1 X w2ᵀ`` per token (w1 already times s) — line by line as the code does it:

    * ``dx = dy W`` first (the base's input gradient, the big GEMM);
    * order ``"w2"`` (forward made ``t = X w2ᵀ``): ``u = w1ᵀ dY`` ``[N, a_in, b_out]``; ``dx += u w2``;
      ``dw2 = Σ_n u[n]ᵀ X[n] = uᵀ X`` (one GEMM over ``[N·a_in, ·]``); ``dw1 = Σ_n dY[n] t[n]ᵀ`` with t recomputed;
    * order ``"w1"`` (forward made ``t = w1 X``): ``v = dY w2`` ``[N, a_out, b_in]``; ``dx += w1ᵀ v``;
      ``dw1 = Σ_n v[n] X[n]ᵀ``; ``dw2 = Σ_n dY[n]ᵀ (w1 X[n])`` with ``w1 X`` recomputed;
    * the parameters' gradients from ``(dw1, dw2)``: ``LokrFactors.grads`` (``d(s·w1)`` times s, then the low-rank
      or Tucker products' gradients);
    * ``dW = dyᵀ x`` only if W asks for one; ``db = Σ dy``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: KronGeometry, factors: Any, s: float, mask, *params):
        dtype = x.dtype
        a_out, a_in, b_out, b_in, order = geometry
        w1, w2 = factors.build([p if p.dtype == dtype else p.to(dtype) for p in params], s)
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        y = F.linear(x2, materialize(weight, dtype), bias if bias is None or bias.dtype == dtype else bias.to(dtype))
        if order == "w2":
            t = torch.mm(x2.reshape(n * a_in, b_in), w2.t()).view(n, a_in, b_out)
            if mask is None:
                y.view(n, a_out, b_out).baddbmm_(w1.expand(n, a_out, a_in), t)
            else:
                y.addcmul_(torch.bmm(w1.expand(n, a_out, a_in), t).view(n, -1), mask)
        else:
            t = torch.bmm(w1.expand(n, a_out, a_in), x2.reshape(n, a_in, b_in))  # [N, a_out, b_in]
            if mask is None:
                y.view(n * a_out, b_out).addmm_(t.view(n * a_out, b_in), w2.t())
            else:
                y.addcmul_(torch.mm(t.view(n * a_out, b_in), w2.t()).view(n, -1), mask)
        save_with_weight(ctx, weight, *keep_input(ctx, x), *params)  # x, or its recipe (core.rebuild)
        ctx.geometry, ctx.factors, ctx.s, ctx.mask = geometry, factors, s, mask  # mask: [d_out], no grad
        ctx.w12 = w1, w2  # factor-sized (a_out·a_in + b_out·b_in): kept rather than rebuilt in backward
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, saved = saved_with_weight(ctx)
        x, params = kept_input(ctx, saved)
        mask = ctx.mask
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need = ctx.needs_input_grad[7:]
        dtype, factors, s = x.dtype, ctx.factors, ctx.s
        a_out, a_in, b_out, b_in, order = ctx.geometry
        same_dtype = all(p.dtype == dtype for p in params)
        cast = params if same_dtype else [p.to(dtype) for p in params]
        w1, w2 = ctx.w12
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        dy2 = dy.reshape(n, -1)
        dy2 = (dy2 if dy2.dtype == dtype else dy2.to(dtype)).contiguous()
        grad_x2 = dy2 @ materialize(weight, dtype) if need_x else None  # the big GEMM first
        dy3 = (dy2 if mask is None else dy2 * mask).view(n, a_out, b_out)  # the update's output gradient
        need_1, need_2 = factors.needs(need)
        dw1 = dw2 = None
        if order == "w2":
            xv = x2.reshape(n * a_in, b_in)
            if need_x or need_2:
                u = torch.bmm(w1.t().expand(n, a_in, a_out), dy3).view(n * a_in, b_out)
                if need_x:
                    grad_x2.view(n * a_in, b_in).addmm_(u, w2)
                if need_2:
                    dw2 = u.t() @ xv
                del u
            if need_1:
                dw1 = sum_bmm(dy3, torch.mm(xv, w2.t()).view(n, a_in, b_out))
        else:
            x3 = x2.reshape(n, a_in, b_in)
            if need_x or need_1:
                v = torch.mm(dy3.view(n * a_out, b_out), w2).view(n, a_out, b_in)
                if need_x:
                    grad_x2.view(n, a_in, b_in).baddbmm_(w1.t().expand(n, a_in, a_out), v)
                if need_1:
                    dw1 = sum_bmm(v, x3)
                del v
            if need_2:
                dw2 = dy3.view(n * a_out, b_out).t() @ torch.bmm(w1.expand(n, a_out, a_in), x3).view(n * a_out, b_in)
        grads = factors.grads(dw1, dw2, cast, s, need)
        if not same_dtype:  # fp32 master factors: their gradients in fp32
            grads = [g if g is None else g.to(p.dtype) for g, p in zip(grads, params)]
        grad_x = grad_x2.view(x.shape) if need_x else None
        grad_w = (dy2.t() @ x2).to(weight.dtype) if need_w and not is_quantized(weight) else None
        grad_b = dy2.sum(0).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, *grads
