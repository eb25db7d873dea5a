"""DoRA Linear layers of one parent that read the same input — q/k/v, gate/up — as one autograd Function
(:mod:`slimtune.core.siblings` decides when they run together; LoRA's version is :mod:`slimtune.core.lowrank_group`).

For members ``i = 1..n`` with frozen ``W_i`` ``[d_i, d_in]``, optional bias ``b_i``, ``A_i`` ``[r_i, d_in]``, ``B_i``
``[d_i, r_i]``, magnitude ``m_i`` and one scaling ``s``, on one input x ``[..., d_in]`` (N tokens), each member computes
what :class:`~.function.DoraLinearFunction` computes::

    y_i = g_i ⊙ z_i + b_i,   z_i = x W_iᵀ + s·(x A_iᵀ) B_iᵀ,   g_i = m_i / ‖W_i + s·B_i A_i‖_row

with the same kernels per member (the norm's GEMMs ``W_i A_iᵀ`` and ``A_i A_iᵀ``, one vectors-and-compose launch each
way), and shares what the members have in common:

* forward: ``x Aᵀ`` of every member as one GEMM against the stacked ``A = [A_1; …; A_n]`` ``[R, d_in]``;
* backward: each member's tail (``dz_i = g_i·dy_i``, ``dm_i``, ``db_i``; for the ``"recompute"`` route ``z_i`` rebuilt
  first, from the same stacked ``x Aᵀ``, which ``dB`` then reuses) and then the product's gradients of all members
  through :func:`~slimtune.core.lowrank_group.grouped_product_backward` — one ``dx`` buffer, one ``dA`` GEMM — one member
  at a time, so a single ``[N, d_i]`` ``dz`` buffer is alive at once;
* one autograd node instead of n.

Each member keeps its own route (:func:`~.function.backward_route`; ``"auto"`` makes q and k recompute while v keeps
its output): ``"output"`` saves the member's output, ``"recompute"`` nothing of size ``[N, d_i]``, None (a frozen
magnitude) no ``dm``. The ``"z"`` route (a bias, fp16, dropout) and dropout are not taken here: those layers run alone.
Saved: x once, the parameters (a 4-bit ``W_i`` as its handle), the ``[4, d_i]`` vectors, the kept outputs; never ``x Aᵀ``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ...core.compute import cast
from ...core.frozen import WeightOperand, is_quantized, materialize
from ...core.lowrank_group import grouped_product_backward, stacked_downs
from ...core.tracing import distinct_when_traced
from .compose import compose_backward, scale, vectors_and_compose
from .norm import factored_norm_parts, weight_row_norm_sq
from .product import as_rows

#: the routes a grouped member may take (the ``"z"`` route's two Functions stay alone)
GROUPED_ROUTES = ("output", "recompute", None)


def groupable(routes: Sequence[str | None]) -> bool:
    """Whether members with these routes (:func:`~.function.backward_route`) run as one: every route one of
    :data:`GROUPED_ROUTES`, or ``"none"`` for all (nothing needs a gradient)."""
    return all(r == "none" for r in routes) or all(r in GROUPED_ROUTES for r in routes)


class GroupedDoraFunction(torch.autograd.Function):
    """``(y_1, …, y_n)`` of the module docstring from one x. Arguments: x, the scaling, the member count n, a callback
    run at the end of backward (or None), each member's route and magnitude floor (tuples: ``"output"``,
    ``"recompute"``, None, or ``"none"`` for all when nothing needs a gradient), then the n weights (dense ``[d_i, d_in]``
    or 4-bit handles), biases (None allowed), A's, B's, magnitudes, cached ``‖W_i‖²_row`` (None allowed) and step
    vectors formed ahead (:mod:`.prepass`; None: the member forms its norm)."""

    @staticmethod
    def forward(ctx, x, scaling: float, count: int, on_backward: Callable[[], None] | None,
                routes: tuple[str | None, ...], floors: tuple[float, ...], *operands):
        weights, biases, downs, ups, magnitudes, squares, ahead = (operands[k * count:(k + 1) * count]
                                                                   for k in range(7))
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        outputs, vectors, h, start = [], [], None, 0
        for i in range(count):
            w = materialize(weights[i], dtype)
            z = F.linear(x, w)  # the first base GEMM is queued before the rest
            if h is None:
                h = F.linear(x2, stacked_downs(downs, dtype))  # x Aᵀ of every member, [N, R]
            rank = downs[i].shape[0]
            z.view(-1, z.shape[-1]).addmm_(h[:, start:start + rank], cast(ups[i], dtype).t(), alpha=scaling)
            start += rank
            vec = ahead[i]
            if vec is None:
                weight_sq = squares[i] if squares[i] is not None else weight_row_norm_sq(w)
                mixed, gram = factored_norm_parts(w, cast(downs[i], dtype))
                del w
                y, vec = vectors_and_compose(z, mixed, gram, ups[i], weight_sq, magnitudes[i], scaling, floors[i],
                                             biases[i], out=z)
            else:  # the step's vectors, formed ahead (.prepass)
                del w
                y = scale(z, vec[1], biases[i], out=z)
            outputs.append(distinct_when_traced(y))  # z itself eagerly (written in place): see the helper
            vectors.append(vec)
        ctx.set_materialize_grads(False)
        ctx.routes = routes
        if routes[0] != "none":
            kept = [y for y, route in zip(outputs, routes) if route == "output"]
            ctx.handles = tuple(w if is_quantized(w) else None for w in weights)
            ctx.save_for_backward(x, *(None if is_quantized(w) else w for w in weights), *downs, *ups, *vectors,
                                  *kept)
            ctx.scaling, ctx.count, ctx.on_backward = scaling, count, on_backward
            ctx.magnitude_shapes = tuple(m.shape for m in magnitudes)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        count, s, routes = ctx.count, ctx.scaling, ctx.routes
        x, *saved = ctx.saved_tensors
        weights = [handle if handle is not None else w for handle, w in zip(ctx.handles, saved[:count])]
        downs, ups = saved[count:2 * count], saved[2 * count:3 * count]
        vectors, kept = saved[3 * count:4 * count], iter(saved[4 * count:])
        outputs = [next(kept) if route == "output" else None for route in routes]
        needs = ctx.needs_input_grad
        base = 6
        need_w, need_bias = needs[base:base + count], needs[base + count:base + 2 * count]
        need_a, need_b = needs[base + 2 * count:base + 3 * count], needs[base + 3 * count:base + 4 * count]
        need_m = needs[base + 4 * count:base + 5 * count]
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = stacked_downs(downs, dtype)
        h = F.linear(x2, a_cat) if any(r == "recompute" and d is not None for r, d in zip(routes, grads)) else None
        grad_m: list[torch.Tensor | None] = [None] * count
        grad_bias: list[torch.Tensor | None] = [None] * count
        starts = [0]
        for a in downs:
            starts.append(starts[-1] + a.shape[0])

        def tail_grad(i: int) -> torch.Tensor | None:
            """Member i's ``dz = g·dy`` ``[N, d_i]`` (its ``dm`` and ``db`` recorded on the way), or None."""
            dy = grads[i]
            if dy is None:
                return None
            dy2, route = as_rows(dy), routes[i]
            _, g, inv_norm, inv_m = vectors[i].unbind(0)
            if route == "recompute":  # z_i again (as forward formed it), overwritten by dz; dm = Σ dy ⊙ z · (1/‖V‖)
                pre = F.linear(x, materialize(weights[i], dtype)).view(dy2.shape)
                pre.addmm_(h[:, starts[i]:starts[i + 1]], cast(ups[i], dtype).t(), alpha=s)
                dz, dm, db = compose_backward(dy2, pre, g, dbase_out=pre, dy_sum=need_bias[i], scale=inv_norm)
            elif route is None:  # frozen magnitude: g·dy (and the bias sum) only
                pre = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
                dz, dm, db = compose_backward(dy2, pre, g, dy_sum=need_bias[i])
            else:  # dm = Σ dy ⊙ y · (1/m')
                dz, dm, db = compose_backward(dy2, outputs[i].view(dy2.shape), g, dy_sum=need_bias[i], scale=inv_m)
            if route and need_m[i]:
                grad_m[i] = dm.view(ctx.magnitude_shapes[i]) if dm.shape != ctx.magnitude_shapes[i] else dm
            grad_bias[i] = db
            return dz

        grad_x, grad_w, grad_a, grad_b = grouped_product_backward(
            x2, weights, downs, ups, s, tail_grad, (needs[0], need_w, need_a, need_b), h=h, a_cat=a_cat)
        if ctx.on_backward is not None:
            ctx.on_backward()
        return (grad_x.view(x.shape) if grad_x is not None else None, None, None, None, None, None,
                *grad_w, *grad_bias, *grad_a, *grad_b, *grad_m, *(None,) * (2 * count))


