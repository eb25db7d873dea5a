"""Training paths for updates with structure (LoHa's Hadamard product, LoKr's Kronecker product).

A structured update ``ΔW`` (``[d_out, d_in]``, or a convolution kernel) can be applied two ways; neither keeps
a dense ``ΔW`` alive across layers or from forward to backward:

* **structured** — through its factors, never forming ``ΔW`` (:class:`StructuredFunction`): LoHa as a rank-``r²``
  product, LoKr as two small contractions on ``x`` reshaped ``[N, a_in, b_in]``;
* **folded** — ``W + ΔW`` formed transiently in the compute dtype, one GEMM / convolution with it, and formed
  again in backward rather than saved (:class:`FoldedFunction`).

The method-specific work is an *op* object (:class:`StructuredOp` / :class:`FoldOp`, in ``adapters/loha.py`` and
``adapters/lokr.py``) with an explicit forward and an explicit backward: backward never runs autograd (no
``torch.autograd.grad``, no graph built inside it). The factor products (face-splitting, Kronecker, Tucker,
low-rank) and their gradients are the small helpers below.

Every Function saves ``x`` itself (the very tensor object, so q/k/v store it once), the frozen base weight
(not a cast copy; for a 4-bit base only its handle, on ``ctx``) and the adapter's parameters — nothing of size
``N·R``, no dense ``ΔW``, no fp32 copy of an activation, no dequantised weight. A 4-bit base
(:class:`~slimtune.quant.frozen.QuantizedWeight`) is dequantised by :func:`~slimtune.quant.frozen.materialize`
right before each GEMM that needs it and dropped after. GEMMs run in ``x``'s dtype; fp32 adapter parameters
are cast once per forward / backward and their gradients returned in fp32.

:func:`choose_path` picks the path per layer and per call from FLOP and byte counts (``*_costs`` below), the
way :func:`slimtune.kernels.lora.choose_backward` picks LoRA's backward.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.frozen import WeightOperand, materialize, save_with_weight, saved_with_weight

Path = str  # "structured" | "folded"
PATHS = ("structured", "folded")

#: A byte moved to or from memory costs about as much time as this many FLOPs (H100 bf16: ~990 TFLOP/s over
#: ~3.35 TB/s ≈ 300 at peak; lower for what GEMMs and elementwise kernels actually reach). Module-level so a
#: benchmark can tune it.
FLOPS_PER_BYTE = 200.0
#: A kernel launch costs the host ~10-70 µs on the lent machines (``benchmarks/host_cost.py``), and a training step
#: at a few thousand tokens is host-bound there; counted as this many FLOPs (~5 µs of an H100's matrix units).
FLOPS_PER_LAUNCH = 4e9


# -- the chooser ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cost:
    """Work beyond the base layer's own GEMM / convolution (and its input gradient)."""

    flops: float
    bytes: float
    launches: int = 0

    def score(self) -> float:
        return self.flops + FLOPS_PER_BYTE * self.bytes + FLOPS_PER_LAUNCH * self.launches


def choose_path(costs: dict[Path, Cost]) -> Path:
    """The cheaper path (ties go to ``"structured"``, which allocates less)."""
    return min(PATHS, key=lambda path: costs[path].score())


def folded_cost(tokens: int, d_in: int, d_out: int, build_flops: float, build_passes: int, grad_passes: int,
                itemsize: int, backward: bool, launches: tuple[int, int] = (0, 0)) -> Cost:
    """Folded path: build ``W + ΔW`` (``build_passes`` passes over a dense ``[d_out, d_in]``); the GEMM with it
    replaces the base's. Backward builds it again, adds ``dW = dyᵀx`` (``2·N·d_in·d_out``) and maps ``dW`` to
    the factors (about twice the build's FLOPs, ``grad_passes`` dense passes). ``launches``: kernels beyond the
    base layer's own, (forward, backward)."""
    dense = d_in * d_out
    flops, passes, count = build_flops, build_passes, launches[0]
    if backward:
        flops += 3 * build_flops + 2 * tokens * dense
        passes += build_passes + 1 + grad_passes
        count += launches[1]
    return Cost(flops, passes * dense * itemsize, count)


