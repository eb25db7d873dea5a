"""LoKr's math as plain functions: PEFT's / LyCORIS's factor shapes, the Kronecker product as PEFT forms it, the
dense update (merge and tests only), PEFT's inits, and the cost counts for the structured / folded choice."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...core.costs import Cost, Path, folded_cost

LOKR_INITS = (True, False, "lycoris")


def is_lokr_init(value: object) -> bool:
    """PEFT's LoKr ``init_weights`` values: true, false or ``"lycoris"``."""
    return isinstance(value, bool) or value == "lycoris"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's / LyCORIS's split ``dimension = m · n``.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension / factor)`` as is. Otherwise
    the divisors ``m`` are walked upwards from 1 while ``m < n`` and ``m ≤ factor`` (``-1``: no bound, giving
    the pair nearest the square root); the result is ordered ``m ≤ n``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt > bound:
            break
        m, n = nxt, dimension // nxt
    return (m, n) if m <= n else (n, m)


def lokr_shapes(d_out: int, d_in: int, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((a_out, a_in), (b_out, b_in))``: the shapes of w1 and (without kernel) w2."""
    a_out, b_out = factorization(d_out, factor)
    a_in, b_in = factorization(d_in, factor)
    return (a_out, a_in), (b_out, b_in)


def lokr_uses_full(r: int, w1_shape: tuple[int, int], w2_shape: tuple[int, int], decompose_both: bool
                   ) -> tuple[bool, bool]:
    """PEFT's rule: w1 is low-rank only with ``decompose_both`` and ``r < max(w1's sides) / 2``; w2 is
    low-rank when ``r < max(w2's sides) / 2`` (kernel not counted)."""
    full_w1 = not (decompose_both and r < max(w1_shape) / 2)
    full_w2 = not (r < max(w2_shape) / 2)
    return full_w1, full_w2


def kron_weight(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``torch.kron(w1, w2)`` the way PEFT forms it (w1 gets two unit dims when w2 is 4-D)."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def lokr_delta_weight(w1: torch.Tensor, w2: torch.Tensor, scaling: float, shape: torch.Size | tuple[int, ...]
                      ) -> torch.Tensor:
    """The dense ``s · w1 ⊗ w2`` in the base weight's ``shape``, float32 or wider. Merge and tests only."""
    dtype = torch.promote_types(w1.dtype, torch.float32)
    return (kron_weight(w1.to(dtype), w2.to(dtype)) * scaling).reshape(shape)


def init_lokr_(params: dict[str, nn.Parameter], init_weights: bool | str) -> None:
    """PEFT's inits. ``True``: w1 (or w1_a) zero, the rest kaiming-uniform (a=√5); ``False``: all random;
    ``"lycoris"``: w2 (or w2_b) zero, the rest random."""
    zero = {True: {"lokr_w1", "lokr_w1_a"}, False: set(), "lycoris": {"lokr_w2", "lokr_w2_b"}}[init_weights]
    with torch.no_grad():
        for name, p in params.items():
            if name in zero:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def kron_order(a_out: int, a_in: int, b_out: int, b_in: int) -> tuple[str, int]:
    """Which factor of ``x·(w1 ⊗ w2)ᵀ`` to contract first, and the multiply-adds per token.

    ``"w2"``: ``[a_in, b_in] → [a_in, b_out] → [a_out, b_out]``, ``a_in·b_in·b_out + a_out·a_in·b_out``;
    ``"w1"``: ``[a_in, b_in] → [a_out, b_in] → [a_out, b_out]``, ``a_out·a_in·b_in + a_out·b_in·b_out``."""
    w2_first = a_in * b_in * b_out + a_out * a_in * b_out
    w1_first = a_out * a_in * b_in + a_out * b_in * b_out
    return ("w2", w2_first) if w2_first <= w1_first else ("w1", w1_first)


def lokr_costs(tokens: int, a_out: int, a_in: int, b_out: int, b_in: int, itemsize: int,
               backward: bool, conv: bool = False) -> dict[Path, Cost]:
    """LoKr (``d_out = a_out·b_out``, ``d_in = a_in·b_in``; for a convolution ``b_in`` includes the kernel).

    Structured: two small contractions per token (:func:`kron_order`; a convolution always convolves with w2
    first); a Linear's backward recomputes them and runs two more of each (about 3x the forward), a convolution's
    runs w2's convolution's backward at input ``w1 X`` (its adjoint and its weight gradient in one call, over
    ``B·a_out`` images: :class:`~.ops.LokrConvOp`) and w1's contraction three times (``w1 X``, ``dx``, ``dw1``,
    each over about ``b_out`` channels: the kernel is not in them). Folded: ``torch.kron`` and the add (4 dense
    passes)."""
    order, macs = kron_order(a_out, a_in, b_out, b_in)
    if conv:
        order, macs = "w2", a_in * b_in * b_out + a_out * a_in * b_out
    mid = a_in * b_out if order == "w2" else a_out * b_in
    d_out, d_in = a_out * b_out, a_in * b_in
    flops = 2 * tokens * macs
    moved = tokens * (2 * mid + 3 * d_out)
    if backward:
        flops += 2 * tokens * (2 * a_out * b_in * b_out + 3 * a_out * a_in * b_out if conv else 3 * macs)
        moved += tokens * (6 * mid + 2 * d_out + d_in)
    structured = Cost(flops, moved * itemsize)
    folded = folded_cost(tokens, d_in, d_out, d_in * d_out, 4, 6, itemsize, backward)
    return {"structured": structured, "folded": folded}
