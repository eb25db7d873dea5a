"""The Triton kernel of DoRA's step vectors (:mod:`.prepass`): every DoRA Linear layer's ``[4, d_out]`` fp32
vectors ``(g − 1, g, 1/‖V‖, 1/m')`` of one group (one device, one set of dtypes) in one launch.

Each program takes ``BLOCK_M`` rows of one layer and walks its ``d_in`` in ``BLOCK_K`` columns at a time::

    P      = B[rows] · A[:, cols]                       (tl.dot, fp32; three-pass tf32 for fp32 factors)
    cross += W[rows, cols] ⊙ P,   sq += P ⊙ P            (elementwise; summed over the columns once, at the end)

so ``rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B) = cross + (s/2)·sq`` — the quantity :func:`~.norm.factored_norm_parts` and
``triton_norm._vectors_kernel`` form from ``W Aᵀ`` and ``A Aᵀ`` — and ``triton_norm._store_vectors`` turns it, with the
cached ``‖W‖²_row``, into the vectors exactly as the per-layer kernels do (``‖V‖² = ‖W‖² + 2s·(cross + (s/2)·sq)``,
clamped at 0, rounded to the magnitude's precision; the magnitude floored at ``eps·‖V‖``). No ``[d_out, d_in]``
tensor is written: ``P`` lives in registers one ``[BLOCK_M, BLOCK_K]`` tile at a time.

The layers come as tables (built by :mod:`.prepass`): ``table`` int64 ``[L, 12]`` — the addresses of W, A, B, m,
``‖W‖²`` (cast to typed pointers with the reference tensors' element types), the column of ``out`` ``[4, Σ d_out]``
where the layer's vectors start (its ``d_out`` columns there), then d_out, d_in, r and the row strides of W, A, B (unit
column strides); ``scalars`` fp32 ``[L, 2]`` — scaling, eps; and per program (tile) its layer and first row, int32.

Like this package's other DoRA kernels (a loop bounded by a runtime value), it runs under Triton 3.9's CPU
interpreter but not under Triton 3.6's (RESULTS.md, run 72); compiled, it runs on both.

Reference: the per-layer path, :func:`~.norm.dora_vectors_reference` of :func:`~.norm.factored_norm_parts`
(``tests/methods/dora/test_prepass.py``). Importing this module defines the kernel, so ``TRITON_INTERPRET=1`` (CPU
tests) must be set before that.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.triton import launch
from .triton_norm import _store_vectors

#: rows per program, columns per step, warps
BLOCK_M, BLOCK_K, NUM_WARPS = 64, 64, 4
TABLE_COLUMNS = 12


@triton.jit
def _prepass_kernel(table_ptr, scalars_ptr, tile_layer_ptr, tile_row_ptr, out_ptr, stride_out, w_ref, a_ref, b_ref,
                    m_ref, wsq_ref, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr, W_VEC: tl.constexpr, AB_VEC: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid).to(tl.int64)
    entry = table_ptr + layer * 12  # TABLE_COLUMNS
    w_p = tl.load(entry).to(tl.pointer_type(w_ref.dtype.element_ty))
    a_p = tl.load(entry + 1).to(tl.pointer_type(a_ref.dtype.element_ty))
    b_p = tl.load(entry + 2).to(tl.pointer_type(b_ref.dtype.element_ty))
    m_p = tl.load(entry + 3).to(tl.pointer_type(m_ref.dtype.element_ty))
    wsq_p = tl.load(entry + 4).to(tl.pointer_type(wsq_ref.dtype.element_ty))
    out_p = out_ptr + tl.load(entry + 5)
    d_out = tl.load(entry + 6)
    d_in = tl.load(entry + 7)
    rank = tl.load(entry + 8)
    stride_w = tl.load(entry + 9)
    stride_a = tl.load(entry + 10)
    stride_b = tl.load(entry + 11)
    if ALIGNED:  # 16-byte aligned addresses and rows (W_VEC, AB_VEC elements): vector loads (of addresses read from a
        w_p = tl.multiple_of(w_p, 16)  # table the compiler knows nothing, so it would load element by element)
        a_p = tl.multiple_of(a_p, 16)
        b_p = tl.multiple_of(b_p, 16)
        stride_w = tl.multiple_of(stride_w, W_VEC)
        stride_a = tl.multiple_of(stride_a, AB_VEC)
        stride_b = tl.multiple_of(stride_b, AB_VEC)
    scaling = tl.load(scalars_ptr + layer * 2)
    eps = tl.load(scalars_ptr + layer * 2 + 1)

    rows = tl.load(tile_row_ptr + pid) + tl.arange(0, BLOCK_M)
    row_ok = rows < d_out
    rows64 = rows.to(tl.int64)[:, None]
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < rank
    b = tl.load(b_p + rows64 * stride_b + rs[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    cross = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # reduced over columns once, after the loop
    sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        k_ok = ks < d_in
        a = tl.load(a_p + rs[:, None].to(tl.int64) * stride_a + ks[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0)
        p = tl.dot(b, a, input_precision=PRECISION)  # (B A)[rows, ks], fp32
        w = tl.load(w_p + rows64 * stride_w + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        cross += w * p
        sq += p * p
    _store_vectors(tl.sum(cross, axis=1) + 0.5 * scaling * tl.sum(sq, axis=1), rows, row_ok, row_ok, stride_out, wsq_p,
                   m_p, out_p, scaling, eps)


def tables(rows: list[tuple[int, ...]], scalars: list[tuple[float, float]], device: torch.device
           ) -> tuple[torch.Tensor, ...]:
    """The device tables of the module docstring from the host's rows (``TABLE_COLUMNS`` ints per layer) and
    scalars (scaling, eps): ``(table, scalars, tile → layer, tile → first row)``."""
    d_out = torch.tensor([row[6] for row in rows], dtype=torch.int64)
    per_layer = (d_out + BLOCK_M - 1) // BLOCK_M
    tile_layer = torch.repeat_interleave(torch.arange(len(rows)), per_layer)
    first_tile = torch.cumsum(per_layer, 0) - per_layer
    tile_row = (torch.arange(tile_layer.numel()) - first_tile[tile_layer]) * BLOCK_M
    return (torch.tensor(rows, dtype=torch.int64).to(device), torch.tensor(scalars, dtype=torch.float32).to(device),
            tile_layer.to(device, torch.int32), tile_row.to(device, torch.int32))


def aligned(rows: list[tuple[int, ...]], w_size: int, ab_size: int) -> bool:
    """Whether every layer's W, A and B (table rows, :func:`tables`; element sizes ``w_size`` and ``ab_size`` bytes)
    start 16 bytes aligned, with rows a multiple of 16 bytes apart: the kernel's vector loads (``ALIGNED``)."""
    return all(row[0] % 16 == 0 and row[1] % 16 == 0 and row[2] % 16 == 0 and row[9] * w_size % 16 == 0
               and row[10] * ab_size % 16 == 0 and row[11] * ab_size % 16 == 0 for row in rows)


def launch_prepass(table: torch.Tensor, scalars: torch.Tensor, tile_layer: torch.Tensor, tile_row: torch.Tensor,
                   out: torch.Tensor, refs: tuple[torch.Tensor, ...], max_rank: int, is_aligned: bool) -> None:
    """One launch, a program per tile: the vectors of every layer in the tables (:func:`tables`) into the fp32
    ``out`` ``[4, Σ d_out]``; ``refs`` = one W, A, B, m and ``‖W‖²`` of the group (their element types type the
    addresses); ``is_aligned``: :func:`aligned` of the tables' rows."""
    a_ref = refs[1]
    precision = "tf32x3" if a_ref.is_cuda and a_ref.dtype == torch.float32 else "ieee"
    launch(_prepass_kernel, out, (tile_layer.numel(),), table, scalars, tile_layer, tile_row, out, out.stride(0),
           *refs, PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
           BLOCK_R=max(16, triton.next_power_of_2(max_rank)), ALIGNED=is_aligned, W_VEC=16 // refs[0].element_size(),
           AB_VEC=16 // a_ref.element_size(), num_warps=NUM_WARPS)
