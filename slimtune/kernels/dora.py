"""The DoRA training path without the dense product: factored row norm, scale Function, composition tail.

DoRA (Liu et al.) rescales each output row of the LoRA-updated weight ``V = W + s·B A``::

    y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b,   g = m / ‖V‖_row   (‖V‖_row treated as a constant: no gradient)

Shapes: x ``[..., d_in]``, W ``[d_out, d_in]`` (frozen), A ``[r, d_in]``, B ``[d_out, r]``, m / g / b ``[d_out]``.
The bias is added unscaled, as PEFT does.

* :func:`factored_row_norm_sq` gets ``‖V‖²_row = ‖W‖²_row + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B)``
  (computed as ``‖W‖² + s·rowsum((2·W Aᵀ + s·B (A Aᵀ)) ⊙ B)``) from ``[d_out, r]`` / ``[r, r]`` intermediates:
  no ``[d_out, d_in]`` tensor is formed.
* The layer is ``z = x Wᵀ + s·(x Aᵀ) Bᵀ`` — the LoRA Function of :mod:`slimtune.kernels.lora`, unchanged —
  followed by :class:`DoraScaleFunction`, ``out = z + (g − 1)·z + b``. ``g − 1`` is formed as
  ``(m − ‖V‖) / ‖V‖`` in fp32, never as a rounded ``g`` minus one (no cancellation near g = 1, where DoRA's
  magnitudes live), and ``g = 1`` gives back ``z`` bit for bit.
* Saved for backward: x and the parameters (by the LoRA Function), z ``[N, d_out]`` in the activation dtype
  and the ``[d_out]`` fp32 vectors ``‖V‖``, ``g − 1``. ``dm = Σ_tokens(dy ⊙ z) / ‖V‖`` needs the pre-scale
  product z; keeping it (one activation-dtype ``[N, d_out]`` tensor) is what saves recomputing the base GEMM
  ``x Wᵀ`` in backward, which would cost as much as the whole LoRA backward's GEMMs on x. z is released when
  the scale Function's backward returns ``dz = g ⊙ dy``, before the LoRA backward allocates ``dx``, so the
  backward's transient peak is LoRA's.

The elementwise tail (forward ``out``; backward ``dz`` and the ``dm`` column sums, in one pass) runs as fused
Triton kernels on CUDA (:mod:`slimtune.kernels.dora_triton`), else as the plain-PyTorch references here.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .lora import lora_linear

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_NORM_CHUNK = 1 << 22  # elements of W upcast at a time for ‖W‖²_row


# -- the factored norm ----------------------------------------------------------------------------------
def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def weight_row_norm_sq(weight2d: torch.Tensor) -> torch.Tensor:
    """``‖W‖²_row`` ``[d_out]`` in fp32 (fp64 for fp64 W), upcasting a few rows at a time (no fp32 copy of W)."""
    acc = accumulate_dtype(weight2d.dtype)
    rows = max(1, _NORM_CHUNK // max(1, weight2d.shape[1]))
    return torch.cat([chunk.to(acc).pow(2).sum(1) for chunk in weight2d.split(rows)])


@torch.no_grad()
def factored_row_norm_sq(weight2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                         weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``‖W + s·B A‖²_row`` ``[d_out]``, fp32 (fp64 for fp64 W), clamped at 0; no ``[d_out, d_in]`` tensor.

    weight2d ``[d_out, d_in]``, lora_a ``[r, d_in]``, lora_b ``[d_out, r]``; ``weight_sq``: a cached
    ``‖W‖²_row``. ``W Aᵀ`` runs in W's dtype (fp32 accumulation inside the GEMM); the ``[r, r]`` Gram
    ``A Aᵀ`` and everything after in fp32.
    """
    acc = accumulate_dtype(weight2d.dtype)
    if weight_sq is None:
        weight_sq = weight_row_norm_sq(weight2d)
    a, b = lora_a.to(acc), lora_b.to(acc)
    cross = (weight2d @ lora_a.to(weight2d.dtype).t()).to(acc)  # W Aᵀ, [d_out, r]
    mixed = torch.addmm(cross, b, a @ a.t(), beta=2, alpha=scaling)  # 2·W Aᵀ + s·B (A Aᵀ), [d_out, r]
    norm_sq = torch.add(weight_sq.to(acc), torch.linalg.vecdot(mixed, b, dim=1), alpha=scaling)
    return norm_sq.clamp_min_(0)