def loha_costs(tokens: int, d_in: int, d_out: int, r: int, itemsize: int, backward: bool,
               fused_fold: bool = False) -> dict[Path, Cost]:
    """LoHa on a Linear (a convolution: ``d_in = c_in·kernel``, tokens = output positions).

    Structured is LoRA at rank ``R = r²``: forward ``2·N·R·(d_in + d_out)``; backward (``x·downᵀ``
    recomputed) ``2·N·R·(3·d_in + 2·d_out)``; 4 + 12 launches. Folded: two rank-r GEMMs build ``W1``, ``W2``
    (``4·r·d_out·d_in``) and ``addcmul`` forms ``W + W1 ⊙ W2`` (6 dense passes, 3 + 10 launches), or with
    ``fused_fold`` (:mod:`slimtune.kernels.loha_triton`) one kernel reads W and writes ``W + ΔW`` (2 passes) and
    one more maps ``dW`` to the factors (2 passes over it): 1 + 3 launches."""
    rr = r * r
    flops = 2 * tokens * rr * (d_in + d_out)
    moved = rr * (d_in + d_out) + 2 * tokens * rr
    if backward:
        flops += 2 * tokens * rr * (3 * d_in + 2 * d_out)
        moved += 3 * rr * (d_in + d_out) + 6 * tokens * rr
    structured = Cost(flops, moved * itemsize, 4 + (12 if backward else 0))
    if fused_fold:
        folded = folded_cost(tokens, d_in, d_out, 4 * r * d_in * d_out, 2, 2, itemsize, backward, (1, 3))
    else:
        folded = folded_cost(tokens, d_in, d_out, 4 * r * d_in * d_out, 6, 10, itemsize, backward, (3, 10))
    return {"structured": structured, "folded": folded}


def loha_tucker_costs(tokens_in: int, tokens: int, c_in: int, c_out: int, kernel: int, r: int, itemsize: int,
                      backward: bool) -> dict[Path, Cost]:
    """Tucker LoHa on a convolution: structured = 1x1 down to ``R = r²`` channels at the input positions, the
    ``[R, R, *k]`` core convolution, 1x1 up; its backward recomputes the chain (about 3x the forward)."""
    rr = r * r
    flops = 2 * rr * (tokens_in * c_in + tokens * rr * kernel + tokens * c_out)
    moved = 2 * rr * (tokens_in + 2 * tokens) + rr * rr * kernel
    if backward:
        flops, moved = 4 * flops, 4 * moved
    structured = Cost(flops, moved * itemsize)
    folded = folded_cost(tokens, c_in * kernel, c_out, 4 * r * c_in * kernel * c_out, 6, 10, itemsize, backward)
    return {"structured": structured, "folded": folded}


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
    first); backward recomputes them and runs two more of each (about 3x the forward). Folded: ``torch.kron``
    and the add (4 dense passes)."""
    order, macs = kron_order(a_out, a_in, b_out, b_in)
    if conv:
        order, macs = "w2", a_in * b_in * b_out + a_out * a_in * b_out
    mid = a_in * b_out if order == "w2" else a_out * b_in
    d_out, d_in = a_out * b_out, a_in * b_in
    flops = 2 * tokens * macs
    moved = tokens * (2 * mid + 3 * d_out)
    if backward:
        flops += 3 * 2 * tokens * macs
        moved += tokens * (6 * mid + 2 * d_out + d_in)
    structured = Cost(flops, moved * itemsize)
    folded = folded_cost(tokens, d_in, d_out, d_in * d_out, 4, 6, itemsize, backward)
    return {"structured": structured, "folded": folded}


# -- the base operation: a Linear or a convolution -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A base convolution's geometry; ``None`` in its place means a Linear."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @classmethod
    def of(cls, conv: nn.Module) -> "ConvSpec":
        """The geometry of ``nn.Conv1d`` / ``nn.Conv2d`` (``padding="same"`` resolved to numbers)."""
        padding = conv.padding
        if padding == "valid":
            padding = (0,) * len(conv.kernel_size)
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in totals):
                raise ValueError("padding='same' with an even effective kernel pads asymmetrically")
            padding = tuple(t // 2 for t in totals)
        return cls(tuple(conv.stride), tuple(padding), tuple(conv.dilation), conv.groups)

    def output_size(self, size: Sequence[int], kernel: Sequence[int]) -> tuple[int, ...]:
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, k, s in zip(size, self.padding, self.dilation, kernel, self.stride))

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             groups: int | None = None) -> torch.Tensor:
        """Convolve with this geometry (and the base's groups unless ``groups`` is given)."""
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        groups = self.groups if groups is None else groups
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)


