"""Fused Triton kernels for DoRA's elementwise tail; references: ``compose_*_reference`` in ``compose.py`` and
``dora_vectors_reference`` in ``norm.py`` (``tests/methods/dora/test_triton_kernels.py`` compares them).

Forward, one pass over ``[N, D]`` (channel = column)::

    v   = base + (g−1)·base + g·s·lora            (lora optional; fp32 in registers)
    out = v + b                                   (b optional)
    stats[d] = Σ_n |v[n, d]|                      (optional: how far the stored out can stand in for v)

Backward, one pass: ``dbase = g·dy`` (``dlora = s·dbase``, not written), the fp32 column sums
``Σ_n dy ⊙ (base + s·lora − shift)`` (DoRA's ``dm`` times ‖V‖, or times m when ``base`` is the saved output
and ``shift`` its bias) and optionally ``Σ_n dy`` (the bias gradient).

With ``g`` given as well, columns with ``|g − 1| > 1/2`` use ``v = g·base`` (a tiny g is not lost in 1 + (g − 1)).
The backward multiplies each column's first partial sum by an optional ``[D]`` factor (dm's ``1/‖V‖`` or ``1/m'``).
The norm's ``[4, d_out]`` vectors, alone or with this forward in one launch, are in :mod:`.triton_norm`.

Every launch costs the host tens of microseconds (more than a PyTorch op: a step at 2048 tokens is host-bound on
the lent machines, ``benchmarks/host_cost.py``), so the kernels do as much per launch as they can and the
grid arithmetic is cached.

Layout: the grid is (column blocks, row chunks); each program walks its chunk of rows ``BLOCK_N`` at a time
and writes one fp32 partial per column (added by one reduction afterwards: deterministic, no atomics).
base / lora / out / dbase: 2-D with contiguous rows (``out`` and ``dbase`` may be ``base`` itself: each element is
read before it is written, by the same program); dy: any strides (e.g. the stride-0 gradient of ``.sum()``).
fp32 / fp16 / bf16.
:data:`CONFIG` holds the block sizes (the GPU benchmark sweeps it).

Importing this module defines the kernels, so ``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
Only long-standing ``tl`` operations are used (Triton 3.x).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...core.triton import cdiv, launch, next_power_of_2, sm_count

#: block_d: columns per program; tile: elements per loaded tile (block_n = tile // block_d);
#: programs_per_sm: grid size target (row chunks are added until there are about this many programs per SM);
#: num_warps: warps per program.
#: The default is the best of the H100 sweep at 4096×8192 bf16 (benchmarks/results/run10_dora_gpu.md: fwd 0.122
#: vs 0.144 ms, bwd 0.142 vs 0.185 ms for the previous 256/4096/8/4).
CONFIG = {"block_d": 128, "tile": 2048, "programs_per_sm": 16, "num_warps": 4}



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
def _compose_bwd_kernel(dy_ptr, base_ptr, lora_ptr, shift_ptr, g_ptr, scale_ptr, dbase_ptr, partial_ptr, dysum_ptr,
                        n_rows, n_cols, rows_per_chunk, stride_dy_row, stride_dy_col, stride_base, stride_lora,
                        stride_dbase, scaling, HAS_LORA: tl.constexpr, HAS_SHIFT: tl.constexpr,
                        HAS_SCALE: tl.constexpr, DY_SUM: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
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
    col_sum = tl.sum(acc, axis=0)
    if HAS_SCALE:  # the per-column factor of the first sums (dm's 1/‖V‖ or 1/m'), applied to each partial
        col_sum *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    tl.store(partial_ptr + chunk * n_cols + cols, col_sum, mask=col_ok)
    if DY_SUM:
        tl.store(dysum_ptr + chunk * n_cols + cols, tl.sum(acc_dy, axis=0), mask=col_ok)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[N, D]`` view with unit column stride (copies only if it must; t itself when it already is
    one: every call is host time)."""
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rows_view(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as ``[N, n_cols]`` (a view; t itself when 2-D)."""
    return t if t.dim() == 2 else t.reshape(-1, n_cols)


def _grid(t: torch.Tensor, n_rows: int, n_cols: int) -> tuple[int, int, int, int]:
    """``(block_n, block_d, rows_per_chunk, n_chunks)`` for an ``[n_rows, n_cols]`` pass (cached per shape,
    device and :data:`CONFIG`: host time matters, launches are many)."""
    return _grid_for(n_rows, n_cols, t.device, CONFIG["block_d"], CONFIG["tile"], CONFIG["programs_per_sm"])


@functools.lru_cache(maxsize=256)
def _grid_for(n_rows: int, n_cols: int, device: torch.device, block_d_max: int, tile: int, programs_per_sm: int
              ) -> tuple[int, int, int, int]:
    block_d = min(block_d_max, next_power_of_2(max(n_cols, 1)))
    block_n = max(1, tile // block_d)
    n_col_blocks = cdiv(n_cols, block_d)
    target = programs_per_sm * sm_count(device, 2)
    n_chunks = max(1, min(cdiv(target, n_col_blocks), cdiv(n_rows, block_n)))
    rows_per_chunk = cdiv(cdiv(max(n_rows, 1), n_chunks), block_n) * block_n
    return block_n, block_d, rows_per_chunk, cdiv(max(n_rows, 1), rows_per_chunk)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


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
    gm1 = _f32(gm1)
    g = _f32(g) if g is not None else gm1
    bias_arg = bias.contiguous() if bias is not None else gm1
    n_rows = base2.shape[0]
    block_n, block_d, rows_per_chunk, n_chunks = _grid(base, n_rows, n_cols)
    partial = torch.empty(n_chunks, n_cols, device=base.device, dtype=torch.float32) if stats else gm1
    launch(_compose_fwd_kernel, base, (cdiv(n_cols, block_d), n_chunks),
            base2, lora2, gm1, g, bias_arg, out2, partial, n_rows, n_cols, rows_per_chunk,
            base2.stride(0), lora2.stride(0), out2.stride(0), float(scaling), HAS_LORA=lora is not None,
            HAS_G=g is not gm1, HAS_BIAS=bias is not None, HAS_STATS=stats, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=CONFIG["num_warps"])
    sums = (partial[0] if n_chunks == 1 else partial.sum(0)) if stats else None
    return (out if out.shape == shape else out.view(shape)), sums


def compose_backward(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor, lora: torch.Tensor | None = None,
                     scaling: float = 1.0, dbase_out: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                     dy_sum: bool = False, scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(g·dy`` in base's dtype, ``scale ⊙ Σ_rows dy ⊙ (base + s·lora − shift)`` ``[D]`` fp32, ``Σ_rows dy``
    ``[D]`` fp32 or None``)`` in one pass over dy and base; the row chunks' partials (already scaled) are added
    by one reduction (none when there is a single chunk). ``dbase_out`` may be ``base``."""
    shape, n_cols = base.shape, base.shape[-1]
    base2 = _as_rows(base)
    lora2 = _as_rows(lora) if lora is not None else base2
    dy2 = _rows_view(dy, n_cols)  # any strides: stride-0 (expanded) gradients are read as they are
    dbase = torch.empty_like(base, memory_format=torch.contiguous_format) if dbase_out is None else dbase_out
    dbase2 = _rows_view(dbase, n_cols)
    g = _f32(g)
    scale_arg = _f32(scale) if scale is not None else g
    shift_arg = shift.contiguous() if shift is not None else g
    n_rows = base2.shape[0]
    block_n, block_d, rows_per_chunk, n_chunks = _grid(base, n_rows, n_cols)
    partial = torch.empty(2 * n_chunks if dy_sum else n_chunks, n_cols, device=base.device, dtype=torch.float32)
    dysum = partial[n_chunks:] if dy_sum else partial
    launch(_compose_bwd_kernel, base, (cdiv(n_cols, block_d), n_chunks),
            dy2, base2, lora2, shift_arg, g, scale_arg, dbase2, partial, dysum, n_rows, n_cols, rows_per_chunk,
            dy2.stride(0), dy2.stride(1), base2.stride(0), lora2.stride(0), dbase2.stride(0), float(scaling),
            HAS_LORA=lora is not None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, DY_SUM=dy_sum,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=CONFIG["num_warps"])
    dbase = dbase if dbase.shape == shape else dbase.view(shape)
    if not dy_sum:
        return dbase, (partial.sum(0) if n_chunks > 1 else partial[0]), None
    if n_chunks > 1:
        partial = partial.view(2, n_chunks, n_cols).sum(1)
    first, sums = partial.unbind(0)  # [2, D]: the first sums, then Σ dy
    return dbase, first, sums
