"""Training paths for updates with structure (LoHa's Hadamard product, LoKr's Kronecker product).

A structured update ``ΔW`` (``[d_out, d_in]``, or a convolution kernel) can be applied two ways; neither keeps
a dense ``ΔW`` alive across layers or from forward to backward:

* **structured** — through its factors, never forming ``ΔW``: LoHa as a rank-``r²`` product
  (:class:`FactoredLinearFunction`), LoKr as two small contractions on ``x`` reshaped ``[N, a_in, b_in]``
  (:class:`DeltaFunction`);
* **folded** — ``W + ΔW`` formed transiently in the compute dtype, one GEMM / convolution with it, and formed
  again in backward rather than saved (:class:`FoldedFunction`).

Every Function here saves ``x`` itself (the very tensor object, so q/k/v store it once), the frozen base
weight (not a cast copy) and the adapter's own parameters — nothing of size ``N·R``, no dense ``ΔW``, no fp32
copy of an activation. What backward needs beyond that (the factor products, ``W + ΔW``, intermediates) is
rebuilt there; the small factor products are differentiated with PyTorch's autograd, the large contractions
have explicit formulas. GEMMs run in ``x``'s dtype; fp32 adapter parameters are cast inside the ``build``
functions, so their gradients come back in fp32.

:func:`choose_path` picks the path per layer and per call from FLOP and byte counts (``*_costs`` below), the
way :func:`slimtune.kernels.lora.choose_backward` picks LoRA's backward.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import choose_backward

Path = str  # "structured" | "folded"
PATHS = ("structured", "folded")

#: A byte moved to or from memory costs about as much time as this many FLOPs (H100 bf16: ~990 TFLOP/s over
#: ~3.35 TB/s ≈ 300 at peak; lower for what GEMMs and elementwise kernels actually reach). Module-level so a
#: benchmark can tune it.
FLOPS_PER_BYTE = 200.0


# -- the chooser ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cost:
    """Work beyond the base layer's own GEMM / convolution (and its input gradient)."""

    flops: float
    bytes: float

    def score(self) -> float:
        return self.flops + FLOPS_PER_BYTE * self.bytes


def choose_path(costs: dict[Path, Cost]) -> Path:
    """The cheaper path (ties go to ``"structured"``, which allocates less)."""
    return min(PATHS, key=lambda path: costs[path].score())


def folded_cost(tokens: int, d_in: int, d_out: int, build_flops: float, build_passes: int, grad_passes: int,
                itemsize: int, backward: bool) -> Cost:
    """Folded path: build ``W + ΔW`` (``build_passes`` passes over a dense ``[d_out, d_in]``); the GEMM with it
    replaces the base's. Backward builds it again, adds ``dW = dyᵀx`` (``2·N·d_in·d_out``) and maps ``dW`` to
    the factors (about twice the build's FLOPs, ``grad_passes`` dense passes)."""
    dense = d_in * d_out
    flops, passes = build_flops, build_passes
    if backward:
        flops += 3 * build_flops + 2 * tokens * dense
        passes += build_passes + 1 + grad_passes
    return Cost(flops, passes * dense * itemsize)