def base_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: ConvSpec | None
                 ) -> torch.Tensor:
    return F.linear(x, weight, bias) if conv is None else conv.conv(x, weight, bias)


def base_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv: ConvSpec | None, need_x: bool,
                  need_w: bool, groups: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW)`` of ``base_forward`` (each ``None`` unless asked for); ``groups`` overrides the conv's."""
    if conv is None:
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight).view(x.shape) if need_x else None
        dw = dy2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        return dx, dw
    if not (need_x or need_w):
        return None, None
    nd = weight.dim() - 2
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0] * nd,
        conv.groups if groups is None else groups, [need_x, need_w, False])
    return dx, dw


def _bias_grad(dy: torch.Tensor, conv: ConvSpec | None, dtype: torch.dtype) -> torch.Tensor:
    grad = dy.reshape(-1, dy.shape[-1]).sum(0) if conv is None else dy.sum(dim=[0, *range(2, dy.dim())])
    return grad.to(dtype)


def positions(x: torch.Tensor, conv: ConvSpec | None, kernel: Sequence[int]) -> tuple[int, int]:
    """``(input positions, output positions)``: tokens for a Linear, batch × spatial sizes for a convolution."""
    if conv is None:
        tokens = x.numel() // x.shape[-1]
        return tokens, tokens
    spatial = x.shape[2:]
    return x.shape[0] * math.prod(spatial), x.shape[0] * math.prod(conv.output_size(spatial, kernel))


# -- factor products and their gradients (explicit; no autograd) ------------------------------------
Grad = torch.Tensor | None


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def scale_rows(w: torch.Tensor, scale: float | torch.Tensor, dim: int) -> torch.Tensor:
    """``w`` with output row ``o`` (index ``o`` along ``dim`` of a 2-D ``w``) times ``scale[o]``, or all times the
    number ``scale`` (``w`` itself for 1)."""
    if isinstance(scale, torch.Tensor):
        return w * (scale.unsqueeze(1) if dim == 0 else scale.unsqueeze(0))
    return w if scale == 1.0 else w * scale


def rows_kr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: a ``[r, n]``, b ``[s, n]`` → ``[r·s, n]``, row ``(i, j)`` = ``a[i] * b[j]``."""
    return (a.unsqueeze(1) * b).reshape(-1, a.shape[1])


def rows_kr_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
                 ) -> tuple[Grad, Grad]:
    """``(da, db)`` of :func:`rows_kr` for the output gradient ``g`` ``[r·s, n]``."""
    g3 = g.reshape(a.shape[0], b.shape[0], -1)
    da = torch.linalg.vecdot(g3, b, dim=1) if need_a else None  # Σ_j g[i, j] * b[j]
    db = torch.linalg.vecdot(g3, a.unsqueeze(1), dim=0) if need_b else None
    return da, db


def cols_kr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise (face-splitting) product: a ``[n, r]``, b ``[n, s]`` → ``[n, r·s]``, column ``(i, j)`` =
    ``a[:, i] * b[:, j]``."""
    return (a.unsqueeze(2) * b.unsqueeze(1)).reshape(a.shape[0], -1)


def cols_kr_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
                 ) -> tuple[Grad, Grad]:
    """``(da, db)`` of :func:`cols_kr` for ``g`` ``[n, r·s]``: one batched mat-vec each."""
    g3 = g.reshape(a.shape[0], a.shape[1], b.shape[1])
    da = torch.bmm(g3, b.unsqueeze(2)).view(a.shape) if need_a else None
    db = torch.bmm(a.unsqueeze(1), g3).view(b.shape) if need_b else None
    return da, db


