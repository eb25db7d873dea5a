"""Fused Triton kernels for DoRA's elementwise tail; references: ``compose_*_reference`` in ``dora.py``.

Forward, one pass over ``[N, D]`` (channel = column)::

    v   = base + (g−1)·base + g·s·lora            (lora optional; fp32 in registers)
    out = v + b                                   (b optional)
    stats[d] = Σ_n |v[n, d]|                      (optional: how far the stored out can stand in for v)

Backward, one pass: ``dbase = g·dy`` (``dlora = s·dbase``, not written), the fp32 column sums
``Σ_n dy ⊙ (base + s·lora − shift)`` (DoRA's ``dm`` times ‖V‖, or times m when ``base`` is the saved output
and ``shift`` its bias) and optionally ``Σ_n dy`` (the bias gradient).

With ``g`` given as well, columns with ``|g − 1| > 1/2`` use ``v = g·base`` (a tiny g is not lost in 1 + (g − 1)).
Two small kernels besides: ``_vectors_kernel`` (the ``[4, d_out]`` fp32 vectors ``(g − 1, g, 1/‖V‖, 1/m')`` from
the norm's ``[d_out, r]`` parts, the magnitude floored at ``eps·‖V‖``) and ``_finish_kernel`` (adds the backward's
row-chunk partials, scales ``dm`` by a ``[D]`` vector and casts both sums), so no other ``[d_out]`` op runs.

Layout: the grid is (column blocks, row chunks); each program walks its chunk of rows ``BLOCK_N`` at a time
and writes one fp32 partial per column (summed by the caller: deterministic, no atomics). base / lora / out /
dbase: 2-D with contiguous rows (``out`` and ``dbase`` may be ``base`` itself: each element is read before it is
written, by the same program); dy: any strides (e.g. the stride-0 gradient of ``.sum()``). fp32 / fp16 / bf16.
:data:`CONFIG` holds the block sizes (the GPU benchmark sweeps it).

Importing this module defines the kernels, so ``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
Only long-standing ``tl`` operations are used (Triton 3.x).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: block_d: columns per program; tile: elements per loaded tile (block_n = tile // block_d);
#: programs_per_sm: grid size target (row chunks are added until there are about this many programs per SM);
#: num_warps: warps per program.
#: The default is the best of the H100 sweep at 4096×8192 bf16 (benchmarks/results/run10_dora_gpu.md: fwd 0.122
#: vs 0.144 ms, bwd 0.142 vs 0.185 ms for the previous 256/4096/8/4).
CONFIG = {"block_d": 128, "tile": 2048, "programs_per_sm": 16, "num_warps": 4}
#: block sizes of the small ``[d_out]`` kernels (:func:`dora_vectors`, :func:`_finish_sums`)
SMALL_BLOCK = 128

_SM_COUNT: dict[int, int] = {}


@triton.jit
def _compose_fwd_kernel(base_ptr, lora_ptr, gm1_ptr, g_ptr, bias_ptr, out_ptr, stats_ptr, n_rows, n_cols,
                        rows_per_chunk, stride_base, stride_lora, stride_out, scaling,
                        HAS_LORA: tl.constexpr, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_STATS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(1)
    col_ok = cols < n_cols
    gm1 = tl.load(gm1_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_G:  # g given exactly: far from 1 (|g − 1| > 1/2) scale by g itself (1 + (g − 1) loses a tiny g)
        g = tl.load(g_ptr + cols, mask=col_ok, other=1.0)[None, :]
        near = tl.abs(gm1) <= 0.5
        gm1_near = tl.where(near, gm1, 0.0)
        g_far = tl.where(near, 0.0, g)
    else:
        g = 1.0 + gm1
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, rows_per_chunk, BLOCK_N):
        rows = chunk * rows_per_chunk + start + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        base = tl.load(base_ptr + rows64 * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            v = tl.where(near, base + gm1_near * base, g_far * base)
        else:
            v = base + gm1 * base
        if HAS_LORA:
            lora = tl.load(lora_ptr + rows64 * stride_lora + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            v += g * scaling * lora
        if HAS_STATS:
            acc += tl.abs(v)
        if HAS_BIAS:
            v += bias
        tl.store(out_ptr + rows64 * stride_out + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_STATS:
        tl.store(stats_ptr + chunk * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _compose_bwd_kernel(dy_ptr, base_ptr, lora_ptr, shift_ptr, g_ptr, dbase_ptr, partial_ptr, dysum_ptr, n_rows,
                        n_cols, rows_per_chunk, stride_dy_row, stride_dy_col, stride_base, stride_lora, stride_dbase,
                        scaling, HAS_LORA: tl.constexpr, HAS_SHIFT: tl.constexpr, DY_SUM: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(1)
    col_ok = cols < n_cols
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # reduced over rows once, after the loop
    acc_dy = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, rows_per_chunk, BLOCK_N):
        rows = chunk * rows_per_chunk + start + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + rows64 * stride_dy_row + cols[None, :].to(tl.int64) * stride_dy_col,
                     mask=mask, other=0.0).to(tl.float32)
        pre = tl.load(base_ptr + rows64 * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_LORA:
            pre += scaling * tl.load(lora_ptr + rows64 * stride_lora + cols[None, :], mask=mask,
                                     other=0.0).to(tl.float32)
        if HAS_SHIFT:
            pre -= shift  # masked elements: dy = 0 there
        acc += dy * pre
        if DY_SUM:
            acc_dy += dy
        tl.store(dbase_ptr + rows64 * stride_dbase + cols[None, :], (dy * g).to(dbase_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(partial_ptr + chunk * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)
    if DY_SUM:
        tl.store(dysum_ptr + chunk * n_cols + cols, tl.sum(acc_dy, axis=0), mask=col_ok)


@triton.jit
def _vectors_kernel(wa_ptr, p1_ptr, p2_ptr, b_ptr, wsq_ptr, m_ptr, out_ptr, n_rows, rank, stride_wa, stride_p1,
                    stride_p2, stride_b, scaling, half, eps, HAS_P2: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for start in range(0, rank, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < rank)[None, :]
        t = tl.load(wa_ptr + rows64 * stride_wa + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        bg = tl.load(p1_ptr + rows64 * stride_p1 + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_P2:
            bg += tl.load(p2_ptr + rows64 * stride_p2 + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + rows64 * stride_b + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += (t + half * bg) * bv
    wsq = tl.load(wsq_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    norm = tl.sqrt(tl.maximum(wsq + 2.0 * scaling * tl.sum(acc, axis=1), 0.0))
    m = tl.load(m_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    mag = tl.maximum(tl.abs(m), eps * norm)
    m_eff = tl.where(m < 0, -mag, mag)
    tl.store(out_ptr + rows, (m_eff - norm) / norm, mask=row_ok)
    tl.store(out_ptr + n_rows + rows, m_eff / norm, mask=row_ok)
    tl.store(out_ptr + 2 * n_rows + rows, 1.0 / norm, mask=row_ok)
    tl.store(out_ptr + 3 * n_rows + rows, 1.0 / m_eff, mask=row_ok)


@triton.jit
def _finish_kernel(partial_ptr, scale_ptr, out0_ptr, out1_ptr, n_chunks, n_cols, HAS_SCALE: tl.constexpr,
                   BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    which = tl.program_id(1)
    ok = cols < n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = partial_ptr + which.to(tl.int64) * n_chunks * n_cols
    for k in range(0, n_chunks):
        acc += tl.load(base + k * n_cols + cols, mask=ok, other=0.0)
    if which == 0:
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + cols, mask=ok, other=0.0)
        tl.store(out0_ptr + cols, acc.to(out0_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out1_ptr + cols, acc.to(out1_ptr.dtype.element_ty), mask=ok)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[N, D]`` view with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _sm_count(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return 2
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _grid(t: torch.Tensor, n_rows: int, n_cols: int) -> tuple[int, int, int, int]:
    """``(block_n, block_d, rows_per_chunk, n_chunks)`` for an ``[n_rows, n_cols]`` pass."""
    block_d = min(CONFIG["block_d"], triton.next_power_of_2(max(n_cols, 1)))
    block_n = max(1, CONFIG["tile"] // block_d)
    n_col_blocks = triton.cdiv(n_cols, block_d)
    target = CONFIG["programs_per_sm"] * _sm_count(t)
    n_chunks = max(1, min(triton.cdiv(target, n_col_blocks), triton.cdiv(n_rows, block_n)))
    rows_per_chunk = triton.cdiv(triton.cdiv(max(n_rows, 1), n_chunks), block_n) * block_n
    return block_n, block_d, rows_per_chunk, triton.cdiv(max(n_rows, 1), rows_per_chunk)


def _launch(kernel, t: torch.Tensor, grid, *args, **kwargs) -> None:
    """Launch on ``t``'s device (switching the current device only when it differs)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def compose_forward(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None, scaling: float = 1.0,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None, stats: bool = False,
                    g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, stats)``: ``out = v + b``, ``v = base + (g−1)·base + g·s·lora`` over the last axis, and with
    ``stats`` the fp32 column sums ``Σ_rows |v|`` ``[D]`` (else None). base / lora ``[..., D]``, gm1 (fp32) / bias
    ``[D]``; ``out`` may be ``base``. ``g`` (fp32 ``[D]``, optional): g itself, used where ``|g − 1| > 1/2``
    (``v = g·base``: a tiny g survives) and for the lora term."""
    shape, n_cols = base.shape, base.shape[-1]
    base2 = _as_rows(base)
    lora2 = _as_rows(lora) if lora is not None else base2
    out = torch.empty_like(base, memory_format=torch.contiguous_format) if out is None else out
    out2 = out.view(-1, n_cols)
    gm1 = gm1 if gm1.dtype == torch.float32 and gm1.is_contiguous() else gm1.float().contiguous()
    if g is not None:
        g = g if g.dtype == torch.float32 and g.is_contiguous() else g.float().contiguous()
    bias_arg = bias.contiguous() if bias is not None else gm1
    n_rows = base2.shape[0]
    block_n, block_d, rows_per_chunk, n_chunks = _grid(base, n_rows, n_cols)
    partial = torch.empty(n_chunks, n_cols, device=base.device, dtype=torch.float32) if stats else gm1
    _launch(_compose_fwd_kernel, base, (triton.cdiv(n_cols, block_d), n_chunks),
            base2, lora2, gm1, g if g is not None else gm1, bias_arg, out2, partial, n_rows, n_cols, rows_per_chunk,
            base2.stride(0), lora2.stride(0), out2.stride(0), float(scaling), HAS_LORA=lora is not None,
            HAS_G=g is not None, HAS_BIAS=bias is not None, HAS_STATS=stats, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=CONFIG["num_warps"])
    sums = (partial[0] if n_chunks == 1 else partial.sum(0)) if stats else None
    return (out if out.shape == shape else out.view(shape)), sums


def compose_backward(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor, lora: torch.Tensor | None = None,
                     scaling: float = 1.0, dbase_out: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                     dy_sum: bool = False, scale: torch.Tensor | None = None, sum_dtype: torch.dtype | None = None,
                     dysum_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(g·dy`` in base's dtype, ``scale ⊙ Σ_rows dy ⊙ (base + s·lora − shift)`` ``[D]``, ``Σ_rows dy`` ``[D]``
    or None``)`` in one pass over dy and base (and one small pass that sums the row chunks' partials, multiplies
    by ``scale`` and casts to ``sum_dtype`` / ``dysum_dtype``, default fp32); ``dbase_out`` may be ``base``."""
    shape, n_cols = base.shape, base.shape[-1]
    base2 = _as_rows(base)
    lora2 = _as_rows(lora) if lora is not None else base2
    dy2 = dy.reshape(-1, n_cols)  # any strides: stride-0 (expanded) gradients are read as they are
    dbase = torch.empty_like(base, memory_format=torch.contiguous_format) if dbase_out is None else dbase_out
    dbase2 = dbase.view(-1, n_cols)
    g = g if g.dtype == torch.float32 and g.is_contiguous() else g.float().contiguous()
    shift_arg = shift.contiguous() if shift is not None else g
    n_rows = base2.shape[0]
    block_n, block_d, rows_per_chunk, n_chunks = _grid(base, n_rows, n_cols)
    partial = torch.empty(n_chunks if not dy_sum else 2 * n_chunks, n_cols, device=base.device,
                          dtype=torch.float32)
    dysum = partial[n_chunks:] if dy_sum else partial
    _launch(_compose_bwd_kernel, base, (triton.cdiv(n_cols, block_d), n_chunks),
            dy2, base2, lora2, shift_arg, g, dbase2, partial, dysum, n_rows, n_cols, rows_per_chunk, dy2.stride(0),
            dy2.stride(1), base2.stride(0), lora2.stride(0), dbase2.stride(0), float(scaling),
            HAS_LORA=lora is not None, HAS_SHIFT=shift is not None, DY_SUM=dy_sum, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=CONFIG["num_warps"])
    plain = scale is None and sum_dtype in (None, torch.float32) and dysum_dtype in (None, torch.float32)
    if plain and n_chunks == 1:
        return dbase.view(shape), partial[0], (partial[1] if dy_sum else None)
    out0 = torch.empty(n_cols, device=base.device, dtype=sum_dtype or torch.float32)
    out1 = torch.empty(n_cols, device=base.device, dtype=dysum_dtype or torch.float32) if dy_sum else out0
    if scale is not None:
        scale = scale if scale.dtype == torch.float32 and scale.is_contiguous() else scale.float().contiguous()
    _launch(_finish_kernel, base, (triton.cdiv(n_cols, SMALL_BLOCK), 2 if dy_sum else 1), partial,
            scale if scale is not None else g, out0, out1, n_chunks, n_cols, HAS_SCALE=scale is not None,
            BLOCK=SMALL_BLOCK, num_warps=4)
    return dbase.view(shape), out0, (out1 if dy_sum else None)