def loha_costs(tokens: int, d_in: int, d_out: int, r: int, itemsize: int, backward: bool) -> dict[Path, Cost]:
    """LoHa on a Linear (a convolution: ``d_in = c_in·kernel``, tokens = output positions).

    Structured is LoRA at rank ``R = r²``: forward ``2·N·R·(d_in + d_out)``; backward (``x·downᵀ``
    recomputed) ``2·N·R·(3·d_in + 2·d_out)``. Folded: two rank-r GEMMs build ``W1``, ``W2``
    (``4·r·d_out·d_in``) and ``addcmul`` forms ``W + W1 ⊙ W2`` (6 dense passes)."""
    rr = r * r
    flops = 2 * tokens * rr * (d_in + d_out)
    moved = rr * (d_in + d_out) + 2 * tokens * rr
    if backward:
        flops += 2 * tokens * rr * (3 * d_in + 2 * d_out)
        moved += 3 * rr * (d_in + d_out) + 6 * tokens * rr
    structured = Cost(flops, moved * itemsize)
    folded = folded_cost(tokens, d_in, d_out, 4 * r * d_in * d_out, 6, 10, itemsize, backward)
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
                  need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW)`` of ``base_forward`` (each ``None`` unless asked for)."""
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
        conv.groups, [need_x, need_w, False])
    return dx, dw


def _bias_grad(dy: torch.Tensor, conv: ConvSpec | None, dtype: torch.dtype) -> torch.Tensor:
    grad = dy.reshape(-1, dy.shape[-1]).sum(0) if conv is None else dy.sum(dim=[0, *range(2, dy.dim())])
    return grad.to(dtype)


def _leaves(tensors: Sequence[torch.Tensor], needs: Sequence[bool]) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(bool(n)) for t, n in zip(tensors, needs)]


def _grads_for(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor]
               ) -> list[torch.Tensor | None]:
    """``d outputs / d leaf`` for each leaf that requires grad (else ``None``), in the leaves' own dtype."""
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    if not wanted:
        return [None] * len(leaves)
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    out = []
    for leaf in leaves:
        grad = next(found) if leaf.requires_grad else None
        out.append(torch.zeros_like(leaf) if grad is None and leaf.requires_grad else grad)
    return out


# -- structured, rank-R factors: LoHa on a Linear --------------------------------------------------
FactorBuild = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class FactoredLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + (x Dᵀ) Uᵀ`` with ``(D [R, d_in], U [d_out, R]) = build(*factors, dtype=x.dtype)``.

    The LoRA computation of :mod:`slimtune.kernels.lora` with factors that are computed (LoHa's face-splitting
    products): ``D`` and ``U`` are rebuilt in backward from the saved parameters, never saved; ``dD`` and
    ``dU`` come from thin GEMMs (or the ``dyᵀx`` Gram matrix when :func:`choose_backward` says so) and reach
    the parameters through ``build``'s small autograd graph.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, build: FactorBuild, *factors):
        dtype = x.dtype
        down, up = build(*factors, dtype=dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight.to(dtype), bias.to(dtype) if bias is not None else None)
        y.addmm_(x2 @ down.t(), up.t())
        ctx.build, ctx.bias_dtype = build, bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, *factors)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, *factors = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_f = ctx.needs_input_grad[4:]
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        leaves = _leaves(factors, need_f)
        with torch.enable_grad():
            down, up = ctx.build(*leaves, dtype=dtype)
        d, u = down.detach(), up.detach()
        dyu = dy2 @ u if (need_x or any(need_f)) else None  # [N, R]
        grad_f: list[torch.Tensor | None] = [None] * len(factors)
        if any(need_f):
            tokens, d_in = x2.shape
            if choose_backward(tokens, d_in, dy2.shape[1], d.shape[0]) == "gram":
                gram = dy2.t() @ x2
                d_up, d_down = gram @ d.t(), u.t() @ gram
                del gram
            else:
                d_up, d_down = dy2.t() @ (x2 @ d.t()), dyu.t() @ x2
            grad_f = _grads_for((down, up), (d_down, d_up), leaves)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = (dy2 @ weight.to(dtype)).addmm_(dyu, d).view(x.shape)
        if need_w:
            grad_w = (dy2.t() @ x2).to(weight.dtype)
        if need_b:
            grad_b = dy2.sum(0).to(ctx.bias_dtype)
        return (grad_x, grad_w, grad_b, None, *grad_f)


def factored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, build: FactorBuild,
                    *factors: torch.Tensor) -> torch.Tensor:
    """Apply :class:`FactoredLinearFunction`; ``weight``/``bias`` are cast to x's dtype inside (not saved cast)."""
    return FactoredLinearFunction.apply(x, weight, bias, build, *factors)