def lowrank_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
                 ) -> tuple[Grad, Grad]:
    """``(da, db)`` of ``a @ b`` (a ``[m, r]``, b ``[r, n]``) for ``g`` ``[m, n]``."""
    return (g @ b.t() if need_a else None), (a.t() @ g if need_b else None)


def tucker_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``W[p, q, ·] = Σ_ij t[i, j, ·] wa[i, p] wb[j, q]``: t ``[r, r, *k]``, wa ``[r, c_out]``, wb ``[r, c_in]``."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def tucker_grad(g: torch.Tensor, t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, need: Sequence[bool]
                ) -> tuple[Grad, Grad, Grad]:
    """``(dt, dwa, dwb)`` of :func:`tucker_weight` for ``g`` ``[c_out, c_in, *k]`` (any shape of that size)."""
    need_t, need_a, need_b = need
    gk = g.reshape(wa.shape[1], wb.shape[1], -1)
    tk = t.reshape(t.shape[0], t.shape[1], -1)
    dt = da = db = None
    if need_t or need_a:
        m = torch.einsum("pqk,jq->pjk", gk, wb)
        dt = torch.einsum("ip,pjk->ijk", wa, m).reshape(t.shape) if need_t else None
        da = torch.einsum("ijk,pjk->ip", tk, m) if need_a else None
    if need_b:
        db = torch.einsum("iqk,ijk->jq", torch.einsum("pqk,ip->iqk", gk, wa), tk)
    return dt, da, db


def kron_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
              ) -> tuple[Grad, Grad]:
    """``(da, db)`` of ``torch.kron(a, b)`` for ``g`` of the kron's size (the smaller-rank operand is padded
    with leading unit dims, as torch.kron does): g viewed ``[A0, B0, A1, B1, ...]`` times the other operand
    broadcast into its slots, summed over them."""
    n = max(a.dim(), b.dim())
    sa = (1,) * (n - a.dim()) + tuple(a.shape)
    sb = (1,) * (n - b.dim()) + tuple(b.shape)
    gi = g.reshape([size for pair in zip(sa, sb) for size in pair])
    da = db = None
    if need_a:
        da = (gi * b.reshape([size for d in sb for size in (1, d)])).sum(tuple(range(1, 2 * n, 2))).reshape(a.shape)
    if need_b:
        db = (gi * a.reshape([size for d in sa for size in (d, 1)])).sum(tuple(range(0, 2 * n, 2))).reshape(b.shape)
    return da, db


def sum_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_n a[n] b[n]ᵀ``: a ``[N, m, k]``, b ``[N, n, k]`` → ``[m, n]``; a batched GEMM and a sum when the
    ``[N, m, n]`` intermediate is smaller than transposed copies of the operands, else one GEMM on those."""
    (_, m, k), n = a.shape, b.shape[1]
    if m * n <= (m + n) * k:
        return torch.bmm(a, b.transpose(1, 2)).sum(0)
    return a.transpose(0, 1).reshape(m, -1) @ b.transpose(0, 1).reshape(n, -1).t()


def bmm_left(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``w @ t[n]`` for every n: w ``[m, k]`` (any strides), t ``[N, k, n]`` → ``[N, m, n]``, one batched GEMM
    (``torch.matmul`` would copy ``t`` to fold it into a single GEMM)."""
    return torch.bmm(w.expand(t.shape[0], *w.shape), t)


