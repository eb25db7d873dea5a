"""DoRA's composition tail ``out = z + (g − 1)·z + g·s·lora + b`` along a channel axis, and its backward
(``dz = g·dy`` and the channel sums ``dm``, ``db`` need), as plain-PyTorch references and their dispatch to the fused
Triton kernels (:mod:`.triton_kernels`, CUDA or the interpreter); and the scale Function convolutions use.

``g − 1`` is formed as ``(m − ‖V‖) / ‖V‖`` in fp32 by the caller, never as a rounded ``g`` minus one (no
cancellation near g = 1, where DoRA's magnitudes live), and ``g = 1`` gives back ``z`` bit for bit; where
``|g − 1| > 1/2`` the tail computes ``g·z`` instead (a tiny g would vanish in ``1 + (g − 1)``).
"""
from __future__ import annotations

import torch

from ...core.compute import accumulate_type
from ...core.tracing import distinct_when_traced
from ...core.triton import use_triton
from .norm import dora_vectors


def _channel_view(vec: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``[C]`` -> broadcastable against ``like`` along ``dim``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return vec.view(shape)


def _other_dims(t: torch.Tensor, dim: int) -> list[int]:
    return [d for d in range(t.dim()) if d != dim % t.dim()]


def _scaled_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None, scaling: float,
                      dim: int, g: torch.Tensor | None = None) -> torch.Tensor:
    """``v = base + (g−1)·base + g·s·lora`` in fp32 (fp64 for fp64); with ``g`` given, ``g·base`` where
    ``|g − 1| > 1/2`` (a tiny g is not lost in ``1 + (g − 1)``)."""
    acc = accumulate_type(base.dtype)
    gm1 = _channel_view(gm1.to(acc), base, dim)
    b = base.to(acc)
    v = b + gm1 * b
    if g is not None:
        g = _channel_view(g.to(acc), base, dim)
        v = torch.where(gm1.abs() <= 0.5, v, g * b)
    else:
        g = 1 + gm1
    return v if lora is None else v + g * scaling * lora.to(acc)


def compose_forward_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None,
                              scaling: float = 1.0, bias: torch.Tensor | None = None,
                              dim: int = -1, g: torch.Tensor | None = None) -> torch.Tensor:
    """``base + (g−1)·base + g·s·lora + b`` in fp32 (fp64 for fp64), returned in base's dtype.

    base / lora ``[..., C, ...]`` with the channel axis ``dim``; gm1 (``g − 1``), bias ``[C]``; g: optional, see
    :func:`_scaled_reference`.
    """
    v = _scaled_reference(base, gm1, lora, scaling, dim, g)
    if bias is not None:
        v = v + _channel_view(bias.to(v.dtype), base, dim)
    return v.to(base.dtype)


def compose_stats_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None,
                            scaling: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``Σ |base + (g−1)·base + g·s·lora|`` over all but the channel axis, ``[C]`` fp32 (fp64 for fp64)."""
    return _scaled_reference(base, gm1, lora, scaling, dim).abs().sum(_other_dims(base, dim))


def compose_backward_reference(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor,
                               lora: torch.Tensor | None = None, scaling: float = 1.0, dim: int = -1,
                               shift: torch.Tensor | None = None, dy_sum: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dbase, pre_sum, dy_sum)``: ``dbase = g·dy`` in base's dtype (``dlora = s·dbase``), the fp32 channel
    sums ``Σ dy ⊙ (base + s·lora − shift)`` ``[C]`` (``dm = pre_sum / ‖V‖``; with base = the output y and
    shift = b, ``dm = pre_sum / m``) and, with ``dy_sum``, ``Σ dy`` ``[C]`` (the bias gradient), else None."""
    acc = accumulate_type(base.dtype)
    dy = dy.to(acc)
    pre = base.to(acc) if lora is None else base.to(acc) + scaling * lora.to(acc)
    if shift is not None:
        pre = pre - _channel_view(shift.to(acc), base, dim)
    dims = _other_dims(base, dim)
    dbase = (dy * _channel_view(g.to(acc), base, dim)).to(base.dtype)
    return dbase, (dy * pre).sum(dims), (dy.sum(dims) if dy_sum else None)


