"""DoRA's row norm without the dense product, and the per-row vectors everything downstream reads.

``‖V‖²_row = ‖W + s·B A‖²_row = ‖W‖²_row + 2s·rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B)`` from ``[d_out, r]`` / ``[r, r]``
intermediates — no ``[d_out, d_in]`` tensor is formed. The layer's path is two GEMMs, ``W Aᵀ`` and ``A Aᵀ``
(:func:`factored_norm_parts`; on CUDA bf16/fp16 GEMMs with fp32 outputs), and one kernel (:func:`dora_vectors`) that
forms ``B (A Aᵀ)`` in fp32 (three-pass tf32 products) and the ``[4, d_out]`` fp32 vectors ``(g − 1, g, 1/‖V‖, 1/m')``;
:func:`dora_vectors_reference` is that kernel's PyTorch reference. Shapes: W ``[d_out, d_in]``, A ``[r, d_in]``,
B ``[d_out, r]``, m ``[d_out]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...core.compute import accumulate_type, fp32_out_gemm, mm_fp32
from ...core.tracing import compiling
from ...core.triton import use_triton

_NORM_CHUNK = 1 << 22  # elements of W upcast at a time for ‖W‖²_row


@torch.no_grad()
def weight_row_norm_sq(weight2d: torch.Tensor) -> torch.Tensor:
    """``‖W‖²_row`` ``[d_out]`` in fp32 (fp64 for fp64 W), upcasting a few rows at a time (no fp32 copy of W). Under
    ``torch.compile`` (where a layer forms it every step) in one expression: Inductor fuses the upcast into the
    reduction, one kernel and no copy, where the chunks would be one kernel each."""
    acc = accumulate_type(weight2d.dtype)
    if compiling():
        return weight2d.to(acc).pow(2).sum(1)
    rows = max(1, _NORM_CHUNK // max(1, weight2d.shape[1]))
    return torch.cat([chunk.to(acc).pow(2).sum(1) for chunk in weight2d.split(rows)])


def mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, small: bool) -> torch.Tensor:
    """``a @ b`` in ``acc``: :func:`~slimtune.core.compute.mm_fp32` (fp32 written by the GEMM on CUDA), or with
    ``small`` operands upcast first."""
    if small and a.dtype != acc and not (b.dtype == a.dtype and fp32_out_gemm(a)):
        return a.to(acc) @ b.to(acc)
    return mm_fp32(a, b)


@torch.no_grad()
def factored_norm_parts(weight2d: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W Aᵀ [d_out, r], A Aᵀ [r, r])`` in fp32 (fp64 for fp64 W): the norm's two GEMMs.

    ``W Aᵀ`` runs in W's dtype, ``A Aᵀ`` in A's, both accumulating in fp32 and (on CUDA, bf16/fp16) with fp32
    outputs; elsewhere the small one runs in fp32. ``B (A Aᵀ)`` is formed by the consumer
    (:func:`dora_vectors`: inside its kernel on the GPU, in fp32), so no ``[d_out, d_in]`` tensor exists."""
    acc = accumulate_type(weight2d.dtype)
    mixed = mm_acc(weight2d, lora_a.to(weight2d.dtype).t(), acc, small=False)  # W Aᵀ, [d_out, r]
    gram = mm_acc(lora_a, lora_a.t(), acc, small=True)  # A Aᵀ, [r, r]
    return mixed, gram


def _row_norm_sq_from_parts(weight_sq: torch.Tensor, mixed: torch.Tensor, gram: torch.Tensor,
                            lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W‖² + 2s·rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B)``, clamped at 0 (fp32 or fp64). Under ``torch.compile`` the
    quadratic term ``Σ_jk B_ij (A Aᵀ)_jk B_ik`` is one expression, which Inductor reduces in the kernel of the rest
    (``d_out·r²`` multiply-adds, no ``[d_out, r, r]`` tensor), where ``B (A Aᵀ)`` would be a GEMM of its own and
    ``addmm`` a copy of ``W Aᵀ`` first: two launches a layer, on a host-bound step. (A backend that does not fuse,
    such as ``"aot_eager"``, forms the ``[d_out, r, r]`` product.)"""
    b = lora_b.to(mixed.dtype)
    if compiling():
        quadratic = (b.unsqueeze(2) * gram.to(mixed.dtype) * b.unsqueeze(1)).sum((1, 2))
        rowsum = (mixed * b).sum(1) + (scaling / 2) * quadratic
        return (weight_sq.to(mixed.dtype) + (2 * scaling) * rowsum).clamp_min(0)
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


def _floor(dtype: torch.dtype) -> float:
    e_min = int(math.log2(torch.finfo(dtype).tiny))
    return 2.0 ** -((-e_min + 1) // 2)


#: the floating dtypes' floors, formed at import: a table filled on first use would change under a compiled graph
#: that read it (Dynamo guards on the dict's keys: a recompile)
_FLOORS = {dtype: _floor(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def magnitude_floor(dtype: torch.dtype) -> float:
    """``ε = 2^⌊e_min/2⌋`` for an output dtype whose smallest normal is ``2^e_min`` (bf16 / fp32: 2⁻⁶³)."""
    eps = _FLOORS.get(dtype)
    return _floor(dtype) if eps is None else eps


def floor_for(bias: torch.Tensor | None, dtype: torch.dtype) -> float:
    """The magnitude floor of a DoRA Linear call without / with ``bias`` in ``dtype``: :func:`magnitude_floor` where
    the output could stand in for z (:func:`saves_output`) — on every route, so that the vectors do not depend on the
    route a call takes (``function.py``) — else 0."""
    return magnitude_floor(dtype) if saves_output(bias, dtype) else 0.0


def saves_output(bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """The host rule of the module docstring: the output stands in for z iff there is no bias and the output's
    dtype has fp32's exponent range (bf16, fp32, fp64); decided from what the host knows, no sync."""
    return bias is None and dtype in (torch.bfloat16, torch.float32, torch.float64)