def mix(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a batched GEMM: h ``[B, c, *sp]``, w ``[c_out, c]`` (any strides) → ``[B, c_out, *sp]``."""
    return bmm_left(w, h.reshape(h.shape[0], h.shape[1], -1)).view(h.shape[0], w.shape[0], *h.shape[2:])


def add_mix_(y: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y + mix(h, w)``, accumulated into ``y`` by the GEMM itself when ``y`` is contiguous."""
    if not y.is_contiguous():
        return y + mix(h, w)
    batch = y.shape[0]
    y.view(batch, y.shape[1], -1).baddbmm_(w.expand(batch, *w.shape), h.reshape(batch, h.shape[1], -1))
    return y


def mix_backward(dy: torch.Tensor, h: torch.Tensor | None, w: torch.Tensor, need_h: bool, need_w: bool,
                 w_transposed: bool = False) -> tuple[Grad, Grad]:
    """``(dh, dw)`` of ``mix(h, w)``; ``dw`` is ``[c, c_out]`` when ``w_transposed`` (for a ``w`` given as the
    transpose of a contiguous ``[c, c_out]``). ``h`` is only needed for ``dw``."""
    dy3 = dy.reshape(dy.shape[0], dy.shape[1], -1)
    dh = bmm_left(w.t(), dy3).view(dy.shape[0], w.shape[1], *dy.shape[2:]) if need_h else None
    dw = None
    if need_w:
        h3 = h.reshape(h.shape[0], h.shape[1], -1)
        dw = sum_bmm(h3, dy3) if w_transposed else sum_bmm(dy3, h3)
    return dh, dw


# -- the Functions ------------------------------------------------------------------------------------
Params = Sequence[torch.Tensor]


class StructuredOp:
    """A structured update ``delta(x)`` with explicit forward and backward (subclassed per method and layer kind).

    ``params`` arrive in the compute dtype (x's). ``scale`` is whatever per-call setting the op needs (its
    scaling and rank-dropout mask), passed through the Function untouched.
    """

    conv: ConvSpec | None = None

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, params: Params, scale: Any) -> torch.Tensor:
        """``y + delta(x)`` (``y`` is the base output, fresh: accumulate into it where possible)."""
        raise NotImplementedError

    def delta_backward(self, dy: torch.Tensor, x: torch.Tensor, params: Params, scale: Any,
                       grad_x: torch.Tensor | None, need: Sequence[bool]) -> list[Grad]:
        """Add ``(d delta / dx)ᵀ dy`` into ``grad_x`` (in place; ``None``: x needs no gradient) and return the
        gradients of ``params`` (``None`` where ``need`` is false)."""
        raise NotImplementedError