def dora_vectors(wa: torch.Tensor, parts: list[torch.Tensor], lora_b: torch.Tensor, weight_sq: torch.Tensor,
                 magnitude: torch.Tensor, scaling: float, eps: float) -> torch.Tensor:
    """``[4, d_out]`` fp32 rows ``(g − 1, g, 1/‖V‖, 1/m')`` in one pass; see ``dora.dora_vectors_reference``.

    wa: ``W Aᵀ`` ``[d_out, r]`` fp32; parts: one or two ``[d_out, r]`` fp32 terms summing to ``B (A Aᵀ)``; lora_b
    ``[d_out, r]`` (any float dtype); weight_sq ``‖W‖²_row`` and magnitude ``[d_out]``."""
    n_rows, rank = wa.shape
    wa, b = _unit_col(wa), _unit_col(lora_b)
    p1 = _unit_col(parts[0])
    p2 = _unit_col(parts[1]) if len(parts) > 1 else p1
    m = magnitude.reshape(-1)
    m = m if m.is_contiguous() else m.contiguous()
    wsq = weight_sq if weight_sq.is_contiguous() else weight_sq.contiguous()
    out = torch.empty(4, n_rows, device=wa.device, dtype=torch.float32)
    block_k = min(64, triton.next_power_of_2(max(rank, 1)))
    block_r = max(1, min(SMALL_BLOCK, 4096 // block_k))
    _launch(_vectors_kernel, wa, (triton.cdiv(n_rows, block_r),), wa, p1, p2, b, wsq, m, out, n_rows, rank,
            wa.stride(0), p1.stride(0), p2.stride(0), b.stride(0), float(scaling), float(scaling) / 2, float(eps),
            HAS_P2=len(parts) > 1, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return out


def _unit_col(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