def in_magnitude_precision(norm: torch.Tensor, magnitude_dtype: torch.dtype) -> torch.Tensor:
    """``‖V‖`` (fp32 or wider) rounded to the magnitude's dtype and back: ``g = m / ‖V‖`` compares the two at the
    precision m is stored in. A fresh layer's m is ‖W‖ rounded to that dtype, and its V is still W, so it starts
    with ``g = 1`` — ``g − 1 = 0`` — exactly, and computes what its base computes, bit for bit (bias-free; with a
    bias, within the bias add's own rounding). A no-op for fp32 / fp64 magnitudes; bf16 / fp16 ones see ‖V‖ to
    their own relative precision (2⁻⁹ / 2⁻¹²), as PEFT, which computes the norm in the weight's dtype, does too."""
    if magnitude_dtype in (torch.float16, torch.bfloat16) and norm.dtype != magnitude_dtype:
        return norm.to(magnitude_dtype).to(norm.dtype)
    return norm


def dora_vectors_reference(mixed: torch.Tensor, gram: torch.Tensor, lora_b: torch.Tensor,
                           weight_sq: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                           eps: float = 0.0) -> torch.Tensor:
    """``[4, d_out]`` rows ``(g − 1, g, 1/‖V‖, 1/m')`` in fp32 (fp64 for fp64): ``‖V‖`` from the norm parts
    (:func:`factored_norm_parts`), ``m' = sign(m)·max(|m|, ε‖V‖)`` (sign(0) = +; ``ε = 0``: ``m' = m``),
    ``g = m'/‖V‖`` and ``g − 1 = (m' − ‖V‖)/‖V‖`` (no cancellation near g = 1)."""
    norm = in_magnitude_precision(_row_norm_sq_from_parts(weight_sq, mixed, gram, lora_b, scaling).sqrt_(),
                                  magnitude.dtype)
    m = magnitude.detach().reshape(-1).to(norm.dtype)
    mag = torch.maximum(m.abs(), norm * eps)
    m_eff = torch.where(m < 0, -mag, mag)
    return torch.stack([(m_eff - norm) / norm, m_eff / norm, 1 / norm, 1 / m_eff])


def dora_vectors(mixed: torch.Tensor, gram: torch.Tensor, lora_b: torch.Tensor, weight_sq: torch.Tensor,
                 magnitude: torch.Tensor, scaling: float, eps: float = 0.0) -> torch.Tensor:
    """:func:`dora_vectors_reference`, one fused kernel on the GPU (fp32; ``B (A Aᵀ)`` formed inside)."""
    if mixed.dtype == torch.float32 and use_triton(mixed):
        from . import triton_norm  # imports triton (optional): only behind use_triton

        return triton_norm.dora_vectors(mixed, gram, lora_b, weight_sq, magnitude, scaling, eps)
    return dora_vectors_reference(mixed, gram, lora_b, weight_sq, magnitude, scaling, eps)


def dense_row_norm(weight2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + s·B A‖_row`` through the dense ``[d_out, d_in]`` sum: the reference for tests and benchmarks."""
    acc = accumulate_type(weight2d.dtype)
    return (weight2d.to(acc) + scaling * (lora_b.to(acc) @ lora_a.to(acc))).norm(dim=1)


def dora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA by its definition, through PyTorch's autograd: ``x (g·V)ᵀ + b`` with the dense V, norm detached."""
    v = weight + scaling * (lora_b @ lora_a)
    g = magnitude / v.norm(dim=1).detach()
    return F.linear(x, g[:, None] * v, bias)