class FoldOp:
    """A dense update ``ΔW`` formed from the parameters, for the folded path."""

    conv: ConvSpec | None = None

    def fold(self, w: torch.Tensor, params: Params, scale: Any, inplace: bool
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(W + ΔW, parts)``: ``inplace`` allows adding into ``w`` (a fresh copy); ``parts`` are the
        intermediates :meth:`fold_backward` reuses."""
        raise NotImplementedError

    def fold_backward(self, g: torch.Tensor, params: Params, parts: tuple[torch.Tensor, ...], scale: Any,
                      need: Sequence[bool]) -> list[Grad]:
        """The parameters' gradients for ``g = dL/d(W + ΔW)``."""
        raise NotImplementedError

    def fused_backward(self, w: torch.Tensor, params: Params, scale: Any, dy: torch.Tensor, x: torch.Tensor,
                       need_x: bool, need: Sequence[bool], inplace: bool
                       ) -> tuple[torch.Tensor | None, list[Grad]] | None:
        """Optional: the whole backward in fewer launches, ``(dx, parameter gradients)`` (w: the dense base weight
        in the compute dtype, ``inplace`` as in :meth:`fold`); None: take the generic fold / base backward /
        :meth:`fold_backward` sequence."""
        return None


def _backward_inputs(ctx: Any, dy: torch.Tensor
                     ) -> tuple[torch.Tensor, WeightOperand, list[torch.Tensor], torch.Tensor]:
    """``(x, weight, params, dy)`` for a backward: what :func:`~slimtune.quant.frozen.save_with_weight` kept, and
    ``dy`` in x's dtype, contiguous (the ops view it; autograd may hand over a strided one)."""
    weight, (x, *params) = saved_with_weight(ctx)
    return x, weight, params, cast(dy, x.dtype).contiguous()


def _bias_in(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else cast(bias, dtype)


def _param_grads(grads: Sequence[Grad], params: Params) -> list[Grad]:
    return [None if g is None else cast(g, p.dtype) for g, p in zip(grads, params)]


class StructuredFunction(torch.autograd.Function):
    """``y = base(x; W, b) + op.delta(x)``: the base GEMM / convolution and the op's structured update."""

    @staticmethod
    def forward(ctx, x, weight, bias, op: StructuredOp, scale, *params):
        dtype = x.dtype
        cast_params = [cast(p, dtype) for p in params]
        y = base_forward(x, materialize(weight, dtype), _bias_in(bias, dtype), op.conv)  # dense copy: a temporary
        y = op.add_delta(y, x, cast_params, scale)
        ctx.op, ctx.scale, ctx.bias_dtype = op, scale, None if bias is None else bias.dtype
        save_with_weight(ctx, weight, x, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, params, dy = _backward_inputs(ctx, dy)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_p = ctx.needs_input_grad[5:]
        dtype, op = x.dtype, ctx.op
        grad_x = grad_w = None
        if need_x or need_w:
            grad_x, grad_w = base_backward(dy, x, materialize(weight, dtype), op.conv, need_x, need_w)
        grads: list[Grad] = [None] * len(params)
        if need_x or any(need_p):
            grads = op.delta_backward(dy, x, [cast(p, dtype) for p in params], ctx.scale, grad_x, need_p)
        grad_b = _bias_grad(dy, op.conv, ctx.bias_dtype) if need_b else None
        grad_w = cast(grad_w, weight.dtype) if grad_w is not None else None
        return (grad_x, grad_w, grad_b, None, None, *_param_grads(grads, params))


def structured_apply(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, op: StructuredOp,
                     scale: Any, *params: torch.Tensor) -> torch.Tensor:
    """Apply :class:`StructuredFunction` (``weight``: the base weight, dense or a 4-bit handle)."""
    return StructuredFunction.apply(x, weight, bias, op, scale, *params)


class FoldedFunction(torch.autograd.Function):
    """``y = base(x)`` with weight ``W + ΔW`` formed by ``op.fold`` in x's dtype: one GEMM / convolution.

    ``W + ΔW`` exists only inside forward and again inside backward: ``dx`` uses it, ``g = dyᵀx`` (the
    convolution's weight gradient) goes through ``op.fold_backward`` to the parameters — or the op's
    ``fused_backward`` does all of it in fewer launches (LoHa on the GPU). Dense transients live only while this
    layer's forward or backward runs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op: FoldOp, scale, *params):
        dtype = x.dtype
        dense = materialize(weight, dtype)
        w_eff, _ = op.fold(dense, [cast(p, dtype) for p in params], scale, inplace=dense is not weight)
        del dense
        y = base_forward(x, w_eff, _bias_in(bias, dtype), op.conv)
        del w_eff
        ctx.op, ctx.scale, ctx.bias_dtype = op, scale, None if bias is None else bias.dtype
        save_with_weight(ctx, weight, x, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, params, dy = _backward_inputs(ctx, dy)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_p = ctx.needs_input_grad[5:]
        dtype, op = x.dtype, ctx.op
        cast_params = [cast(p, dtype) for p in params]
        dense = materialize(weight, dtype)
        grad_b = _bias_grad(dy, op.conv, ctx.bias_dtype) if need_b else None
        if not need_w and any(need_p):
            fused = op.fused_backward(dense, cast_params, ctx.scale, dy, x, need_x, need_p, dense is not weight)
            if fused is not None:
                grad_x, grads = fused
                return (grad_x, None, grad_b, None, None, *_param_grads(grads, params))
        w_eff, parts = op.fold(dense, cast_params, ctx.scale, inplace=dense is not weight)
        del dense
        grad_x, g = base_backward(dy, x, w_eff, op.conv, need_x, need_w or any(need_p))
        del w_eff
        grads: list[Grad] = [None] * len(params)
        if any(need_p):
            grads = op.fold_backward(g, cast_params, parts, ctx.scale, need_p)
        grad_w = cast(g, weight.dtype) if need_w else None
        return (grad_x, grad_w, grad_b, None, None, *_param_grads(grads, params))


def folded_apply(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, op: FoldOp, scale: Any,
                 *params: torch.Tensor) -> torch.Tensor:
    """Apply :class:`FoldedFunction`."""
    return FoldedFunction.apply(x, weight, bias, op, scale, *params)