# -- dispatch ---------------------------------------------------------------------------------------------
def _fused(t: torch.Tensor, dim: int) -> bool:
    return dim % t.dim() == t.dim() - 1 and t.is_contiguous() and use_triton(t)


def compose_forward(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None, scaling: float = 1.0,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None, dim: int = -1,
                    stats: bool = False, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, sums)``: :func:`compose_forward_reference` (``out`` may be ``base`` itself) and, with ``stats``,
    :func:`compose_stats_reference` (else None) — one fused pass on the GPU."""
    if _fused(base, dim):
        from . import triton_kernels  # imports triton (optional): only behind use_triton

        return triton_kernels.compose_forward(base, gm1, lora, scaling, bias, out, stats, g)
    sums = compose_stats_reference(base, gm1, lora, scaling, dim) if stats else None
    result = compose_forward_reference(base, gm1, lora, scaling, bias, dim, g)
    if out is None:
        return result, sums
    out.copy_(result)
    return out, sums  # out itself (not copy_'s return value: torch.compile matches a dirty input by identity)


def compose_backward(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor, lora: torch.Tensor | None = None,
                     scaling: float = 1.0, dbase_out: torch.Tensor | None = None, dim: int = -1,
                     shift: torch.Tensor | None = None, dy_sum: bool = False, scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`compose_backward_reference` in one fused pass on the GPU; ``dbase_out`` may be ``base`` itself.
    ``scale`` ``[C]`` multiplies the first sums (``dm = pre_sum ⊙ scale``, applied per row chunk on the GPU). The
    sums are fp32 (fp64 for fp64): autograd casts a gradient to its input's dtype itself."""
    if _fused(base, dim):
        from . import triton_kernels  # imports triton (optional): only behind use_triton

        return triton_kernels.compose_backward(dy, base, g, lora, scaling, dbase_out, shift, dy_sum, scale)
    dbase, pre_sum, dys = compose_backward_reference(dy, base, g, lora, scaling, dim, shift, dy_sum)
    if scale is not None:
        pre_sum = pre_sum * scale.to(pre_sum.dtype)
    return (dbase_out.copy_(dbase) if dbase_out is not None else dbase), pre_sum, dys