def dense_row_norm(weight2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + s·B A‖_row`` through the dense ``[d_out, d_in]`` sum: the reference for tests and benchmarks."""
    acc = accumulate_dtype(weight2d.dtype)
    return (weight2d.to(acc) + scaling * (lora_b.to(acc) @ lora_a.to(acc))).norm(dim=1)


def dora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA by its definition, through PyTorch's autograd: ``x (g·V)ᵀ + b`` with the dense V, norm detached."""
    v = weight + scaling * (lora_b @ lora_a)
    g = magnitude / v.norm(dim=1).detach()
    return F.linear(x, g[:, None] * v, bias)


# -- the composition tail: references --------------------------------------------------------------------
def _channel_view(vec: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``[C]`` -> broadcastable against ``like`` along ``dim``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return vec.view(shape)


def compose_forward_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None,
                              scaling: float = 1.0, bias: torch.Tensor | None = None,
                              dim: int = -1) -> torch.Tensor:
    """``base + (g−1)·base + g·s·lora + b`` in fp32 (fp64 for fp64), returned in base's dtype.

    base / lora ``[..., C, ...]`` with the channel axis ``dim``; gm1 (``g − 1``), bias ``[C]``.
    """
    acc = accumulate_dtype(base.dtype)
    gm1 = _channel_view(gm1.to(acc), base, dim)
    b = base.to(acc)
    out = b + gm1 * b
    if lora is not None:
        out = out + (1 + gm1) * scaling * lora.to(acc)
    if bias is not None:
        out = out + _channel_view(bias.to(acc), base, dim)
    return out.to(base.dtype)


def compose_backward_reference(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor,
                               lora: torch.Tensor | None = None, scaling: float = 1.0,
                               dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dbase, dm_sum)``: ``dbase = g·dy`` in base's dtype (``dlora = s·dbase``) and the fp32 channel sums
    ``Σ dy ⊙ (base + s·lora)`` ``[C]`` (``dm = dm_sum / ‖V‖``)."""
    acc = accumulate_dtype(base.dtype)
    dy = dy.to(acc)
    pre = base.to(acc) if lora is None else base.to(acc) + scaling * lora.to(acc)
    sum_dims = [d for d in range(base.dim()) if d != dim % base.dim()]
    dm_sum = (dy * pre).sum(sum_dims)
    return (dy * _channel_view(g.to(acc), base, dim)).to(base.dtype), dm_sum


# -- dispatch ---------------------------------------------------------------------------------------------
def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors in fp32/fp16/bf16; on the CPU only under ``TRITON_INTERPRET=1`` (tests)."""
    if not _HAS_TRITON or t.dtype not in _TRITON_DTYPES:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def compose_forward(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None, scaling: float = 1.0,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    dim: int = -1) -> torch.Tensor:
    """:func:`compose_forward_reference`, fused on the GPU; ``out`` (may be ``base`` itself) receives it."""
    if dim % base.dim() == base.dim() - 1 and base.is_contiguous() and use_triton(base):
        from . import dora_triton

        return dora_triton.compose_forward(base, gm1, lora, scaling, bias, out)
    result = compose_forward_reference(base, gm1, lora, scaling, bias, dim)
    return out.copy_(result) if out is not None else result


def compose_backward(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor, lora: torch.Tensor | None = None,
                     scaling: float = 1.0, dbase_out: torch.Tensor | None = None,
                     dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compose_backward_reference` in one fused pass on the GPU; ``dbase_out`` may be ``base`` itself."""
    if dim % base.dim() == base.dim() - 1 and base.is_contiguous() and use_triton(base):
        from . import dora_triton

        return dora_triton.compose_backward(dy, base, g, lora, scaling, dbase_out)
    dbase, dm_sum = compose_backward_reference(dy, base, g, lora, scaling, dim)
    return (dbase_out.copy_(dbase) if dbase_out is not None else dbase), dm_sum


# -- the scale Function and the layer -------------------------------------------------------------------------
class DoraScaleFunction(torch.autograd.Function):
    """``out = z + (g − 1)·z + b`` along channel axis ``dim``, ``g = m / norm``, norm constant.

    z ``[..., C, ...]``; magnitude: C elements (any shape, e.g. PEFT's ``[1, C, 1, 1]`` for convolutions);
    norm ``[C]`` fp32, no grad; bias ``[C]`` or None. Saves z and the ``[C]`` fp32 vectors norm and g − 1;
    backward: ``dz = g·dy``, ``dm = Σ dy ⊙ z / norm`` (one fused pass), ``db = Σ dy``.
    """

    @staticmethod
    def forward(ctx, z, magnitude, norm, bias, dim: int):
        m = magnitude.detach().reshape(-1).to(norm.dtype)
        gm1 = (m - norm) / norm
        out = compose_forward(z, gm1, bias=bias, dim=dim)
        ctx.save_for_backward(z, norm, gm1)
        ctx.dim, ctx.has_bias = dim, bias is not None
        ctx.magnitude_shape, ctx.magnitude_dtype = magnitude.shape, magnitude.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        z, norm, gm1 = ctx.saved_tensors
        need_z, need_m, _, need_bias = ctx.needs_input_grad[:4]
        grad_z = grad_m = grad_bias = None
        if need_z or need_m:
            dz, dm_sum = compose_backward(dy, z, gm1 + 1, dim=ctx.dim)
            grad_z = dz if need_z else None
            if need_m:
                grad_m = (dm_sum / norm).to(ctx.magnitude_dtype).view(ctx.magnitude_shape)
        if need_bias and ctx.has_bias:
            dims = [d for d in range(dy.dim()) if d != ctx.dim % dy.dim()]
            grad_bias = dy.sum(dims)
        return grad_z, grad_m, None, grad_bias, None


def dora_scale(z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None,
               dim: int = -1) -> torch.Tensor:
    """Apply :class:`DoraScaleFunction`; without autograd the tail runs in place in z (a fresh tensor)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, magnitude, bias)):
        return DoraScaleFunction.apply(z, magnitude, norm, bias, dim)
    gm1 = (magnitude.detach().reshape(-1).to(norm.dtype) - norm) / norm
    return compose_forward(z, gm1, bias=bias, out=z, dim=dim)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                dropout_p: float = 0.0) -> torch.Tensor:
    """DoRA on a dense Linear: the LoRA Function for z, then :class:`DoraScaleFunction`.

    ``weight``/``bias`` in x's dtype; ``norm`` = ``‖W + s·B A‖_row`` ``[d_out]`` fp32 (no grad). With dropout
    (training) the result is PEFT's ``x Wᵀ + b + (g−1)·drop(x) Wᵀ + g·s·(drop(x) Aᵀ) Bᵀ``, composed as
    ``g·z(drop(x)) + b + (x − drop(x)) Wᵀ`` through plain autograd for the last term (one more GEMM).
    """
    if dropout_p > 0:
        xd = F.dropout(x, dropout_p, training=True)
        z = lora_linear(xd, weight, None, lora_a, lora_b, scaling)
        return dora_scale(z, magnitude, norm, bias) + F.linear(x - xd, weight)
    z = lora_linear(x, weight, None, lora_a, lora_b, scaling)
    return dora_scale(z, magnitude, norm, bias)
