"""The DoRA training path without the dense product: factored row norm, the Linear Function, composition tail.

DoRA (Liu et al.) rescales each output row of the LoRA-updated weight ``V = W + s·B A``::

    y = g ⊙ z + b,   z = x Wᵀ + s·(x Aᵀ) Bᵀ,   g = m / ‖V‖_row   (‖V‖_row treated as a constant: no gradient)

Shapes: x ``[..., d_in]`` (N tokens), W ``[d_out, d_in]`` (frozen; a dense tensor or a 4-bit
:class:`~slimtune.quant.frozen.QuantizedWeight` handle), A ``[r, d_in]``, B ``[d_out, r]``, m / g / b ``[d_out]``.
The bias is added unscaled, as PEFT does.

* :func:`factored_row_norm_sq` gets ``‖V‖²_row = ‖W‖²_row + 2s·rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B)`` from
  ``[d_out, r]`` / ``[r, r]`` intermediates: no ``[d_out, d_in]`` tensor is formed. The layer's path is two GEMMs,
  ``W Aᵀ`` and ``A Aᵀ`` (:func:`factored_norm_parts`; on CUDA bf16/fp16 GEMMs with fp32 outputs), and one kernel
  (:func:`dora_vectors`) that forms ``B (A Aᵀ)`` in fp32 (three-pass tf32 products) and the rest.
* The Linear layer is two autograd Functions. :class:`DoraProductFunction` queues the big GEMMs
  ``z = x Wᵀ + s·(x Aᵀ) Bᵀ`` first, then the norm's, whose kernel turns them into the ``[4, d_out]`` fp32 vectors
  ``(g − 1, g, 1/‖V‖, 1/m')`` that everything downstream reads (no other ``[d_out]`` kernels). It saves what LoRA saves: x (the very input object), W itself (a 4-bit handle
  is kept on ctx instead and dequantised again in backward — no dense copy outlives its GEMM), A, B; never
  ``x Aᵀ``. :class:`DoraTailFunction` writes the fused tail ``y = z + (g − 1)·z + b`` over z. ``g − 1`` is formed
  as ``(m − ‖V‖) / ‖V‖`` in fp32, never as a rounded ``g`` minus one (no cancellation near g = 1, where DoRA's
  magnitudes live), and ``g = 1`` gives back ``z`` bit for bit; where ``|g − 1| > 1/2`` the tail computes ``g·z``
  instead (a tiny g would vanish in ``1 + (g − 1)``). Two Functions, so that what the tail saved is
  released (its backward returns ``dz``) before the product's backward allocates ``dx``: the backward's
  transient peak is LoRA's. Its backward is one fused pass (``dz = g·dy``, ``Σ dy ⊙ z`` scaled by ``1/‖V‖`` (or
  ``1/m'``) per row chunk, ``Σ dy``) and one reduction of the chunks' partials: ``dm`` and ``db`` in fp32, which
  autograd casts to the parameters' dtypes. The product's backward queues the big ``dx`` GEMM first, so the
  device computes while the host issues the small ones (at a few thousand tokens the host is the bottleneck on
  the lent machines: every launch counts, ``benchmarks/host_cost.py``).

For ``dm = Σ_tokens dy ⊙ z / ‖V‖`` the tail saves, where it can, its own **output** y
(``ctx.save_for_backward(output)``: where the next op saves y too — SiLU saves gate, the product saves up,
attention saves v when it takes it as is — it is stored once), from which ``z / ‖V‖ = y / m'``. Never z.

**The rule (host-side, no sync): when y stands in for z.** The training step never reads anything back from the
device; what backward keeps is decided in forward from what the host already knows — the bias's presence, the
dtype, dropout, ``recompute``:

* **output** — no bias, no dropout, y in bf16 / fp32 / fp64 (fp32's exponent range or more). The magnitude
  used is ``m' = sign(m)·max(|m|, ε‖V‖)`` with ``ε = 2^⌊e_min/2⌋`` (2⁻⁶³ for bf16/fp32; :func:`magnitude_floor`),
  computed on the device inside :func:`dora_vectors` (data-parallel; sign(0) = +). So ``|g| ≥ ε`` and
  ``g·z`` is a normal number whenever ``|z| ≥ tiny/ε = 2⁻⁶³``: each recovered ``y/m'`` is within the dtype's
  unit roundoff of ``z/‖V‖`` (as a stored z would be) plus at most ``2⁻⁶³/‖V‖`` absolute — for every m,
  including tiny and zero ones (where ``y / m`` would be 0/0). The price: a channel with ``|m| < ε‖V‖`` outputs
  ``±ε·z`` instead of ``(m/‖V‖)·z`` (a change below ``2⁻⁶³·|z|``, far under any output's rounding), and its
  gradient is the true one, ``Σ dy ⊙ z / ‖V‖`` (it does not depend on m).
* **z** (z saved, as the conv path does) — a bias (``y − b`` would cancel where the bias dominates its channel),
  fp16 (e_min = −14: ``ε`` would be 2⁻⁷, far from negligible), or dropout (y then also holds
  ``(x − drop(x)) Wᵀ``).
* **recompute** (``dora_recompute``) — no ``[N, d_out]`` tensor saved; z rebuilt in backward (one more base
  GEMM). A frozen magnitude needs neither. With the default ``dora_recompute="auto"`` each layer of the output
  kind is measured once (:class:`slimtune.adapters.dora.OutputProbe`): it keeps its output where the output
  outlives the forward pass anyway, and recomputes elsewhere — activation memory as LoRA's.

The elementwise tail (forward ``y``; backward ``dz = g·dy``, the ``dm`` and bias column sums, in one pass) and
the ``[d_out]`` vectors run as fused Triton kernels on CUDA (:mod:`slimtune.kernels.dora_triton`), else as the
plain-PyTorch references here. Convolutions (``DoraConv``) use :class:`DoraScaleFunction`, which keeps z.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quant.frozen import WeightOperand, is_quantized, materialize, save_with_weight, saved_with_weight
from .dispatch import use_triton
from .lora import choose_backward, dropout_keep_mask

_NORM_CHUNK = 1 << 22  # elements of W upcast at a time for ‖W‖²_row
_MM_OUT_DTYPE: dict[torch.dtype, bool] = {}  # whether torch.mm(..., out_dtype=fp32) runs, per input dtype (CUDA)
_FLOORS: dict[torch.dtype, float] = {}  # magnitude_floor per dtype


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


def _fp32_out_gemm(t: torch.Tensor) -> bool:
    """Whether ``torch.mm(t, ·, out_dtype=torch.float32)`` is available: bf16/fp16 on CUDA (probed once)."""
    if not t.is_cuda or t.dtype not in (torch.float16, torch.bfloat16):
        return False
    if t.dtype not in _MM_OUT_DTYPE:
        try:
            probe = torch.ones(1, 1, device=t.device, dtype=t.dtype)
            _MM_OUT_DTYPE[t.dtype] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[t.dtype] = False
    return _MM_OUT_DTYPE[t.dtype]


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, small: bool) -> torch.Tensor:
    """``a @ b`` in ``acc``: a bf16/fp16 GEMM with fp32 output on CUDA; otherwise with the inputs upcast
    (``small`` operands) or in a's dtype, then upcast (large ones: no upcast copy of W)."""
    if a.dtype == acc:
        return a @ b.to(acc)
    if _fp32_out_gemm(a) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc) if small else (a @ b.to(a.dtype)).to(acc)


