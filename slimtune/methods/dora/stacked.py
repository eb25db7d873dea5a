"""A DoRA chain on stacked rows, for compiled layers: q/k/v, gate/up (or one layer alone: o, down) whose frozen
weights and A's are one tensor ``S = [W_1; …; W_n; A_1; …; A_n]`` ``[Σd + R, d_in]``
(:mod:`slimtune.core.stacked_rows`), so that the chain's GEMMs are LoRA's stacked ones plus one for every member's
norm.

For members ``i = 1..n`` (no bias, no dropout, one scaling s, outputs in bf16 / fp32 / fp64) each output is what
:class:`~.function.DoraLinearFunction` computes, ``y_i = g_i ⊙ z_i``, ``z_i = x W_iᵀ + s·(x A_iᵀ) B_iᵀ``,
``g_i = m'_i / ‖W_i + s·B_i A_i‖_row`` (the norm a constant, the magnitude floor m' of :mod:`.function`)::

    out = x Sᵀ        [N, Σd + R]   every base output, then h = x Aᵀ                        (1 GEMM)
    P   = S Aᵀ        [Σd + R, R]   every W_i A_jᵀ, then every A_i A_jᵀ, in fp32; the norm
                                    parts of member i are its diagonal blocks                (1 GEMM)
    y_i = g_i ⊙ (out_i + s·h_i B_iᵀ)              [h_1 B_1ᵀ, …] = h blockdiag(B_i)ᵀ            (1 GEMM)

    dz_i = g_i ⊙ dy_i      dm_i = Σ_tokens dy_i ⊙ y_i / m'_i    (y / m' = z / ‖V‖: the output route)
    g = s·[dz_1 B_1, …, dz_n B_n] = s·[dz_1, …, dz_n] blockdiag(B_i)   [N, R]                  (1 GEMM)
    dB_i = s·dz_iᵀ h_i      dA = gᵀ x      dx = [dz_1, …, dz_n] W + g A                        (n + 1 + 2 GEMMs)

(for a chain of one, ``g = s·dy_1 (g_1 ⊙ B_1)`` and ``dB_1 = g_1 ⊙ s·dy_1ᵀ h_1`` from dy_1, so that dz_1 is read by
``dx`` only: :func:`~slimtune.core.stacked_rows.rows_backward` given the ``g_i`` as scales)

(``dx`` one GEMM, ``[dz, g] S``, for a chain of one; the block diagonals: the products only while traced, as
:func:`~slimtune.core.stacked_rows.block_factor`.) A DoRA Linear's own Function runs five GEMMs forward (base,
``x Aᵀ``, ``(x Aᵀ) Bᵀ``, ``W Aᵀ``, ``A Aᵀ``) and five backward: a compiled q/k/v chain runs 3 + 7 here against
15 + 15, a Llama layer 12 + 21 against 35 + 35 (Inductor's CPU code, RESULTS.md run 166), on a step bound by the
host's launches. ``P``'s off-diagonal blocks are computed and dropped: ``(Σd + R)·R·d_in`` multiply-adds where the
blocks need ``Σ (d_i + r_i)·r_i·d_in`` (q/k/v at r = 32: three times as many, a few microseconds of a GPU), one
launch where there were 2n. ``‖W_i‖²_row`` is formed from S each step (Inductor: one reduction a chain).

Only while ``torch.compile`` traces (:meth:`~.module.DoraLinear.run_together`, :meth:`~.module.DoraLinear.forward`):
there the partitioner decides what the step keeps, Inductor fuses the vectors, the tails and the sums, and the
eager path's Triton kernels, step vectors formed ahead and output probe do not apply. Eagerly (the tests) the same
plain-PyTorch code runs. Saved: x, S, the B's, the ``[4, d_i]`` vectors, h and, for ``dm``, the outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ...core.compute import accumulate_type, add_as_views, cast, scaled_product
from ...core.stacked_rows import block_factor, rows_backward
from ...core.tracing import compiling, distinct_when_traced
from ..lora.linear import LoraLinear
from .compose import compose_forward_reference
from .norm import dora_vectors_reference, magnitude_floor, mm_acc, saves_output, weight_row_norm_sq


def chain_vectors(rows: torch.Tensor, widths: Sequence[int], ups: Sequence[torch.Tensor],
                  magnitudes: Sequence[torch.Tensor], scaling: float, eps: float) -> list[torch.Tensor]:
    """Each member's ``[4, d_i]`` vectors ``(g − 1, g, 1/‖V‖, 1/m')`` (:func:`~.norm.dora_vectors_reference`), fp32
    (fp64 for fp64), from the rows ``S`` ``[Σd + R, d_in]``: one GEMM ``S Aᵀ`` for every member's norm parts, and
    ``‖W‖²_row`` of S's weight rows."""
    total = sum(widths)
    # [Σd + R, R]: W_i A_jᵀ, then A_i A_jᵀ; upcast first where no GEMM writes fp32 (the CPU), as A Aᵀ alone is
    parts = mm_acc(rows, rows[total:].t(), accumulate_type(rows.dtype), small=True)
    weight_sq = weight_row_norm_sq(rows[:total])
    vectors, start, col = [], 0, 0
    for width, up, magnitude in zip(widths, ups, magnitudes):
        rank = up.shape[1]
        mixed = parts[start:start + width, col:col + rank]
        gram = parts[total + col:total + col + rank, col:col + rank]
        vectors.append(dora_vectors_reference(mixed, gram, up, weight_sq[start:start + width], magnitude, scaling,
                                              eps))
        start, col = start + width, col + rank
    return vectors


