"""Sibling low-rank layers that read the same input — q/k/v, gate/up — as one autograd Function.

For members ``i = 1..n`` with frozen ``W_i`` ``[d_i, d_in]``, optional bias ``b_i`` ``[d_i]``, ``A_i`` ``[r_i, d_in]``,
``B_i`` ``[d_i, r_i]`` and one scaling ``s``, on one input x ``[..., d_in]`` (N tokens)::

    y_i = x W_iᵀ + b_i + s·(x A_iᵀ) B_iᵀ

which is :class:`~slimtune.core.lowrank.LowRankLinearFunction` n times, without dropout (a member's dropout draws its
own mask: no shared product). What one Function saves over n: the ``x Aᵀ`` products as one GEMM against the stacked
``A = [A_1; …; A_n]`` ``[R, d_in]`` (``R = Σ r_i``), one ``dx`` buffer that every member's terms accumulate into (autograd
would sum n gradients), one ``dA`` GEMM split by rows, and n−1 fewer Functions — on a host-bound step (a few thousand
tokens on the lent machines) each Function and op is host time. It saves what the n Functions save: x (once), the
parameters, no ``x Aᵀ``; the stacked A is rebuilt in backward rather than kept. A 4-bit ``W_i`` is a handle,
dequantised right before each GEMM that needs it.

Backward, with ``dy_i`` ``[N, d_i]`` (None for an output nobody used: that member gets no gradients, as its own
Function would not have run), ``g = s·[dy_1 B_1, …, dy_n B_n]`` ``[N, R]`` and ``h = s·x Aᵀ`` ``[N, R]``::

    dx = Σ_i dy_i W_i + g A        dA = gᵀ x (split by rows)        dB_i = dy_iᵀ h_i        db_i = Σ_tokens dy_i

:func:`grouped_lowrank_reference` is the plain composition (each member through PyTorch's own autograd).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .compute import add_product, cast, mm_scaled
from .frozen import WeightOperand, is_quantized, materialize
from .rebuild import keep_input, kept_input

Grad = torch.Tensor | None


def stacked_downs(downs: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[A_1; …; A_n]`` ``[R, d_in]`` in ``dtype``."""
    return torch.cat([cast(a, dtype) for a in downs]) if len(downs) > 1 else cast(downs[0], dtype)


class GroupedLowRankFunction(torch.autograd.Function):
    """``(y_1, …, y_n)`` of the module docstring from one x. Arguments: x, the scaling, the member count n, a callback
    run at the end of backward (or None), then the n weights (dense or 4-bit handles), the n biases (None allowed),
    the n A's and the n B's."""

    @staticmethod
    def forward(ctx, x, scaling: float, count: int, on_backward: Callable[[], None] | None, *operands):
        weights, biases = operands[:count], operands[count:2 * count]
        downs, ups = operands[2 * count:3 * count], operands[3 * count:]
        dtype, lead = x.dtype, x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        outputs, start, h = [], 0, None
        for weight, bias, down, up in zip(weights, biases, downs, ups):
            y = F.linear(x2, materialize(weight, dtype), bias)  # the first base GEMM is queued before the rest
            if h is None:
                h = F.linear(x2, stacked_downs(downs, dtype))  # x Aᵀ of every member, [N, R]
            rank = down.shape[0]
            y = add_product(y, h[:, start:start + rank], cast(up, dtype).t(), scaling)
            start += rank
            outputs.append(y.view(*lead, y.shape[-1]))
        ctx.set_materialize_grads(False)
        ctx.handles = tuple(w if is_quantized(w) else None for w in weights)
        dense = (None if is_quantized(w) else w for w in weights)
        ctx.save_for_backward(*keep_input(ctx, x), *dense, *downs, *ups)  # x, or its recipe (core.rebuild)
        ctx.scaling, ctx.count, ctx.on_backward = scaling, count, on_backward
        ctx.has_bias = tuple(b is not None for b in biases)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        count = ctx.count
        x, saved = kept_input(ctx, ctx.saved_tensors)  # x, or rebuilt from its recipe (core.rebuild)
        weights = [handle if handle is not None else w for handle, w in zip(ctx.handles, saved[:count])]
        downs, ups = saved[count:2 * count], saved[2 * count:]
        needs = ctx.needs_input_grad
        need_w, need_bias = needs[4:4 + count], needs[4 + count:4 + 2 * count]
        need_a, need_b = needs[4 + 2 * count:4 + 3 * count], needs[4 + 3 * count:]
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        dys = [cast(g.reshape(x2.shape[0], g.shape[-1]), dtype) if g is not None else None for g in grads]
        grad_x, grad_w, grad_a, grad_b = grouped_product_backward(
            x2, weights, downs, ups, ctx.scaling, dys.__getitem__, (needs[0], need_w, need_a, need_b))
        grad_bias = [dy.sum(0) if dy is not None and need and has else None
                     for dy, need, has in zip(dys, need_bias, ctx.has_bias)]
        if ctx.on_backward is not None:
            ctx.on_backward()
        return (grad_x.view(x.shape) if grad_x is not None else None, None, None, None,
                *grad_w, *grad_bias, *grad_a, *grad_b)