@torch.no_grad()
def factored_norm_parts(weight2d: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W Aᵀ [d_out, r], A Aᵀ [r, r])`` in fp32 (fp64 for fp64 W): the norm's two GEMMs.

    ``W Aᵀ`` runs in W's dtype, ``A Aᵀ`` in A's, both accumulating in fp32 and (on CUDA, bf16/fp16) with fp32
    outputs; elsewhere the small one runs in fp32. ``B (A Aᵀ)`` is formed by the consumer
    (:func:`dora_vectors`: inside its kernel on the GPU, in fp32), so no ``[d_out, d_in]`` tensor exists."""
    acc = accumulate_dtype(weight2d.dtype)
    mixed = _mm_acc(weight2d, lora_a.to(weight2d.dtype).t(), acc, small=False)  # W Aᵀ, [d_out, r]
    gram = _mm_acc(lora_a, lora_a.t(), acc, small=True)  # A Aᵀ, [r, r]
    return mixed, gram


def _row_norm_sq_from_parts(weight_sq: torch.Tensor, mixed: torch.Tensor, gram: torch.Tensor,
                            lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W‖² + 2s·rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B)``, clamped at 0 (fp32 or fp64)."""
    b = lora_b.to(mixed.dtype)
    rowsum = torch.addmm(mixed, b, gram.to(mixed.dtype), alpha=scaling / 2).mul_(b).sum(1)
    return torch.add(weight_sq.to(mixed.dtype), rowsum, alpha=2 * scaling).clamp_min_(0)