# -- structured, any small contraction: LoKr, LoHa on convolutions ------------------------------------
class DeltaFunction(torch.autograd.Function):
    """``y = base(x) + delta(x, *factors)``; ``delta``'s intermediates are recomputed in backward.

    ``base`` is the Linear / convolution with the frozen ``weight`` (its input gradient has an explicit
    formula, never a recomputation); ``delta`` is any differentiable function of x and the adapter parameters
    that computes in x's dtype. Backward re-runs ``delta`` under autograd and differentiates it — so only x,
    the weight and the parameters are saved, whatever ``delta`` builds on the way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv: ConvSpec | None, delta: Callable[..., torch.Tensor], *factors):
        dtype = x.dtype
        y = base_forward(x, weight.to(dtype), bias.to(dtype) if bias is not None else None, conv)
        y += delta(x, *factors)
        ctx.conv, ctx.delta, ctx.bias_dtype = conv, delta, bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, *factors = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_f = ctx.needs_input_grad[5:]
        dtype = x.dtype
        dy = dy.to(dtype)
        grad_x, grad_w = base_backward(dy, x, weight.to(dtype), ctx.conv, need_x, need_w)
        grad_f: list[torch.Tensor | None] = [None] * len(factors)
        if need_x or any(need_f):
            x_leaf, *leaves = _leaves([x, *factors], [need_x, *need_f])
            with torch.enable_grad():
                out = ctx.delta(x_leaf, *leaves)
            grad_dx, *grad_f = _grads_for([out], [dy], [x_leaf, *leaves])
            if need_x:
                grad_x += grad_dx
        grad_b = _bias_grad(dy, ctx.conv, ctx.bias_dtype) if need_b else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return (grad_x, grad_w, grad_b, None, None, *grad_f)


def delta_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: ConvSpec | None,
                delta: Callable[..., torch.Tensor], *factors: torch.Tensor) -> torch.Tensor:
    """Apply :class:`DeltaFunction`."""
    return DeltaFunction.apply(x, weight, bias, conv, delta, *factors)


# -- folded: W + ΔW, transient -------------------------------------------------------------------------
WeightBuild = Callable[..., torch.Tensor]


class FoldedFunction(torch.autograd.Function):
    """``y = base(x)`` with weight ``W' = build(W, *factors, dtype=x.dtype)`` (``W + ΔW``), one GEMM / conv.

    ``W'`` exists only inside forward and again inside backward (rebuilt under autograd): ``dx`` uses it,
    ``dW' = dyᵀx`` (the convolution's weight gradient) reaches the factors through ``build``'s graph. Dense
    transients live only while this layer's backward runs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv: ConvSpec | None, build: WeightBuild, *factors):
        dtype = x.dtype
        w_eff = build(weight, *factors, dtype=dtype)
        y = base_forward(x, w_eff, bias.to(dtype) if bias is not None else None, conv)
        del w_eff
        ctx.conv, ctx.build, ctx.bias_dtype = conv, build, bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, *factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, *factors = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_f = ctx.needs_input_grad[5:]
        dtype = x.dtype
        dy = dy.to(dtype)
        w_leaf, *leaves = _leaves([weight, *factors], [need_w, *need_f])
        with torch.enable_grad():
            w_eff = ctx.build(w_leaf, *leaves, dtype=dtype)
        need_weff = need_w or any(need_f)
        grad_x, grad_weff = base_backward(dy, x, w_eff.detach(), ctx.conv, need_x, need_weff)
        grads = [None] * (1 + len(factors))
        if need_weff:
            grads = _grads_for([w_eff], [grad_weff], [w_leaf, *leaves])
            del grad_weff
        grad_b = _bias_grad(dy, ctx.conv, ctx.bias_dtype) if need_b else None
        return (grad_x, grads[0], grad_b, None, None, *grads[1:])


def folded_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: ConvSpec | None,
                 build: WeightBuild, *factors: torch.Tensor) -> torch.Tensor:
    """Apply :class:`FoldedFunction`."""
    return FoldedFunction.apply(x, weight, bias, conv, build, *factors)


def positions(x: torch.Tensor, conv: ConvSpec | None, kernel: Sequence[int]) -> tuple[int, int]:
    """``(input positions, output positions)``: tokens for a Linear, batch × spatial sizes for a convolution."""
    if conv is None:
        tokens = x.numel() // x.shape[-1]
        return tokens, tokens
    spatial = x.shape[2:]
    return x.shape[0] * math.prod(spatial), x.shape[0] * math.prod(conv.output_size(spatial, kernel))
