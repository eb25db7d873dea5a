"""Triton kernels for DoRA's norm: the ``[4, d_out]`` fp32 vectors ``(g − 1, g, 1/‖V‖, 1/m')`` from ``W Aᵀ``, the
Gram matrix ``A Aᵀ`` (the product ``B (A Aᵀ)`` is formed inside, in fp32: three-pass tf32 products on the GPU) and B,
the magnitude floored at ``eps·‖V‖`` — alone (``_vectors_kernel``: the norm costs two GEMMs and this one launch), or
with the forward compose of :mod:`.triton_kernels` in the same launch (``_vectors_compose_kernel``: each program forms
its own columns' vectors, so the DoRA Linear layer's forward has one Triton launch and its backward one).

References: ``dora_vectors_reference`` in ``norm.py`` and ``compose_forward_reference`` in ``compose.py``
(``tests/methods/dora/test_triton_kernels.py`` compares them under the interpreter, ``test_cuda.py`` on a GPU).
Importing this module defines the kernels, so ``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.triton import cdiv, launch, next_power_of_2
from .triton_kernels import CONFIG, _as_rows, _grid


@triton.jit
def _vectors_kernel(wa_ptr, gram_ptr, b_ptr, wsq_ptr, m_ptr, out_ptr, n_rows, rank, stride_wa, stride_b, scaling,
                    half, eps, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < rank
        bg = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)  # (B (A Aᵀ))[rows, ks], fp32
        for l0 in range(0, rank, BLOCK_K):
            ls = l0 + tl.arange(0, BLOCK_K)
            l_ok = ls < rank
            b_l = tl.load(b_ptr + rows64 * stride_b + ls[None, :], mask=row_ok[:, None] & l_ok[None, :],
                          other=0.0).to(tl.float32)
            g_lk = tl.load(gram_ptr + ls[:, None] * rank + ks[None, :], mask=l_ok[:, None] & k_ok[None, :],
                           other=0.0)
            bg += tl.dot(b_l, g_lk, input_precision=PRECISION)
        mask = row_ok[:, None] & k_ok[None, :]
        t = tl.load(wa_ptr + rows64 * stride_wa + ks[None, :], mask=mask, other=0.0)
        bv = tl.load(b_ptr + rows64 * stride_b + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += (t + half * bg) * bv
    _store_vectors(tl.sum(acc, axis=1), rows, row_ok, row_ok, n_rows, wsq_ptr, m_ptr, out_ptr, scaling, eps)


@triton.jit
def _store_vectors(cross, rows, row_ok, store_ok, stride, wsq_ptr, m_ptr, out_ptr, scaling, eps):
    """The vectors ``(g − 1, g, 1/‖V‖, 1/m')`` of ``rows`` from ``cross`` = ``rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B)``,
    written where ``store_ok`` as four rows ``stride`` apart (``[4, n_rows]``: stride n_rows); returns
    ``(g − 1, g)`` (fp32)."""
    wsq = tl.load(wsq_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    norm = tl.sqrt_rn(tl.maximum(wsq + 2.0 * scaling * cross, 0.0))  # correctly rounded, as torch's
    norm = norm.to(m_ptr.dtype.element_ty).to(tl.float32)  # in the magnitude's precision (norm.in_magnitude_precision)
    m = tl.load(m_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    mag = tl.maximum(tl.abs(m), eps * norm)
    m_eff = tl.where(m < 0, -mag, mag)
    gm1 = (m_eff - norm) / norm
    g = m_eff / norm
    tl.store(out_ptr + rows, gm1, mask=store_ok)
    tl.store(out_ptr + stride + rows, g, mask=store_ok)
    tl.store(out_ptr + 2 * stride + rows, 1.0 / norm, mask=store_ok)
    tl.store(out_ptr + 3 * stride + rows, 1.0 / m_eff, mask=store_ok)
    return gm1, g


@triton.jit
def _vectors_compose_kernel(base_ptr, wa_ptr, gram_ptr, b_ptr, wsq_ptr, m_ptr, bias_ptr, out_ptr, vec_ptr, n_rows,
                            n_cols, rank, rows_per_chunk, stride_base, stride_out, stride_wa, stride_b, scaling, half,
                            eps, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """The vectors of this program's columns (all of the rank in one block: ``rank <= BLOCK_K``; every row chunk
    forms them, the first one stores them), then the compose over its rows: ``_vectors_kernel`` + the
    ``HAS_G`` form of ``_compose_fwd_kernel`` in one launch."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(1)
    col_ok = cols < n_cols
    cols64 = cols.to(tl.int64)[:, None]
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < rank
    mask_k = col_ok[:, None] & k_ok[None, :]
    b_tile = tl.load(b_ptr + cols64 * stride_b + ks[None, :], mask=mask_k, other=0.0).to(tl.float32)
    gram = tl.load(gram_ptr + ks[:, None] * rank + ks[None, :], mask=k_ok[:, None] & k_ok[None, :], other=0.0)
    bg = tl.dot(b_tile, gram, input_precision=PRECISION)  # (B (A Aᵀ))[cols, :], fp32
    wa = tl.load(wa_ptr + cols64 * stride_wa + ks[None, :], mask=mask_k, other=0.0)
    cross = tl.sum((wa + half * bg) * b_tile, axis=1)
    first = cols + chunk * n_cols < n_cols  # col_ok in the first row chunk, which writes the vectors; else False
    gm1, g = _store_vectors(cross, cols, col_ok, first, n_cols, wsq_ptr, m_ptr, vec_ptr, scaling, eps)
    gm1, g = gm1[None, :], g[None, :]
    near = tl.abs(gm1) <= 0.5
    gm1_near = tl.where(near, gm1, 0.0)
    g_far = tl.where(near, 0.0, g)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for start in range(0, rows_per_chunk, BLOCK_N):
        rows = chunk * rows_per_chunk + start + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        base = tl.load(base_ptr + rows64 * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.where(near, base + gm1_near * base, g_far * base)
        if HAS_BIAS:
            v += bias
        tl.store(out_ptr + rows64 * stride_out + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


def dora_vectors(wa: torch.Tensor, gram: torch.Tensor, lora_b: torch.Tensor, weight_sq: torch.Tensor,
                 magnitude: torch.Tensor, scaling: float, eps: float) -> torch.Tensor:
    """``[4, d_out]`` fp32 rows ``(g − 1, g, 1/‖V‖, 1/m')`` in one pass; see ``dora.dora_vectors_reference``.

    wa: ``W Aᵀ`` ``[d_out, r]`` fp32; gram: ``A Aᵀ`` ``[r, r]`` fp32 (``B (A Aᵀ)`` is formed inside, with fp32
    accuracy: three-pass tf32 products on the GPU); lora_b ``[d_out, r]`` (any float dtype); weight_sq
    ``‖W‖²_row`` and magnitude ``[d_out]``."""
    n_rows, rank = wa.shape
    wa, b, gram = _unit_col(wa), _unit_col(lora_b), gram.contiguous()
    m = _flat(magnitude)
    wsq = weight_sq if weight_sq.is_contiguous() else weight_sq.contiguous()
    out = torch.empty(4, n_rows, device=wa.device, dtype=torch.float32)
    block_k = max(16, min(64, next_power_of_2(max(rank, 1))))
    block_r = 64
    launch(_vectors_kernel, wa, (cdiv(n_rows, block_r),), wa, gram, b, wsq, m, out, n_rows, rank,
            wa.stride(0), b.stride(0), float(scaling), float(scaling) / 2, float(eps),
            PRECISION="tf32x3" if wa.is_cuda else "ieee", BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return out


#: the largest rank :func:`vectors_and_compose` forms the vectors for inside the compose launch (every row chunk forms
#: its columns' ``[block_d, r] x [r, r]`` product again: cheap up to here); larger ranks take two launches
FUSED_MAX_RANK = 64


def vectors_and_compose(z: torch.Tensor, wa: torch.Tensor, gram: torch.Tensor, lora_b: torch.Tensor,
                        weight_sq: torch.Tensor, magnitude: torch.Tensor, scaling: float, eps: float,
                        bias: torch.Tensor | None = None, out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, vec)`` in one launch (rank <= :data:`FUSED_MAX_RANK`): ``vec`` = :func:`dora_vectors` ``[4, d_out]``
    fp32 and ``y = z + (g − 1)·z + b`` (``g·z`` where ``|g − 1| > 1/2``) over z ``[..., d_out]`` (``out`` may be
    z). wa / gram / lora_b / weight_sq / magnitude as :func:`dora_vectors` takes them; bias ``[d_out]`` or None."""
    shape, n_cols = z.shape, z.shape[-1]
    rank = wa.shape[1]
    z2 = _as_rows(z)
    out = torch.empty_like(z, memory_format=torch.contiguous_format) if out is None else out
    out2 = z2 if out is z and z.is_contiguous() else out.view(-1, n_cols)  # z2: a view of z then
    wa, b, gram = _unit_col(wa), _unit_col(lora_b), gram.contiguous()
    m = _flat(magnitude)
    wsq = weight_sq if weight_sq.is_contiguous() else weight_sq.contiguous()
    vec = torch.empty(4, n_cols, device=z.device, dtype=torch.float32)
    n_rows = z2.shape[0]
    block_n, block_d, rows_per_chunk, n_chunks = _grid(z, n_rows, n_cols)
    block_d = max(block_d, 16)  # tl.dot's smallest tile
    launch(_vectors_compose_kernel, z, (cdiv(n_cols, block_d), n_chunks),
           z2, wa, gram, b, wsq, m, bias if bias is not None else wsq, out2, vec, n_rows, n_cols, rank,
           rows_per_chunk, z2.stride(0), out2.stride(0), wa.stride(0), b.stride(0), float(scaling),
           float(scaling) / 2, float(eps), PRECISION="tf32x3" if z.is_cuda else "ieee", HAS_BIAS=bias is not None,
           BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=max(16, next_power_of_2(rank)), num_warps=CONFIG["num_warps"])
    return (out if out.shape == shape else out.view(shape)), vec


def _unit_col(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A magnitude (any shape with d_out elements) as a contiguous ``[d_out]`` (itself when it already is one)."""
    t = t if t.dim() == 1 else t.reshape(-1)
    return t if t.is_contiguous() else t.contiguous()