@torch.no_grad()
def factored_row_norm_sq(weight2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                         weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``‖W + s·B A‖²_row`` ``[d_out]``, fp32 (fp64 for fp64 W), clamped at 0; no ``[d_out, d_in]`` tensor.

    weight2d ``[d_out, d_in]`` (dense), lora_a ``[r, d_in]``, lora_b ``[d_out, r]``; ``weight_sq``: a cached
    ``‖W‖²_row``. The products: :func:`factored_norm_parts`.
    """
    if weight_sq is None:
        weight_sq = weight_row_norm_sq(weight2d)
    mixed, gram = factored_norm_parts(weight2d, lora_a)
    return _row_norm_sq_from_parts(weight_sq, mixed, gram, lora_b, scaling)


def magnitude_floor(dtype: torch.dtype) -> float:
    """``ε = 2^⌊e_min/2⌋`` for an output dtype whose smallest normal is ``2^e_min`` (bf16 / fp32: 2⁻⁶³)."""
    eps = _FLOORS.get(dtype)
    if eps is None:
        e_min = int(math.log2(torch.finfo(dtype).tiny))
        eps = _FLOORS[dtype] = 2.0 ** -((-e_min + 1) // 2)
    return eps


def saves_output(bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """The host rule of the module docstring: the output stands in for z iff there is no bias and the output's
    dtype has fp32's exponent range (bf16, fp32, fp64); decided from what the host knows, no sync."""
    return bias is None and dtype in (torch.bfloat16, torch.float32, torch.float64)


def dora_vectors_reference(mixed: torch.Tensor, gram: torch.Tensor, lora_b: torch.Tensor,
                           weight_sq: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                           eps: float = 0.0) -> torch.Tensor:
    """``[4, d_out]`` rows ``(g − 1, g, 1/‖V‖, 1/m')`` in fp32 (fp64 for fp64): ``‖V‖`` from the norm parts
    (:func:`factored_norm_parts`), ``m' = sign(m)·max(|m|, ε‖V‖)`` (sign(0) = +; ``ε = 0``: ``m' = m``),
    ``g = m'/‖V‖`` and ``g − 1 = (m' − ‖V‖)/‖V‖`` (no cancellation near g = 1)."""
    norm = _row_norm_sq_from_parts(weight_sq, mixed, gram, lora_b, scaling).sqrt_()
    m = magnitude.detach().reshape(-1).to(norm.dtype)
    mag = torch.maximum(m.abs(), norm * eps)
    m_eff = torch.where(m < 0, -mag, mag)
    return torch.stack([(m_eff - norm) / norm, m_eff / norm, 1 / norm, 1 / m_eff])


def dora_vectors(mixed: torch.Tensor, gram: torch.Tensor, lora_b: torch.Tensor, weight_sq: torch.Tensor,
                 magnitude: torch.Tensor, scaling: float, eps: float = 0.0) -> torch.Tensor:
    """:func:`dora_vectors_reference`, one fused kernel on the GPU (fp32; ``B (A Aᵀ)`` formed inside)."""
    if mixed.dtype == torch.float32 and use_triton(mixed):
        from . import dora_triton

        return dora_triton.dora_vectors(mixed, gram, lora_b, weight_sq, magnitude.detach(), scaling, eps)
    return dora_vectors_reference(mixed, gram, lora_b, weight_sq, magnitude, scaling, eps)


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


def _other_dims(t: torch.Tensor, dim: int) -> list[int]:
    return [d for d in range(t.dim()) if d != dim % t.dim()]


def _scaled_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None, scaling: float,
                      dim: int, g: torch.Tensor | None = None) -> torch.Tensor:
    """``v = base + (g−1)·base + g·s·lora`` in fp32 (fp64 for fp64); with ``g`` given, ``g·base`` where
    ``|g − 1| > 1/2`` (a tiny g is not lost in ``1 + (g − 1)``)."""
    acc = accumulate_dtype(base.dtype)
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
    acc = accumulate_dtype(base.dtype)
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
        from . import dora_triton

        return dora_triton.compose_forward(base, gm1, lora, scaling, bias, out, stats, g)
    sums = compose_stats_reference(base, gm1, lora, scaling, dim) if stats else None
    result = compose_forward_reference(base, gm1, lora, scaling, bias, dim, g)
    return (out.copy_(result) if out is not None else result), sums


