"""A frozen diffusers ``ResnetBlock2D`` as one autograd Function (installed by :mod:`.lean_layers` on the ResNet blocks
that hold no adapter: LoRA's, whose targets are the attention and feed-forward layers).

The block, for x ``[B, C_in, H, W]`` and the time embedding t ``[B, T]``::

    h1 = conv1(silu(norm1(x))) + proj(silu(t))[:, :, None, None]
    y  = (shortcut(x) + conv2(dropout(silu(norm2(h1))))) / output_scale_factor

Run as diffusers runs it, PyTorch's autograd keeps six tensors the size of the activations: x, norm1's output,
SiLU's output (conv1's input), h1, norm2's output and its SiLU's output. The frozen layers' input gradient needs
only x and h1 (each GroupNorm rebuilds its output from its input in backward, one memory-bound pass, and a frozen
convolution's input gradient needs only its weight). The lean layers one by one
(:class:`~.lean_layers.NormSiluFunction`, :class:`~.lean_layers.FrozenConvFunction`) keep the same two, but as four
Python autograd nodes plus PyTorch's own: ~225 µs of host time per block and step more than the plain block on the
CPU box, against ~85 µs here (RESULTS.md run 95). This Function runs the block's ops under ``no_grad`` in forward
(no autograd bookkeeping per op) and its backward in one node, with the kernels autograd's nodes run
(:mod:`.aten_grads`), so values and gradients are the plain block's bit for bit (tested). It keeps x, h1 and the two
norms' statistics (``[B, groups]``).

Where the block is anything else — up- or downsampling inside, a ``scale_shift`` time embedding norm, dropout in
training, autocast on, a parameter or the time embedding asking for a gradient, ``torch.compile`` tracing — the
block runs its own forward (its layers' lean forwards apply there as before).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .aten_grads import conv_input_grad, group_norm_input_grad, group_norm_with_stats, silu_grad
from .compute import autocasting
from .tracing import compiling


def _norm(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_norm_with_stats(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_input_grad(conv: nn.Conv2d, grad: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return conv_input_grad(grad, conv.weight, shape, conv.stride, conv.padding, conv.dilation, conv.groups)


class ResnetBlockFunction(torch.autograd.Function):
    """The block of the module docstring on x ``[B, C_in, H, W]`` and t ``[B, T]`` (or None) -> ``[B, C_out, H', W']``;
    saves x, h1 and the norms' statistics. x comes twice, the shortcut's and the main path's, so that autograd
    receives their two gradients one after the other, as from the plain block, and adds them to x's other
    consumers' in the plain block's order (the sum is then the same bit for bit). Backward, for dy:
    ``g = dy / output_scale_factor`` and the shortcut's input gradient of g, first; ``dh1`` through conv2's input
    gradient, SiLU's backward on norm2's output (rebuilt from h1) and norm2's input gradient; ``dx`` through conv1,
    SiLU (norm1's output rebuilt from x) and norm1 the same way. x is the only input that gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x_shortcut: torch.Tensor, x: torch.Tensor, temb: torch.Tensor | None,
                block: nn.Module) -> torch.Tensor:
        h0, mean1, rstd1 = _norm(block.norm1, x)
        h1 = _conv(block.conv1, F.silu(h0))
        del h0
        if temb is not None:  # with a time embedding projection (applies() checked both)
            t = temb if block.skip_time_act else F.silu(temb)
            h1 = h1 + F.linear(t, block.time_emb_proj.weight, block.time_emb_proj.bias)[:, :, None, None]
        h2, mean2, rstd2 = _norm(block.norm2, h1)
        out = _conv(block.conv2, F.silu(h2))
        del h2
        shortcut = x_shortcut if block.conv_shortcut is None else _conv(block.conv_shortcut, x_shortcut.contiguous())
        ctx.save_for_backward(x, h1, mean1, rstd1, mean2, rstd2)
        ctx.block = block
        scale = block.output_scale_factor
        return (shortcut + out) / scale if scale != 1 else shortcut.add(out)  # x / 1 is x, bit for bit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x, h1, mean1, rstd1, mean2, rstd2 = ctx.saved_tensors
        block = ctx.block
        scale = block.output_scale_factor
        g = grad / scale if scale != 1 else grad
        shortcut_grad = g if block.conv_shortcut is None else _conv_input_grad(block.conv_shortcut, g, tuple(x.shape))
        ds2 = _conv_input_grad(block.conv2, g, tuple(h1.shape))
        h2 = _norm(block.norm2, h1)[0]
        dh1 = group_norm_input_grad(silu_grad(ds2, h2), h1, mean2, rstd2, block.norm2.weight, block.norm2.num_groups)
        del ds2, h2
        ds0 = _conv_input_grad(block.conv1, dh1, tuple(x.shape))
        del dh1
        h0 = _norm(block.norm1, x)[0]
        dx = group_norm_input_grad(silu_grad(ds0, h0), x, mean1, rstd1, block.norm1.weight, block.norm1.num_groups)
        return shortcut_grad, dx, None, None


def fits(block: nn.Module) -> bool:
    """Whether ``block`` (a diffusers ``ResnetBlock2D`` with its class's forward) has the form this Function runs:
    GroupNorms, SiLU, plain Conv2d layers with zero padding given in numbers, no up- or downsampling inside, the
    ``default`` time embedding norm, a plain Linear (or none) for the time embedding, a Dropout. (Whether they are
    frozen is asked per call: :func:`applies`.)"""
    convs = [block.conv1, block.conv2] + ([block.conv_shortcut] if block.conv_shortcut is not None else [])
    nonlinearity = block.nonlinearity
    return (block.upsample is None and block.downsample is None and block.time_embedding_norm == "default"
            and all(type(n) is nn.GroupNorm for n in (block.norm1, block.norm2))  # exact types: no adapter, no subclass
            and type(nonlinearity) is nn.SiLU and not nonlinearity.inplace
            and all(type(c) is nn.Conv2d and c.padding_mode == "zeros" and not isinstance(c.padding, str)
                    for c in convs)
            and (block.time_emb_proj is None or type(block.time_emb_proj) is nn.Linear)
            and isinstance(block.dropout, nn.Dropout) and isinstance(block.output_scale_factor, (int, float)))


def applies(block: nn.Module, x: Any, temb: Any) -> bool:
    """Whether this call runs as :class:`ResnetBlockFunction` (checked on the host every call): a 4-D x that asks for a
    gradient with gradients on, a time embedding that does not, no dropout in training, autocast off (the block's
    casts would differ), the block's parameters still frozen, not under ``torch.compile`` (whose partitioner decides
    what a graph saves)."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.requires_grad and torch.is_grad_enabled()) \
            or compiling():
        return False
    if (temb is None) != (block.time_emb_proj is None):  # diffusers' own forward decides (or raises) then
        return False
    if temb is not None and (not isinstance(temb, torch.Tensor) or temb.requires_grad):
        return False
    if (block.training and block.dropout.p > 0) or autocasting(x):
        return False
    for layer in _layers(block):
        if layer is not None:
            for p in (layer.weight, layer.bias):  # None for a GroupNorm without affine parameters, a layer without bias
                if p is not None and p.requires_grad:
                    return False
    return True


def _layers(block: nn.Module) -> tuple[nn.Module | None, ...]:
    """The layers whose parameters :class:`ResnetBlockFunction` reads (:func:`fits` checked they are plain GroupNorm,
    Conv2d and Linear layers, so weight and bias, or None, are all they hold)."""
    return (block.norm1, block.conv1, block.time_emb_proj, block.norm2, block.conv2, block.conv_shortcut)
