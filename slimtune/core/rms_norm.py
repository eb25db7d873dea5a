"""A frozen RMSNorm as one autograd Function that saves its input and a float32 ``rstd`` per row, nothing more.

The RMSNorm of Llama-family models in transformers (``LlamaRMSNorm`` and its copies) is, for ``x [..., D]`` of dtype
``t`` and a weight ``w [D]`` of dtype t (or float32, as PEFT's ``prepare_model_for_kbit_training`` leaves norms: then
y is float32)::

    x32  = x.float()
    rstd = rsqrt(mean(x32², -1) + eps)               # float32 [..., 1]
    y    = w * (x32 * rstd).to(t)                     # two roundings to t: the normalised x, then the product

Run as those PyTorch ops with a frozen ``w``, autograd keeps the float32 copy ``x32`` (``pow`` and the product save
it: 4 bytes per element for a bf16 x) and rstd, and each op is a pass over the activations (about eight kernels
forward and ten backward). Backward needs only x and rstd (2 bytes per element and 4 per row)::

    dh  = (dy * w).to(t).float()                       # the gradient reaching the normalised x, rounded as autograd's
    dx  = rstd · dh − x32 · rstd³ · mean(dh ⊙ x32, -1)

:class:`RmsNormFunction` computes exactly this: on CUDA with one Triton kernel each way
(:mod:`.triton_rms_norm`), elsewhere with :func:`rms_norm_reference` / :func:`rms_norm_backward_reference` (the
same PyTorch ops as the module, so a CPU forward is the module's bit for bit). On the GPU the row sum runs in
another order than PyTorch's ``mean``, so ``rstd`` may differ in its last float32 bit and an element of y by one
unit in the last place of t, rarely (the module's own rounding); ``tests/core/test_rms_norm.py`` bounds it.

On CUDA, where the weight has x's dtype (:func:`fused_takes`), :mod:`.lean_layers` runs PyTorch's own
``F.rms_norm`` instead: one fused C++ kernel each way that keeps the same two tensors (x and a float32 rstd) and
costs the host less than half of this Function's Python and Triton launch (RESULTS.md run 65: 140 against 258 µs a
call with its backward). It rounds once, ``y = (w · x32 · rstd).to(t)``, where the module rounds the normalised x
first: an element of y may differ from the module's by one unit in the last place (the two roundings of the same
value: 26% of them in bf16 and fp16, none by more, RESULTS.md run 67; ``tests/core/test_lean_llama_cuda.py`` bounds
it), and dx is computed in float32 from dy without the module's rounding of ``dy · w``. Setting
:data:`FUSED_ON_CUDA` to False gives back this module's Triton kernels and the module's roundings. :class:`RmsNormFunction` stays for a float32 weight over bf16/fp16 activations, under
autocast, off CUDA and on the meta device (which keeps what the fused kernel keeps).
:mod:`.lean_layers` installs the lean norm on the transformers RMSNorm classes it knows.
"""
from __future__ import annotations

from typing import Any

import torch

from .autograd_state import fused_rms_norm_on_cuda
from .compute import autocasting
from .triton import use_triton

#: whether the lean norm runs as ``F.rms_norm`` on CUDA (this PyTorch fuses it, ``aten._fused_rms_norm``); set it to
#: False for the Triton kernels, which keep the transformers module's roundings
FUSED_ON_CUDA = fused_rms_norm_on_cuda()

#: The widest row the Triton kernels take (one row is one program's block); wider rows run the reference.
TRITON_MAX_COLS = 32768


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y ``[..., D]`` as the transformers module computes it (in the promoted dtype of x and weight),
    rstd float32 ``[..., 1]`` (x ``[..., D]``, weight ``[D]`` of x's dtype or float32)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward_reference(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                rstd: torch.Tensor) -> torch.Tensor:
    """``dx [..., D]`` (x's dtype) for ``y = rms_norm(x) · weight`` with a frozen weight: grad, x ``[..., D]``,
    weight ``[D]``, rstd float32 ``[..., 1]`` from the forward."""
    dh = (grad * weight).to(x.dtype).float()
    x32 = x.float()
    dot = (dh * x32).mean(-1, keepdim=True)
    return (rstd * dh - x32 * (rstd * rstd * rstd) * dot).to(x.dtype)


def takes_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :class:`RmsNormFunction` computes the module for this weight: x's dtype, or float32."""
    return weight.dtype is x.dtype or weight.dtype is torch.float32


def fused_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the lean norm runs as PyTorch's fused CUDA kernel (``F.rms_norm``, module docstring): x on CUDA, the
    weight ``[D]`` of x's dtype, no autocast (which would run it in float32), and this PyTorch fusing it."""
    return (x.is_cuda and weight.dtype is x.dtype and FUSED_ON_CUDA and weight.shape[-1] == x.shape[-1]
            and not autocasting(x))


def _triton_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return use_triton(x) and x.shape[-1] <= TRITON_MAX_COLS


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_reference`'s ``(y, rstd)``, by the Triton kernel where it runs (then rstd is ``[N]`` for the
    ``N`` rows of x); on the meta device just the outputs' shapes (what the kernel allocates)."""
    if x.device.type == "meta":
        y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        return y, x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)
    if _triton_takes(x, weight):
        from .triton_rms_norm import rms_norm_forward_triton

        return rms_norm_forward_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """:func:`rms_norm_backward_reference`'s ``dx``, by the Triton kernel where it runs."""
    if x.device.type == "meta":
        return torch.empty_like(x)
    if _triton_takes(x, weight):
        from .triton_rms_norm import rms_norm_backward_triton

        return rms_norm_backward_triton(grad, x, weight, rstd)
    return rms_norm_backward_reference(grad, x, weight, rstd.view(*x.shape[:-1], 1))


class RmsNormFunction(torch.autograd.Function):
    """``y = weight * (x.float() * rsqrt(mean(x², -1) + eps)).to(x.dtype)`` for a frozen weight (module docstring):
    x ``[..., D]``, weight ``[D]`` of x's dtype or float32 -> y ``[..., D]``. Saves x and a float32 rstd per row; backward
    returns ``dx`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        return rms_norm_backward(grad, x, weight, rstd), None, None