def compose_backward(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor, lora: torch.Tensor | None = None,
                     scaling: float = 1.0, dbase_out: torch.Tensor | None = None, dim: int = -1,
                     shift: torch.Tensor | None = None, dy_sum: bool = False, scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`compose_backward_reference` in one fused pass on the GPU; ``dbase_out`` may be ``base`` itself.
    ``scale`` ``[C]`` multiplies the first sums (``dm = pre_sum ⊙ scale``, applied per row chunk on the GPU). The
    sums are fp32 (fp64 for fp64): autograd casts a gradient to its input's dtype itself."""
    if _fused(base, dim):
        from . import dora_triton

        return dora_triton.compose_backward(dy, base, g, lora, scaling, dbase_out, shift, dy_sum, scale)
    dbase, pre_sum, dys = compose_backward_reference(dy, base, g, lora, scaling, dim, shift, dy_sum)
    if scale is not None:
        pre_sum = pre_sum * scale.to(pre_sum.dtype)
    return (dbase_out.copy_(dbase) if dbase_out is not None else dbase), pre_sum, dys


# -- the scale Function (convolutions) ----------------------------------------------------------------------
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
        out, _ = compose_forward(z, gm1, bias=bias, dim=dim)
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
            dz, dm_sum, _ = compose_backward(dy, z, gm1 + 1, dim=ctx.dim)
            grad_z = dz if need_z else None
            if need_m:
                grad_m = (dm_sum / norm).to(ctx.magnitude_dtype).view(ctx.magnitude_shape)
        if need_bias and ctx.has_bias:
            grad_bias = dy.sum(_other_dims(dy, ctx.dim))
        return grad_z, grad_m, None, grad_bias, None


def dora_scale(z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None,
               dim: int = -1) -> torch.Tensor:
    """Apply :class:`DoraScaleFunction`; without autograd the tail runs in place in z (a fresh tensor)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, magnitude, bias)):
        return DoraScaleFunction.apply(z, magnitude, norm, bias, dim)
    gm1 = (magnitude.detach().reshape(-1).to(norm.dtype) - norm) / norm
    return compose_forward(z, gm1, bias=bias, out=z, dim=dim)[0]


# -- the Linear Functions -------------------------------------------------------------------------------------
def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s`` in place, skipped for s = 1 (alpha = r, the common case)."""
    return t if s == 1.0 else t.mul_(s)


def _product(xd: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
             lead: tuple[int, ...]) -> torch.Tensor:
    """``z = xd Wᵀ + s·(xd Aᵀ) Bᵀ`` ``[*lead, d_out]`` (not a view) from the 2-D ``xd``; all in xd's dtype."""
    z = F.linear(xd.view(*lead, xd.shape[-1]), w)
    z.view(-1, z.shape[-1]).addmm_(xd @ a.t(), b.t(), alpha=scaling)
    return z


class DoraProductFunction(torch.autograd.Function):
    """``(z, rest, vec)``: ``z = drop(x) Wᵀ + s·(drop(x) Aᵀ) Bᵀ`` ``[..., d_out]``, ``rest = (x − drop(x)) Wᵀ``
    (dropout only, else None) and ``vec`` = :func:`dora_vectors` ``[4, d_out]`` fp32 — ``(g − 1, g, 1/‖V‖, 1/m')``
    with ``m'`` the magnitude floored at ``eps·‖V‖`` — no gradient (m gets its gradient through the tail).

    x ``[..., d_in]``; weight ``[d_out, d_in]`` dense (any dtype; cast per GEMM) or a quantised handle
    (dequantised once in forward — base GEMM and ``W Aᵀ`` — and once in backward for dx); lora_a / lora_b in
    any float dtype (cast to x's for the GEMMs, gradients in theirs); weight_sq: cached ``‖W‖²_row`` or None.
    The norm (two GEMMs and one kernel) is queued after the base GEMM (its launches overlap that GEMM). Saves x,
    A, B, W (or keeps the handle); the dropout mask is redrawn in backward from ``seed``. Backward queues the big
    ``dx`` GEMM first, so the device works while the host issues the small ones.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, magnitude, scaling: float, dropout_p: float, seed: int, weight_sq,
                save: bool, eps: float):
        ctx.set_materialize_grads(False)
        dtype, lead, d_in = x.dtype, tuple(x.shape[:-1]), x.shape[-1]
        x2 = x.reshape(-1, d_in)
        a, b = _cast(lora_a, dtype), _cast(lora_b, dtype)
        mask = dropout_keep_mask(x2, dropout_p, seed) if dropout_p > 0 else None
        xd = x2 * mask if mask is not None else x2
        w = materialize(weight, dtype)
        z = _product(xd, w, a, b, scaling, lead)
        if weight_sq is None:
            weight_sq = weight_row_norm_sq(w)
        mixed, gram = factored_norm_parts(w, a)
        vec = dora_vectors(mixed, gram, b, weight_sq, magnitude, scaling, eps)
        del mixed, gram
        rest = F.linear((x2 - xd).view(*lead, d_in), w) if mask is not None else None
        del w
        ctx.mark_non_differentiable(vec)
        if save:
            save_with_weight(ctx, weight, x, lora_a, lora_b)
            ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return z, rest, vec

    @staticmethod
    def backward(ctx, dz, drest, _):
        weight, (x, lora_a, lora_b) = saved_with_weight(ctx)
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        s, dtype, p = ctx.scaling, x.dtype, ctx.dropout_p
        a, b = _cast(lora_a, dtype), _cast(lora_b, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        if dz is None:  # only rest got a gradient
            dz2 = torch.zeros(x2.shape[0], b.shape[0], dtype=dtype, device=x.device)
        else:
            dz2 = _cast(dz.reshape(-1, dz.shape[-1]), dtype)
        drest2 = _cast(drest.reshape(-1, drest.shape[-1]), dtype) if drest is not None else None
        grad_x = grad_w = grad_a = grad_b = grad_x2 = rest = None
        dya = _scaled(dz2 @ b, s) if (need_a or need_x) else None  # s·dz B, [N, r]
        if need_x:  # the big GEMMs first (a dequantised weight is dropped right after them)
            w = materialize(weight, dtype)
            grad_x2 = dz2 @ w
            rest = drest2 @ w if p > 0 and drest2 is not None else None
            del w
        mask = dropout_keep_mask(x2, p, ctx.seed) if p > 0 else None
        xd = x2 * mask if mask is not None else x2
        if need_a or need_b:
            tokens, d_in = x2.shape
            if choose_backward(tokens, d_in, dz2.shape[1], a.shape[0]) == "gram":
                gram = dz2.t() @ xd  # [d_out, d_in]
                grad_b = _scaled(gram @ a.t(), s) if need_b else None
                grad_a = _scaled(b.t() @ gram, s) if need_a else None
                del gram
            else:
                grad_b = _scaled(dz2.t() @ (xd @ a.t()), s) if need_b else None
                grad_a = dya.t() @ xd if need_a else None
            grad_a = _cast(grad_a, lora_a.dtype) if grad_a is not None else None
            grad_b = _cast(grad_b, lora_b.dtype) if grad_b is not None else None
        if need_x:
            grad_x2.addmm_(dya, a)
            if mask is not None:  # mask ⊙ (dz W + dya A) + (1 − mask) ⊙ drest W
                if rest is not None:
                    grad_x2.sub_(rest).mul_(mask).add_(rest)
                else:
                    grad_x2.mul_(mask)
            grad_x = grad_x2.view(x.shape)
        if need_w and not is_quantized(weight):
            grad_w = dz2.t() @ xd
            if mask is not None and drest2 is not None:
                grad_w.addmm_(drest2.t(), x2 - xd)
            grad_w = _cast(grad_w, weight.dtype)
        return grad_x, grad_w, grad_a, grad_b, None, None, None, None, None, None, None


class DoraTailFunction(torch.autograd.Function):
    """``y = z + (g − 1)·z + b [+ rest]`` (``vec`` from :class:`DoraProductFunction`: ``g`` and ``g − 1``; no
    gradient), written over z where it can be.

    z ``[..., d_out]``, rest: the product's dropout term or None, magnitude ``[d_out]`` (any shape with d_out
    elements), bias ``[d_out]`` or None. keep — what backward gets ``dm = Σ dy ⊙ z / ‖V‖`` from, chosen on the
    host by :func:`dora_linear`: ``"output"`` (y itself, saved as the output: ``z / ‖V‖ = y / m'``; bias-free
    bf16/fp32/fp64 only, see the module docstring), ``"z"`` (z saved: dropout, a bias, fp16), ``"recompute"``
    (z rebuilt from x, W, A, B), None (no dm: frozen magnitude), ``"none"`` (no backward). x, weight, lora_a,
    lora_b, scaling, dropout_p, seed: the product's inputs, kept for ``"recompute"`` only (the same objects the
    product saves); they get no gradient here. Backward returns ``dz = g·dy`` (its own ``[N, d_out]`` buffer)
    and releases what it saved before the product's backward allocates dx, so the backward's transient peak is
    LoRA's. ``dm`` and the bias gradient come out of the backward pass's own reduction in fp32 (autograd casts
    them to the parameters' dtypes).
    """

    @staticmethod
    def forward(ctx, z, rest, magnitude, vec, bias, keep: str | None, x, weight, lora_a, lora_b, scaling: float,
                dropout_p: float, seed: int):
        if keep == "z":
            y, _ = compose_forward(z, vec[0], bias=bias, g=vec[1])
        else:
            y, _ = compose_forward(z, vec[0], bias=bias, out=z, g=vec[1])
            ctx.mark_dirty(z)
        if rest is not None:
            y.add_(rest)
        ctx.route = keep
        if keep != "none":
            if keep == "output":
                ctx.save_for_backward(vec, y)
            elif keep == "z":
                ctx.save_for_backward(vec, z)
            elif keep == "recompute":
                save_with_weight(ctx, weight, vec, x, lora_a, lora_b)
                ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
            else:
                ctx.save_for_backward(vec)
            ctx.magnitude_shape = magnitude.shape
            ctx.has_rest = rest is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        keep = ctx.route
        dy2 = dy.reshape(-1, dy.shape[-1])
        inplace = False
        if keep == "recompute":
            weight, (vec, x, lora_a, lora_b) = saved_with_weight(ctx)
            dtype = x.dtype
            x2 = x.reshape(-1, x.shape[-1])
            xd = x2 * dropout_keep_mask(x2, ctx.dropout_p, ctx.seed) if ctx.dropout_p > 0 else x2
            w = materialize(weight, dtype)
            pre = _product(xd, w, _cast(lora_a, dtype), _cast(lora_b, dtype), ctx.scaling, (x2.shape[0],))
            del w, xd
            inplace, scale = True, vec[2]  # z again, overwritten by dz; dm = Σ dy ⊙ z · (1/‖V‖)
        elif keep is None:  # frozen magnitude: g·dy (and the bias sum) only
            (vec,) = ctx.saved_tensors
            pre, scale = (dy2 if dy2.stride(-1) == 1 else dy2.contiguous()), None
        else:
            vec, kept = ctx.saved_tensors
            pre = kept.view(dy2.shape) if keep == "output" else kept.reshape(dy2.shape)
            scale = vec[3] if keep == "output" else vec[2]  # dm = Σ dy ⊙ y · (1/m')  or  Σ dy ⊙ z · (1/‖V‖)
            del kept
        need_bias = ctx.needs_input_grad[4]
        dz, grad_m, grad_bias = compose_backward(dy2, pre, vec[1], dbase_out=pre if inplace else None,
                                                 dy_sum=need_bias, scale=scale)
        grad_m = grad_m.view(ctx.magnitude_shape) if keep and ctx.needs_input_grad[2] else None
        grad_z = dz.view(dy.shape) if ctx.needs_input_grad[0] else None
        return (grad_z, dy if ctx.has_rest else None, grad_m, None, grad_bias, None, None, None, None, None, None,
                None, None)


def dora_linear(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                weight_sq: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
    """DoRA on a Linear: :class:`DoraProductFunction` then :class:`DoraTailFunction`.

    ``weight`` ``[d_out, d_in]``: dense (any dtype; cast for each GEMM) or a quantised handle; ``bias`` in x's
    dtype; ``weight_sq``: cached ``‖W‖²_row`` (or None); ``recompute``: keep no ``[N, d_out]`` tensor. With
    ``dropout_p`` the result is PEFT's ``x Wᵀ + b + (g−1)·drop(x) Wᵀ + g·s·(drop(x) Aᵀ) Bᵀ``. What backward
    keeps is decided here, on the host (module docstring); nothing is read back from the device.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    keep = backward_route(x, weight, bias, lora_a, lora_b, magnitude, dropout_p, recompute)
    eps = magnitude_floor(x.dtype) if keep == "output" else 0.0
    z, rest, vec = DoraProductFunction.apply(x, weight, lora_a, lora_b, magnitude, scaling, dropout_p, seed,
                                             weight_sq, keep != "none", eps)
    return DoraTailFunction.apply(z, rest, magnitude, vec, bias, keep, x, weight, lora_a, lora_b, scaling,
                                  dropout_p, seed)


def backward_route(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, magnitude: torch.Tensor, dropout_p: float, recompute: bool) -> str | None:
    """What :class:`DoraTailFunction` keeps for backward (its ``keep``), from what the host knows (no sync)."""
    if not torch.is_grad_enabled() or not (
            x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or magnitude.requires_grad
            or (bias is not None and bias.requires_grad) or (isinstance(weight, torch.Tensor) and weight.requires_grad)):
        return "none"
    if not magnitude.requires_grad:
        return None
    if recompute:
        return "recompute"
    return "output" if dropout_p == 0 and saves_output(bias, x.dtype) else "z"
