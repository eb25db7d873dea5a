"""LoRA on a convolution (LoCon) as one autograd Function: ``y = conv(x; W, b) + conv(conv(x; A); s·B)``.

Shapes: x ``[B, C_in, *spatial]``, W ``[C_out, C_in/groups, *k]`` (frozen), A ("down") ``[r, C_in, *k]`` with the base's
stride, padding and dilation, B ("up") ``[C_out, r/groups, 1(, 1)]``, a 1x1 convolution with the base's groups; s the
scaling. :func:`~.lowrank.conv_low_rank_forward` is the same composition through PyTorch's autograd, and the
reference.

What the Function changes against that composition: one Python autograd node where PyTorch's has five (three
convolutions, the scaling of B, the sum), and what is kept — x (the very tensor, or where a block offers it the
recipe it is rebuilt from: :func:`~.rebuild.keep_input`, so no saved-tensor hooks run around the call) and the
parameters; not ``h = conv(x; A)`` ``[B, r, *out]`` (the composition keeps it for B's gradient), which backward
recomputes (one convolution to r channels). Backward runs the ops autograd's own nodes run
(:func:`~.aten_grads.conv_grads`), in the same order, so values and gradients are the composition's bit for bit::

    h = conv(x; A)                          (recomputed)
    dh, d(sB) = conv_grads(dy; h, sB)       (the 1x1 convolution's input and weight gradients)
    dx_A, dA = conv_grads(dh; x, A)
    dx = conv_grads(dy; x, W) + dx_A        dB = s·d(sB)        db = Σ dy (only where b asks for it)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .aten_grads import conv_grads
from .compute import cast
from .rebuild import keep_input, kept_input

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: ``(stride, padding, dilation, groups)`` of the base convolution
Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]


def _scaled_up(up: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``s·B`` in ``dtype``: scaled in B's own dtype, then cast (as the composition's ``(lora_B * s).to(dtype)``)."""
    return cast(up * scaling, dtype)


class LowRankConvFunction(torch.autograd.Function):
    """``conv(x; W, b) + conv(conv(x; A); s·B)`` (module docstring). Arguments: x, W, b (or None), A, B, s, then the
    base's :data:`Geometry`. W and b in x's dtype; A and B in any float dtype (cast for the convolutions, their
    gradients in theirs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scaling: float, geometry: Geometry) -> torch.Tensor:
        stride, padding, dilation, groups = geometry
        conv, dtype = _CONV[weight.dim() - 2], x.dtype
        y = conv(x, weight, bias, stride, padding, dilation, groups)
        h = conv(x, cast(down, dtype), None, stride, padding, dilation)
        y.add_(conv(h, _scaled_up(up, scaling, dtype), None, 1, 0, 1, groups))
        ctx.save_for_backward(*keep_input(ctx, x), weight, down, up)  # x, or its recipe (core.rebuild)
        ctx.scaling, ctx.geometry = scaling, geometry
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, (weight, down, up) = kept_input(ctx, ctx.saved_tensors)
        stride, padding, dilation, groups = geometry = ctx.geometry
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dtype, s = x.dtype, ctx.scaling
        dy = cast(dy, dtype)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x or need_a or need_b:
            a = cast(down, dtype)
            h = _CONV[weight.dim() - 2](x, a, None, stride, padding, dilation)  # the composition's h, recomputed
            ones = (1,) * len(stride)
            dh, d_up, _ = conv_grads(dy, h, _scaled_up(up, s, dtype), ones, (0,) * len(stride), ones, groups,
                                     (need_x or need_a, need_b, False))
            del h
            if need_b:
                grad_b = cast(d_up, up.dtype) * s
            if dh is not None:
                dx_lora, grad_a, _ = conv_grads(dh, x, a, stride, padding, dilation, 1, (need_x, need_a, False))
                grad_a = None if grad_a is None else cast(grad_a, down.dtype)
        if need_x or need_w or need_bias:
            grad_x, grad_w, grad_bias = conv_grads(dy, x, weight, *geometry, (need_x, need_w, need_bias))
        if need_x:
            grad_x = grad_x + dx_lora
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def lowrank_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                 up: torch.Tensor, scaling: float, geometry: Geometry) -> torch.Tensor:
    """Apply :class:`LowRankConvFunction` (a batched x; W and b in x's dtype)."""
    return LowRankConvFunction.apply(x, weight, bias, down, up, scaling, geometry)
