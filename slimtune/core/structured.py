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
(not a cast copy; for a 4-bit base only its handle, on ``ctx``) and the adapter's parameters (and what an op's
:meth:`~StructuredOp.build` forms from them, factor-sized) — nothing of size ``N·R``, no dense ``ΔW``, no fp32
copy of an activation, no dequantised weight. A 4-bit base
(:class:`~slimtune.core.frozen.QuantizedWeight`) is dequantised by :func:`~slimtune.core.frozen.materialize`
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
from .rebuild import keep_input, kept_input
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

    def build(self, params: Params, scale: Any) -> Any:
        """What forward forms from the parameters and backward reuses (factor-sized tensors, kept on ``ctx``
        rather than formed again), handed to :meth:`add_delta` and :meth:`delta_backward` as ``built``; None (the
        default): nothing kept."""
        return None

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, params: Params, scale: Any, built: Any) -> torch.Tensor:
        """``y + delta(x)`` (``y`` is the base output, fresh: accumulate into it where possible)."""
        raise NotImplementedError

    def delta_backward(self, dy: torch.Tensor, x: torch.Tensor, params: Params, scale: Any,
                       grad_x: torch.Tensor | None, need: Sequence[bool], built: Any) -> list[Grad]:
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


def _save(ctx: Any, op: StructuredOp | FoldOp, scale: Any, bias: torch.Tensor | None, weight: WeightOperand,
          x: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """What both Functions keep: the op and its scale, the bias's dtype, and x, W (or its 4-bit handle), the
    parameters — the tensors themselves, no copies."""
    ctx.op, ctx.scale, ctx.bias_dtype = op, scale, None if bias is None else bias.dtype
    save_with_weight(ctx, weight, *keep_input(ctx, x), *params)  # x, or its recipe (core.rebuild)


class _Backward:
    """A backward's inputs, as both Functions need them: x, the weight operand, the parameters (as saved and cast
    to x's dtype), dy in x's dtype and contiguous (the ops view it; autograd may hand over a strided one), and
    which inputs want a gradient."""

    def __init__(self, ctx: Any, dy: torch.Tensor) -> None:
        self.weight, saved = saved_with_weight(ctx)
        self.x, self.params = kept_input(ctx, saved)
        dtype = self.x.dtype
        self.dy = cast(dy, dtype).contiguous()
        self.need_x, self.need_w, self.need_b = ctx.needs_input_grad[:3]
        self.need_p = ctx.needs_input_grad[5:]
        self.op, self.scale, self.dtype = ctx.op, ctx.scale, dtype
        self.cast_params = [cast(p, dtype) for p in self.params]
        self.grad_b = _bias_grad(self.dy, ctx.op.conv, ctx.bias_dtype) if self.need_b else None

    def result(self, grad_x: Grad, grad_w: Grad, grads: Sequence[Grad]) -> tuple:
        """The Function's gradients, in the order of its inputs; each in its input's dtype."""
        grad_w = cast(grad_w, self.weight.dtype) if grad_w is not None else None
        param_grads = [None if g is None else cast(g, p.dtype) for g, p in zip(grads, self.params)]
        return (grad_x, grad_w, self.grad_b, None, None, *param_grads)


def _bias_in(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else cast(bias, dtype)


class StructuredFunction(torch.autograd.Function):
    """``y = base(x; W, b) + op.delta(x)``: the base GEMM / convolution and the op's structured update.

    Backward, as the code does it (``dy`` in x's dtype; ``W`` dequantised again for a 4-bit base):

    * ``dx = dy W`` (a convolution: its input gradient) and, only if W asks for one, ``dW = dyᵀ x`` —
      :func:`base_backward`, the base layer's own gradients (``y = base(x) + delta(x)`` is a sum);
    * ``dx += (∂delta/∂x)ᵀ dy`` and the parameters' gradients: ``op.delta_backward`` (the op's explicit chain rule
      through its factors, documented on each op);
    * ``db = Σ dy`` over every axis but the output channel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op: StructuredOp, scale, *params):
        dtype = x.dtype
        cast_params = [cast(p, dtype) for p in params]
        y = base_forward(x, materialize(weight, dtype), _bias_in(bias, dtype), op.conv)  # dense copy: a temporary
        ctx.built = built = op.build(cast_params, scale)  # factor-sized, or None
        y = op.add_delta(y, x, cast_params, scale, built)
        _save(ctx, op, scale, bias, weight, x, params)
        return y

    @staticmethod
    def backward(ctx, dy):
        b = _Backward(ctx, dy)
        grad_x = grad_w = None
        if b.need_x or b.need_w:
            grad_x, grad_w = base_backward(b.dy, b.x, materialize(b.weight, b.dtype), b.op.conv, b.need_x, b.need_w)
        grads: list[Grad] = [None] * len(b.params)
        if b.need_x or any(b.need_p):
            grads = b.op.delta_backward(b.dy, b.x, b.cast_params, b.scale, grad_x, b.need_p, ctx.built)
        return b.result(grad_x, grad_w, grads)


def structured_apply(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, op: StructuredOp,
                     scale: Any, *params: torch.Tensor) -> torch.Tensor:
    """Apply :class:`StructuredFunction` (``weight``: the base weight, dense or a 4-bit handle)."""
    return StructuredFunction.apply(x, weight, bias, op, scale, *params)


class FoldedFunction(torch.autograd.Function):
    """``y = base(x)`` with weight ``W' = W + ΔW`` formed by ``op.fold`` in x's dtype: one GEMM / convolution.

    ``W'`` exists only inside forward and again inside backward. Backward, as the code does it:

    * ``W' = W + ΔW`` again (``op.fold``), then :func:`base_backward` with it: ``dx = dy W'`` and
      ``G = dyᵀ x`` — the gradient with respect to ``W'``, which is also W's own (``∂W'/∂W = I``);
    * the parameters' gradients from G: ``op.fold_backward`` (``∂ΔW/∂θ`` applied to G: the Hadamard / Kronecker /
      low-rank / Tucker products' gradients); ``dW = G`` only if W asks for one;
    * or, where the op offers it and W needs no gradient, ``op.fused_backward`` does all of it in fewer launches
      (LoHa on the GPU: G, one kernel for W' and the factor gradients, then dx);
    * ``db = Σ dy`` over every axis but the output channel.

    Dense transients live only while this layer's forward or backward runs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op: FoldOp, scale, *params):
        dtype = x.dtype
        dense = materialize(weight, dtype)
        w_eff, _ = op.fold(dense, [cast(p, dtype) for p in params], scale, inplace=dense is not weight)
        del dense
        y = base_forward(x, w_eff, _bias_in(bias, dtype), op.conv)
        del w_eff
        _save(ctx, op, scale, bias, weight, x, params)
        return y

    @staticmethod
    def backward(ctx, dy):
        b = _Backward(ctx, dy)
        dense = materialize(b.weight, b.dtype)
        inplace = dense is not b.weight  # a fresh copy (cast or dequantised) may take W' in place
        if not b.need_w and any(b.need_p):
            fused = b.op.fused_backward(dense, b.cast_params, b.scale, b.dy, b.x, b.need_x, b.need_p, inplace)
            if fused is not None:
                return b.result(*fused[:1], None, fused[1])
        w_eff, parts = b.op.fold(dense, b.cast_params, b.scale, inplace=inplace)
        del dense
        grad_x, g = base_backward(b.dy, b.x, w_eff, b.op.conv, b.need_x, b.need_w or any(b.need_p))
        del w_eff
        grads: list[Grad] = [None] * len(b.params)
        if any(b.need_p):
            grads = b.op.fold_backward(g, b.cast_params, parts, b.scale, b.need_p)
        return b.result(grad_x, g if b.need_w else None, grads)


def folded_apply(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, op: FoldOp, scale: Any,
                 *params: torch.Tensor) -> torch.Tensor:
    """Apply :class:`FoldedFunction`."""
    return FoldedFunction.apply(x, weight, bias, op, scale, *params)