def grouped_dora_linear(x: torch.Tensor, weights: Sequence[WeightOperand], biases: Sequence[torch.Tensor | None],
                        downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor],
                        magnitudes: Sequence[torch.Tensor], squares: Sequence[torch.Tensor | None], scaling: float,
                        routes: Sequence[str | None], floors: Sequence[float],
                        on_backward: Callable[[], None] | None = None,
                        vectors: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, ...]:
    """Apply :class:`GroupedDoraFunction`: each member's DoRA output ``[..., d_i]``. Dense weights ``[d_i, d_in]`` in
    any dtype (cast per GEMM) or 4-bit handles; biases in x's dtype; ``routes`` from
    :func:`~.function.backward_route` (each in :data:`GROUPED_ROUTES`, or all ``"none"``) and ``floors`` the
    magnitude floors (:func:`~.norm.magnitude_floor` for ``"output"``, else 0); ``vectors``: each member's step
    vectors formed ahead (:mod:`.prepass`) or None (the member forms its norm itself)."""
    count = len(weights)
    vectors = (None,) * count if vectors is None else tuple(vectors)
    if not count or any(len(seq) != count
                        for seq in (biases, downs, ups, magnitudes, squares, routes, floors, vectors)):
        raise ValueError("grouped_dora_linear needs one weight, bias, A, B, magnitude, norm, route, floor and "
                         "vectors (or None) per member")
    if not groupable(routes):
        raise ValueError(f"grouped_dora_linear takes the routes {GROUPED_ROUTES} (or 'none' for all), got {routes}")
    return GroupedDoraFunction.apply(x, scaling, count, on_backward, tuple(routes), tuple(floors), *weights, *biases,
                                     *downs, *ups, *magnitudes, *squares, *vectors)