def vectors_and_compose(z: torch.Tensor, mixed: torch.Tensor, gram: torch.Tensor, lora_b: torch.Tensor,
                        weight_sq: torch.Tensor, magnitude: torch.Tensor, scaling: float, eps: float,
                        bias: torch.Tensor | None = None, out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, vec)``: ``vec`` = :func:`~.norm.dora_vectors` ``[4, d_out]`` fp32 (``g − 1, g, 1/‖V‖, 1/m'``) from the
    norm parts, and ``y`` = :func:`compose_forward` of z ``[..., d_out]`` with them (``out`` may be z) — one Triton
    launch on the GPU for ranks up to ``triton_norm.FUSED_MAX_RANK``, else the two steps."""
    if mixed.dtype == torch.float32 and _fused(z, -1):
        from . import triton_norm  # imports triton (optional): only behind use_triton

        if lora_b.shape[-1] <= triton_norm.FUSED_MAX_RANK:
            return triton_norm.vectors_and_compose(z, mixed, gram, lora_b, weight_sq, magnitude, scaling, eps,
                                                   bias, out)
    vec = dora_vectors(mixed, gram, lora_b, weight_sq, magnitude, scaling, eps)
    return compose_forward(z, vec[0], bias=bias, out=out, g=vec[1])[0], vec


def scale(z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = g ⊙ z (+ b)`` ``[..., d_out]`` in z's dtype, into ``out`` (z itself: in place; None: a new tensor),
    computed in fp32 (g ``[d_out]`` is) and rounded once, one PyTorch op — the tail for a layer whose vectors were
    formed ahead (:mod:`.prepass`). ``g = 1`` gives back z bit for bit."""
    if out is None:
        out = torch.empty_like(z)
    return torch.mul(z, g, out=out) if bias is None else torch.addcmul(bias, z, g, out=out)


# -- the scale Function (convolutions) ----------------------------------------------------------------------
class DoraScaleFunction(torch.autograd.Function):
    """``out = z + (g − 1)·z + b`` along channel axis ``dim``, ``g = m / norm``, norm constant.

    z ``[..., C, ...]``; magnitude: C elements (any shape, e.g. PEFT's ``[1, C, 1, 1]`` for convolutions);
    norm ``[C]`` fp32, no grad; bias ``[C]`` or None; ``vectors``: the ``[4, C]`` step vectors formed ahead
    (:mod:`.prepass`; norm is then None and ``out = g ⊙ z + b`` is one PyTorch op, :func:`scale`), or None. Saves z
    and the ``[C]`` fp32 vectors (norm and g − 1, or 1/norm and g).

    Backward (the norm a constant): ``dz = g ⊙ dy`` (``∂out/∂z = g``); ``dm = Σ dy ⊙ z / norm`` over every axis but
    the channel (``∂out/∂m = z / norm``) — both in one fused pass, :func:`compose_backward`; ``db = Σ dy``.
    """

    @staticmethod
    def forward(ctx, z, magnitude, norm, bias, dim: int, vectors=None):
        if vectors is None:
            m = magnitude.detach().reshape(-1).to(norm.dtype)
            gm1 = (m - norm) / norm
            out, _ = compose_forward(z, gm1, bias=bias, dim=dim)
            ctx.save_for_backward(z, norm, gm1)
        else:
            g = vectors[1]
            out = scale(z, _channel_view(g, z, dim), None if bias is None else _channel_view(bias, z, dim))
            ctx.save_for_backward(z, vectors[2], g)
        ctx.dim, ctx.has_bias, ctx.ahead = dim, bias is not None, vectors is not None
        ctx.magnitude_shape, ctx.magnitude_dtype = magnitude.shape, magnitude.dtype
        return distinct_when_traced(out)

    @staticmethod
    def backward(ctx, dy):
        z, norm_or_inverse, gm1_or_g = ctx.saved_tensors
        need_z, need_m, _, need_bias = ctx.needs_input_grad[:4]
        grad_z = grad_m = grad_bias = None
        if need_z or need_m:
            g = gm1_or_g if ctx.ahead else gm1_or_g + 1
            dz, dm_sum, _ = compose_backward(dy, z, g, dim=ctx.dim)
            grad_z = dz if need_z else None
            if need_m:
                dm = dm_sum * norm_or_inverse if ctx.ahead else dm_sum / norm_or_inverse
                grad_m = dm.to(ctx.magnitude_dtype).view(ctx.magnitude_shape)
        if need_bias and ctx.has_bias:
            grad_bias = dy.sum(_other_dims(dy, ctx.dim))
        return grad_z, grad_m, None, grad_bias, None, None


def dora_scale(z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor | None, bias: torch.Tensor | None,
               dim: int = -1, vectors: torch.Tensor | None = None) -> torch.Tensor:
    """Apply :class:`DoraScaleFunction` (``norm`` ``[C]``, or None with the step ``vectors`` ``[4, C]`` formed ahead);
    without autograd the tail runs in place in z (a fresh tensor)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, magnitude, bias)):
        return DoraScaleFunction.apply(z, magnitude, norm, bias, dim, vectors)
    if vectors is not None:
        return scale(z, _channel_view(vectors[1], z, dim), None if bias is None else _channel_view(bias, z, dim),
                     out=z)
    gm1 = (magnitude.detach().reshape(-1).to(norm.dtype) - norm) / norm
    return compose_forward(z, gm1, bias=bias, out=z, dim=dim)[0]