def grouped_product_backward(x2: torch.Tensor, weights: Sequence[WeightOperand], downs: Sequence[torch.Tensor],
                             ups: Sequence[torch.Tensor], scaling: float,
                             grad_of: Callable[[int], torch.Tensor | None],
                             needs: tuple[bool, Sequence[bool], Sequence[bool], Sequence[bool]],
                             h: torch.Tensor | None = None, a_cat: torch.Tensor | None = None,
                             h_scaled: bool = False) -> tuple[Grad, list[Grad], list[Grad], list[Grad]]:
    """``(dx [N, d_in], dW_i, dA_i, dB_i)`` of ``y_i = x W_iᵀ + s·(x A_iᵀ) B_iᵀ`` (the module docstring's backward,
    biases aside), member by member: ``grad_of(i)`` gives member i's output gradient ``[N, d_i]`` in x's dtype (None:
    that member gets no gradients) only when its turn comes, and nothing here holds it past its turn — a caller that
    forms it (DoRA's ``g·dy``) keeps one such buffer alive at a time. ``needs``: ``(need_x, need_w, need_a, need_b)``,
    the last three per member. ``h``: ``x Aᵀ`` ``[N, R]`` (``s·x Aᵀ`` with ``h_scaled``), and ``a_cat``: the stacked A in
    x's dtype, when the caller already formed them (else ``s·x Aᵀ`` is formed here, for ``dB``). The first member's
    ``dx`` GEMM, the largest, is queued first."""
    need_x, need_w, need_a, need_b = needs
    count, dtype, tokens = len(weights), x2.dtype, x2.shape[0]
    ranks = [a.shape[0] for a in downs]
    grad_w: list[Grad] = [None] * count
    grad_a: list[Grad] = [None] * count
    grad_b: list[Grad] = [None] * count
    g = x2.new_empty(tokens, sum(ranks)) if need_x or any(need_a) else None  # s·dy_i B_i side by side, [N, R]
    dx, seen, start = None, [False] * count, 0
    for i, (weight, up, rank) in enumerate(zip(weights, ups, ranks)):
        dy = grad_of(i)
        if dy is None:
            if g is not None:
                g[:, start:start + rank].zero_()
            start += rank
            continue
        seen[i] = True
        if need_x:
            w = materialize(weight, dtype)
            dx = dy @ w if dx is None else add_product(dx, dy, w)
            del w
        if g is not None:
            mm_scaled(dy, cast(up, dtype), scaling, out=g[:, start:start + rank])
        if need_b[i]:
            if h is None:
                a_cat = a_cat if a_cat is not None else stacked_downs(downs, dtype)
                h, h_scaled = mm_scaled(x2, a_cat.t(), scaling), True
            h_i = h[:, start:start + rank]
            grad_b[i] = cast(dy.t() @ h_i if h_scaled else mm_scaled(dy.t(), h_i, scaling), up.dtype)
        if need_w[i] and not is_quantized(weight):
            grad_w[i] = cast(dy.t() @ x2, weight.dtype)
        del dy
        start += rank
    if not any(seen):
        return None, grad_w, grad_a, grad_b
    if dx is not None or any(need_a):
        a_cat = a_cat if a_cat is not None else stacked_downs(downs, dtype)
    if dx is not None:
        dx = add_product(dx, g, a_cat)
    if any(need_a):
        pieces = (g.t() @ x2).split_with_sizes(ranks)  # the method: Tensor.split is a Python wrapper
        grad_a = [cast(p, a.dtype) if need and done else None
                  for p, a, need, done in zip(pieces, downs, need_a, seen)]
    return dx, grad_w, grad_a, grad_b


def grouped_lowrank_linear(x: torch.Tensor, weights: Sequence[WeightOperand], biases: Sequence[torch.Tensor | None],
                           downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], scaling: float,
                           on_backward: Callable[[], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Apply :class:`GroupedLowRankFunction`: each member's ``x W_iᵀ + b_i + s·(x A_iᵀ) B_iᵀ`` ``[..., d_i]``. Dense
    weights and biases must already be in x's dtype (4-bit handles are dequantised to it); A and B in any float
    dtype (cast for the GEMMs, gradients in theirs). ``on_backward`` runs at the end of the Function's backward."""
    if not (len(weights) == len(biases) == len(downs) == len(ups)) or not weights:
        raise ValueError("grouped_lowrank_linear needs one weight, bias (or None), A and B per member")
    return GroupedLowRankFunction.apply(x, scaling, len(weights), on_backward, *weights, *biases, *downs, *ups)


def grouped_lowrank_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                              biases: Sequence[torch.Tensor | None], downs: Sequence[torch.Tensor],
                              ups: Sequence[torch.Tensor], scaling: float) -> tuple[torch.Tensor, ...]:
    """Each member's ``x W_iᵀ + b_i + s·(x A_iᵀ) B_iᵀ`` through PyTorch's own autograd."""
    return tuple(F.linear(x, w, b) + scaling * F.linear(F.linear(x, a), up)
                 for w, b, a, up in zip(weights, biases, downs, ups))
