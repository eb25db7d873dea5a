"""Training paths for updates with structure (LoHa's Hadamard product, LoKr's Kronecker product).

A structured update ``ΔW`` (``[d_out, d_in]``, or a convolution kernel) can be applied two ways; neither keeps
a dense ``ΔW`` alive across layers or from forward to backward:

* **structured** — through its factors, never forming ``ΔW`` (:class:`StructuredFunction`): LoHa as a rank-``r²``
  product, LoKr as two small contractions on ``x`` reshaped ``[N, a_in, b_in]``;
* **folded** — ``W + ΔW`` formed transiently in the compute dtype, one GEMM / convolution with it, and formed
  again in backward rather than saved (:class:`FoldedFunction`).

The method-specific work is an *op* object (:class:`StructuredOp` / :class:`FoldOp`, in ``methods/loha/ops.py``
and ``methods/lokr/ops.py``) with an explicit forward and an explicit backward: backward never runs autograd (no
``torch.autograd.grad``, no graph built inside it). The factor products (face-splitting, Kronecker, Tucker,
low-rank) and their gradients are in :mod:`slimtune.core.products`.

Every Function saves ``x`` itself (the very tensor object, so q/k/v store it once), the frozen base weight
(not a cast copy; for a 4-bit base only its handle, on ``ctx``) and the adapter's parameters — nothing of size
``N·R``, no dense ``ΔW``, no fp32 copy of an activation, no dequantised weight. A 4-bit base
(:class:`~slimtune.quant.frozen.QuantizedWeight`) is dequantised by :func:`~slimtune.quant.frozen.materialize`
right before each GEMM that needs it and dropped after. GEMMs run in ``x``'s dtype; fp32 adapter parameters
are cast once per forward / backward and their gradients returned in fp32.

:func:`slimtune.core.costs.choose_path` picks the path per layer and per call from FLOP, byte and launch counts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .compute import cast
from .frozen import WeightOperand, materialize, save_with_weight, saved_with_weight
from .products import Grad

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
