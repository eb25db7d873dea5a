"""The ATen kernels the lean layers (:mod:`.lean_layers`, :mod:`.lean_resnet`) and LoKr's convolution backward
(:class:`~slimtune.methods.lokr.ops.LokrConvOp`) call directly: SiLU's, GELU's, a
convolution's and a GroupNorm's input gradients, the very ops autograd's own ``SiluBackward0`` / ``GeluBackward0`` /
``ConvolutionBackward0`` / ``NativeGroupNormBackward0`` nodes run (a convolution's weight and bias gradients too, for
LoCon's convolutions inside a ResNet block's Function), and the GroupNorm forward that also returns the
statistics that backward takes. Called from inside a custom backward, the first two replace a nested
``torch.autograd.grad`` pass through ``F.silu`` / ``F.gelu`` — the same numbers, bit for bit, without starting the
autograd engine again (tens of microseconds of host time per call, dozens of calls per UNet step) — and the third is
the op ``torch.nn.grad.conv2d_input`` wraps, with the arguments autograd's node passes (the wrapper's own host cost
is within the noise: RESULTS.md run 95). A transposed
convolution (public ``F.conv_transpose2d``) gives the same gradient, but cuDNN's default backward-data algorithms do
not repeat bit for bit in float64 and for 3-D kernels, autograd's own included (RESULTS.md runs 85, 88): the tests
compare under its deterministic algorithms.

They are ATen operators (``torch.ops.aten``), not Python-level API, so they are kept here alone;
``tests/core/test_aten_grads.py`` compares each with autograd's result bit for bit, in every float dtype, and fails
loudly if a PyTorch release renames them or changes what they compute.
"""
from __future__ import annotations

import torch


def silu_grad(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d silu(h) / dh · grad`` as autograd computes it (``aten.silu_backward``); grad and h of one shape and dtype."""
    return torch.ops.aten.silu_backward(grad, h)


def gelu_grad(grad: torch.Tensor, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``d gelu(x) / dx · grad`` as autograd computes it for ``F.gelu(x, approximate=...)``
    (``aten.gelu_backward``)."""
    return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)


def conv_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape: tuple[int, ...], stride: tuple[int, ...],
                    padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """The input gradient ``[B, C_in, *spatial]`` (``input_shape``) of ``conv{1,2,3}d(x, weight, None, stride, padding,
    dilation, groups)`` for the output gradient ``grad`` ``[B, C_out, *out_spatial]``, as autograd computes it for a
    frozen weight (``aten.convolution_backward``, only the input's gradient asked for); stride, padding and dilation
    as tuples of ints, one per spatial dimension. The op reads only the input's shape: a one-element expanded
    tensor stands in for it."""
    shape_only = grad.new_empty(1).expand(input_shape)
    return conv_grads(grad, shape_only, weight, stride, padding, dilation, groups, (True, False, False))[0]


def conv_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...],
               padding: tuple[int, ...], dilation: tuple[int, ...], groups: int, need: tuple[bool, bool, bool]
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW, db)`` of ``conv{1,2,3}d(x, weight, b, stride, padding, dilation, groups)`` for the output gradient
    ``grad``, those of ``need`` asked for (the others None), as autograd's node computes them
    (``aten.convolution_backward``): x ``[B, C_in, *spatial]``, weight ``[C_out, C_in/groups, *kernel]``."""
    dx, dw, db = torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]] if need[2] else None, stride,
                                                     padding, dilation, False, [0] * len(stride), groups, need)
    return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None)


def group_norm_with_stats(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(group_norm(x), mean, rstd)`` for x ``[B, C, *]``: the op ``F.group_norm`` runs (``aten.native_group_norm``),
    with the per-(sample, group) statistics ``[B, groups]`` its backward takes."""
    batch, channels = x.shape[0], x.shape[1]
    return torch.ops.aten.native_group_norm(x, weight, bias, batch, channels, x[0, 0].numel(), groups, eps)


def group_norm_input_grad(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                          weight: torch.Tensor | None, groups: int) -> torch.Tensor:
    """The input gradient ``[B, C, *]`` of a GroupNorm with frozen affine parameters, as autograd computes it
    (``aten.native_group_norm_backward``, only the input's gradient asked for); ``mean``, ``rstd`` from
    :func:`group_norm_with_stats`."""
    batch, channels = x.shape[0], x.shape[1]
    return torch.ops.aten.native_group_norm_backward(grad, x, mean, rstd, weight, batch, channels, x[0, 0].numel(),
                                                     groups, [True, False, False])[0]