class StackedDoraFunction(torch.autograd.Function):
    """``(y_1, …, y_n)`` of the module docstring from one x ``[..., d_in]``. Arguments: x, the scaling, a callback run
    at the end of backward (or None), the member widths ``d_i`` (a tuple), the magnitude floor ε, then the n A's
    (views of the rows: passed so that their gradients reach them), the n B's, the n magnitudes ``[d_i]`` and the
    rows S."""

    @staticmethod
    def forward(ctx, x, scaling: float, on_backward: Callable[[], None] | None, widths: tuple[int, ...], eps: float,
                *tensors):
        count = len(widths)
        ups, magnitudes, rows = tensors[count:2 * count], tensors[2 * count:3 * count], tensors[-1]
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        total, ranks = sum(widths), tuple(up.shape[1] for up in ups)
        out = F.linear(x2, rows)  # [N, Σd + R]
        h = out[:, total:].contiguous()  # its own buffer: kept for dB (a saved view would keep all of out)
        vectors = chain_vectors(rows, widths, ups, magnitudes, scaling, eps)
        traced = compiling()
        # traced: the products (one GEMM against the B's block diagonal for a chain), then sums Inductor fuses
        # into the tails' kernels
        products = (scaled_product(h, block_factor(ups, x.dtype).t(), scaling).split_with_sizes(widths, dim=1)
                    if traced and count > 1 else [None] * count)
        outputs = []
        for base, h_i, up, vec, product in zip(out[:, :total].split_with_sizes(widths, dim=1),
                                               h.split_with_sizes(ranks, dim=1), ups, vectors, products):
            up_t = cast(up, x.dtype).t()
            if product is None and traced:
                product = scaled_product(h_i, up_t, scaling)
            z = add_as_views(base, product) if traced else torch.addmm(base, h_i, up_t, alpha=scaling)
            # the very tensor saved and returned (a returned view of a saved tensor is refused by Dynamo)
            outputs.append(distinct_when_traced(compose_forward_reference(z, vec[0], g=vec[1]).view(*lead, -1)))
        ctx.set_materialize_grads(False)
        ctx.scaling, ctx.on_backward, ctx.widths = scaling, on_backward, widths
        ctx.magnitude_shapes = tuple(m.shape for m in magnitudes)
        ctx.save_for_backward(x, rows, h, *ups, *vectors, *outputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        widths, scaling = ctx.widths, ctx.scaling
        count = len(widths)
        x, rows, h, *rest = ctx.saved_tensors
        ups, vectors, outputs = rest[:count], rest[count:2 * count], rest[2 * count:]
        needs = ctx.needs_input_grad  # x, scaling, on_backward, widths, eps, A's, B's, magnitudes, rows
        used = [g is not None for g in grads]  # an unused output: its member gets no gradients, as alone
        if not any(used):
            return (None,) * (6 + 3 * count)
        dtype, x2 = x.dtype, x.reshape(-1, x.shape[-1])
        acc = accumulate_type(dtype)
        dys, grad_m = [], []
        for grad, y, vec, width, shape, use, need in zip(grads, outputs, vectors, widths, ctx.magnitude_shapes, used,
                                                         needs[5 + 2 * count:5 + 3 * count]):
            dy = cast(grad.reshape(-1, width), dtype) if use else x2.new_zeros(x2.shape[0], width)
            dys.append(dy)
            # dm = Σ dy ⊙ y / m' (compose_backward_reference's sums, with base = y); dz = g ⊙ dy: in rows_backward
            grad_m.append((dy.to(acc) * y.reshape(-1, width).to(acc)).sum(0).mul(vec[3]).view(shape)
                          if use and need else None)
        dx, grad_a, grad_b = rows_backward(dys, used, x2, h, rows, ups, scaling, needs[0], needs[5:5 + count],
                                           needs[5 + count:5 + 2 * count], scales=[vec[1] for vec in vectors])
        if ctx.on_backward is not None:
            ctx.on_backward()
        return (dx.view(x.shape) if dx is not None else None, None, None, None, None, *grad_a, *grad_b, *grad_m, None)


def runs_on_rows(chain: Sequence[Any], x: torch.Tensor) -> bool:
    """Whether ``chain``, stacked on rows in x's dtype, runs :class:`StackedDoraFunction` for x in the compute dtype:
    as LoRA's chains do (:meth:`~slimtune.methods.lora.linear.LoraLinear.runs_on_rows`), in a dtype whose output
    stands in for z (:func:`~.norm.saves_output`: bf16, fp32, fp64)."""
    return saves_output(None, x.dtype) and LoraLinear.runs_on_rows(chain, x)


def stacked_dora_linear(x: torch.Tensor, chain: Sequence[Any], rows: torch.Tensor,
                        on_backward: Callable[[], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Every member's DoRA output ``[..., d_i]`` through :class:`StackedDoraFunction` for a chain stacked on
    ``rows`` (:func:`~slimtune.core.stacked_rows.runs_stacked`; the members share one scaling)."""
    return StackedDoraFunction.apply(x, chain[0].scaling, on_backward, tuple(m.out_features for m in chain),
                                     magnitude_floor(x.dtype), *[m.lora_A for m in chain], *[m.lora_B for m in chain],
                                     *[m.magnitude for m in chain], rows)
