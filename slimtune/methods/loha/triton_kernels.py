"""Fused Triton kernels for LoHa's folded path; reference: :class:`~slimtune.methods.loha.ops.LohaFoldOp`'s PyTorch
path (``tests/methods/loha/test_triton_kernels.py`` compares them under ``TRITON_INTERPRET=1``).

LoHa's update ``ΔW = (S·w1a w1b) ⊙ (w2a w2b)`` (``S`` the scaling ``s`` or a per-row ``s·mask`` for rank
dropout; w1a, w2a ``[M, R]``, w1b, w2b ``[R, K]``; a convolution's weight viewed ``[c_out, c_in·k]``) costs, done
with PyTorch ops, two dense products, an ``addcmul`` and — in backward — two more dense products and four GEMMs:
six launches and ~10 dense passes per layer per pass. Here:

* :func:`fold` — ``W' = W + ΔW`` in one pass: each program forms its ``[BM, BN]`` tiles of ``W1 = S·w1a w1b`` and
  ``W2 = w2a w2b`` with two small matrix products (inner size R) in registers, adds ``W1 ⊙ W2`` to W in fp32 and
  writes W' once (read W, write W': no dense intermediate).
* :func:`fold_grads` — from ``G = dL/dW'`` (``dyᵀx``, the base layer's weight gradient) the four factor gradients
  ``dw1a = S·(G ⊙ W2) w1bᵀ``, ``dw1b = (S·w1a)ᵀ (G ⊙ W2)``, ``dw2a = (G ⊙ W1) w2bᵀ``, ``dw2b = w2aᵀ (G ⊙ W1)``, in
  one launch: row-block programs walk column tiles (``dw1a``, ``dw2a``), column-block programs walk row tiles
  (``dw1b``, ``dw2b``); both re-form the W1/W2 tiles they need. The row programs can write ``W' = W + ΔW`` on the
  way (``w=``), so a backward gets ``W'`` for ``dx`` and the factor gradients from one launch: G first, then this,
  then ``dx``. One program per block walking a whole strip leaves a large GPU mostly idle (176 programs for
  ``3072 x 8192``), so each strip is split into parts (:func:`grad_parts`): each part stores fp32 partial sums
  and counts itself on its block's counter, and the block's last part adds them in part order — one launch,
  deterministic (the atomics only count), 1.2-2.5x faster on an H200 at the Llama-3.2-3B shapes (run 28).

Products run on the tensor cores in the operands' dtype (bf16/fp16) with fp32 accumulation, in exact fp32
(``ieee``) for fp32 operands. ``R`` up to :data:`MAX_RANK` (one register block). Importing this module defines
the kernels, so ``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...core.triton import cdiv, current_stream_key, launch, next_power_of_2, sm_count

#: largest LoHa rank the kernels take (the factor blocks live in registers); larger ranks use PyTorch
MAX_RANK = 128
BLOCK = 64  # tile side (rows and columns)
#: fold_grads' split (see :func:`grad_parts`): None picks by the rule; an int fixes the number of parts
GRAD_PARTS: int | None = None
GRAD_PROGRAMS_PER_SM = 4
GRAD_MIN_TILES = 4
INTERPRETER_SMS = 4
#: block counters per (device, stream): zero between launches (each launch resets what it counted), so a stream
#: handle that a new stream reuses finds them as a fresh one would; at most this many streams are kept
_COUNTERS: dict[tuple, torch.Tensor] = {}
MAX_COUNTER_STREAMS = 16


@triton.jit
def _factor_tiles(w1a_ptr, w1b_ptr, w2a_ptr, w2b_ptr, scale_ptr, scale, rows, cols, row_ok, col_ok, rank, K,
                  ks, HAS_ROW_SCALE: tl.constexpr, PRECISION: tl.constexpr):
    """``(W1, W2)`` tiles ``[BM, BN]`` fp32 (W1 with the row scale) and the operands they came from."""
    k_ok = ks < rank
    rows64 = rows.to(tl.int64)
    a1 = tl.load(w1a_ptr + rows64[:, None] * rank + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    a2 = tl.load(w2a_ptr + rows64[:, None] * rank + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b1 = tl.load(w1b_ptr + ks[:, None].to(tl.int64) * K + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                 other=0.0)
    b2 = tl.load(w2b_ptr + ks[:, None].to(tl.int64) * K + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                 other=0.0)
    w1 = tl.dot(a1, b1, input_precision=PRECISION)
    w2 = tl.dot(a2, b2, input_precision=PRECISION)
    if HAS_ROW_SCALE:
        row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        row_scale = tl.zeros([rows.shape[0]], dtype=tl.float32) + scale
    return w1 * row_scale[:, None], w2, a1, a2, b1, b2, row_scale


@triton.jit
def _fold_kernel(w_ptr, out_ptr, w1a_ptr, w1b_ptr, w2a_ptr, w2b_ptr, scale_ptr, scale, M, K, rank, stride_w,
                 stride_out, HAS_ROW_SCALE: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < K
    ks = tl.arange(0, BR)
    w1, w2, _, _, _, _, _ = _factor_tiles(w1a_ptr, w1b_ptr, w2a_ptr, w2b_ptr, scale_ptr, scale, rows, cols, row_ok,
                                          col_ok, rank, K, ks, HAS_ROW_SCALE, PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rows64 * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], (w + w1 * w2).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_parts(acc1, acc2, ptrs, size, part, n_parts, part_stride, counter, mask):
    """Split-K for one block, deterministic: store this part's two fp32 sums (``ptrs``: part 0's slots of the
    first; the second lies ``size`` further on), count the block's finished parts, and in the program that
    finishes last add all parts in part order. Returns ``(sum1, sum2, last)``; only ``last`` may store, and it
    resets the counter for the next launch."""
    offset = part.to(tl.int64) * part_stride
    tl.store(ptrs + offset, acc1, mask=mask)
    tl.store(ptrs + size + offset, acc2, mask=mask)
    tl.debug_barrier()  # every thread's partial stored before the (releasing) count
    done = tl.atomic_add(counter, 1, sem="acq_rel")
    last = done == n_parts - 1
    if last:
        acc1 = tl.zeros(acc1.shape, dtype=tl.float32)
        acc2 = tl.zeros(acc2.shape, dtype=tl.float32)
        for i in range(0, n_parts):
            at = ptrs + i * part_stride
            acc1 += tl.load(at, mask=mask, other=0.0, cache_modifier=".cg")
            acc2 += tl.load(at + size, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter, 0)
    return acc1, acc2, last


@triton.jit
def _grads_kernel(g_ptr, w1a_ptr, w1b_ptr, w2a_ptr, w2b_ptr, scale_ptr, scale, grads_ptr, w_ptr, out_ptr,
                  partial_ptr, counter_ptr, M, K, rank, stride_g, stride_w, stride_out, n_parts,
                  HAS_ROW_SCALE: tl.constexpr, FOLD: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BR: tl.constexpr):
    # grads_ptr: dw1a, dw2a [M, R] then dw1b, dw2b [R, K], one buffer; partial_ptr: n_parts rows of that, fp32
    d1a_ptr = grads_ptr
    d2a_ptr = grads_ptr + M * rank
    d1b_ptr = grads_ptr + 2 * M * rank
    d2b_ptr = d1b_ptr + rank * K
    part_stride = 2 * rank * (M + K)
    n_row_blocks = tl.cdiv(M, BM)
    part_cols = tl.cdiv(tl.cdiv(K, BN), n_parts) * BN
    part_rows = tl.cdiv(n_row_blocks, n_parts) * BM
    pid = tl.program_id(0)
    ks = tl.arange(0, BR)
    k_ok = ks < rank
    dot_dtype = w1a_ptr.dtype.element_ty
    n_row_programs = n_row_blocks * n_parts
    if pid < n_row_programs:  # a row block's columns [c_lo, c_hi): dw1a, dw2a  [BM, R]
        part = pid % n_parts
        rows = (pid // n_parts) * BM + tl.arange(0, BM)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        acc1 = tl.zeros([BM, BR], dtype=tl.float32)
        acc2 = tl.zeros([BM, BR], dtype=tl.float32)
        row_scale = tl.zeros([BM], dtype=tl.float32)
        c_lo = part * part_cols
        c_hi = tl.minimum(c_lo + part_cols, K)
        for c0 in range(c_lo, c_hi, BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < c_hi
            w1, w2, _, _, b1, b2, row_scale = _factor_tiles(w1a_ptr, w1b_ptr, w2a_ptr, w2b_ptr, scale_ptr, scale,
                                                            rows, cols, row_ok, col_ok, rank, K, ks, HAS_ROW_SCALE,
                                                            PRECISION)
            tile = row_ok[:, None] & col_ok[None, :]
            if FOLD:  # W' = W + W1 ⊙ W2 as well (each tile is visited by exactly one row program)
                w = tl.load(w_ptr + rows64[:, None] * stride_w + cols[None, :], mask=tile, other=0.0).to(tl.float32)
                tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
                         (w + w1 * w2).to(out_ptr.dtype.element_ty), mask=tile)
            g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            p1 = (g * w2).to(dot_dtype)  # dL/dW1
            p2 = (g * w1).to(dot_dtype)  # dL/dW2
            acc1 += tl.dot(p1, tl.trans(b1), input_precision=PRECISION)
            acc2 += tl.dot(p2, tl.trans(b2), input_precision=PRECISION)
        out = rows64[:, None] * rank + ks[None, :]
        mask = row_ok[:, None] & k_ok[None, :]
        acc1 = acc1 * row_scale[:, None]
        if n_parts > 1:
            acc1, acc2, last = _reduce_parts(acc1, acc2, partial_ptr + out, M * rank, part, n_parts, part_stride,
                                             counter_ptr + pid // n_parts, mask)
        else:
            last = True
        if last:
            tl.store(d1a_ptr + out, acc1.to(d1a_ptr.dtype.element_ty), mask=mask)
            tl.store(d2a_ptr + out, acc2.to(d2a_ptr.dtype.element_ty), mask=mask)
    else:  # a column block's rows [r_lo, r_hi): dw1b, dw2b  [R, BN] (own names: Triton unifies the branches')
        q = pid - n_row_programs
        c_part = q % n_parts
        c_cols = (q // n_parts) * BN + tl.arange(0, BN)
        c_col_ok = c_cols < K
        acc1b = tl.zeros([BR, BN], dtype=tl.float32)
        acc2b = tl.zeros([BR, BN], dtype=tl.float32)
        r_lo = c_part * part_rows
        r_hi = tl.minimum(r_lo + part_rows, M)
        for r0 in range(r_lo, r_hi, BM):
            c_rows = r0 + tl.arange(0, BM)
            c_row_ok = c_rows < r_hi
            cw1, cw2, a1, a2, _, _, c_scale = _factor_tiles(w1a_ptr, w1b_ptr, w2a_ptr, w2b_ptr, scale_ptr, scale,
                                                            c_rows, c_cols, c_row_ok, c_col_ok, rank, K, ks,
                                                            HAS_ROW_SCALE, PRECISION)
            cg = tl.load(g_ptr + c_rows.to(tl.int64)[:, None] * stride_g + c_cols[None, :],
                         mask=c_row_ok[:, None] & c_col_ok[None, :], other=0.0).to(tl.float32)
            q1 = (cg * cw2 * c_scale[:, None]).to(dot_dtype)  # S ⊙ dL/dW1: (S·w1a)ᵀ P1 = w1aᵀ (S ⊙ P1)
            q2 = (cg * cw1).to(dot_dtype)
            acc1b += tl.dot(tl.trans(a1), q1, input_precision=PRECISION)
            acc2b += tl.dot(tl.trans(a2), q2, input_precision=PRECISION)
        c_out = ks[:, None].to(tl.int64) * K + c_cols[None, :]
        c_mask = k_ok[:, None] & c_col_ok[None, :]
        if n_parts > 1:
            acc1b, acc2b, c_last = _reduce_parts(acc1b, acc2b, partial_ptr + 2 * M * rank + c_out, rank * K, c_part,
                                                 n_parts, part_stride, counter_ptr + n_row_blocks + q // n_parts,
                                                 c_mask)
        else:
            c_last = True
        if c_last:
            tl.store(d1b_ptr + c_out, acc1b.to(d1b_ptr.dtype.element_ty), mask=c_mask)
            tl.store(d2b_ptr + c_out, acc2b.to(d2b_ptr.dtype.element_ty), mask=c_mask)


def _precision(t: torch.Tensor) -> str | None:
    return "ieee" if t.dtype == torch.float32 else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (the kernels index ``row * stride + column``); a copy only if needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_r(rank: int) -> int:
    return max(16, next_power_of_2(rank))


def _scale_args(scale: float | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    if isinstance(scale, torch.Tensor):
        return scale.contiguous(), 0.0, True
    return like, float(scale), False


def fold(w: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
         scale: float | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W + (S·w1a w1b) ⊙ (w2a w2b)`` ``[M, K]`` in the factors' dtype (``out`` may be ``w``).

    w ``[M, K]`` with unit column stride (any float dtype); w1a, w2a ``[M, R]`` and w1b, w2b ``[R, K]`` contiguous,
    one dtype; scale: a number or ``[M]``."""
    M, K = w.shape
    rank = w1a.shape[1]
    w, w1a, w1b, w2a, w2b = _rows(w), w1a.contiguous(), w1b.contiguous(), w2a.contiguous(), w2b.contiguous()
    if out is not None and out.stride(-1) != 1:
        raise ValueError("fold: out needs unit column stride")
    out = torch.empty(M, K, device=w.device, dtype=w1a.dtype) if out is None else out
    scale_t, scale_f, row_scale = _scale_args(scale, w1a)
    grid = (cdiv(M, BLOCK), cdiv(K, BLOCK))
    launch(_fold_kernel, w, grid, w, out, w1a, w1b, w2a, w2b, scale_t, scale_f, M, K, rank, w.stride(0),
            out.stride(0), HAS_ROW_SCALE=row_scale, PRECISION=_precision(w1a), BM=BLOCK, BN=BLOCK,
            BR=_block_r(rank), num_warps=4)
    return out


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; the interpreter counts as :data:`INTERPRETER_SMS`."""
    return sm_count(device, INTERPRETER_SMS)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 block counters for :func:`fold_grads`, ``>= n`` of them, one set per device and stream (each
    launch leaves them zero again; launches on one stream run one after another)."""
    key = current_stream_key(device)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < n:
        if counters is None and len(_COUNTERS) >= MAX_COUNTER_STREAMS:
            _COUNTERS.pop(next(iter(_COUNTERS)))  # the oldest stream's (its launches are queued before this one's)
        counters = _COUNTERS[key] = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
    return counters


def grad_parts(M: int, K: int, device: torch.device) -> int:
    """How many parts :func:`fold_grads` splits each row block's columns and each column block's rows into.

    One program per row block and per column block fills a large GPU only thinly (``3072 x 8192`` at 64-wide
    tiles: 176 programs on 132 SMs, each walking a whole strip); so the strips are cut into parts until there are
    about :data:`GRAD_PROGRAMS_PER_SM` programs per SM, keeping at least :data:`GRAD_MIN_TILES` tiles per part.
    :data:`GRAD_PARTS` (a module setting; None: this rule) fixes the number."""
    if GRAD_PARTS is not None:
        return GRAD_PARTS
    row_blocks, col_blocks = cdiv(M, BLOCK), cdiv(K, BLOCK)
    programs = row_blocks + col_blocks
    wanted = cdiv(GRAD_PROGRAMS_PER_SM * _sm_count(device), programs)
    return max(1, min(wanted, min(row_blocks, col_blocks) // GRAD_MIN_TILES))


@functools.lru_cache(maxsize=256)
def _grads_plan(M: int, K: int, rank: int, device: torch.device, block: int, parts_setting: int | None
                ) -> tuple[int, int, tuple[int], tuple[int, int, int, int]]:
    """fold_grads' split, block count, grid and gradient sizes for one shape, device and setting."""
    parts = grad_parts(M, K, device)
    blocks = cdiv(M, block) + cdiv(K, block)
    return parts, blocks, (blocks * parts,), (M * rank, M * rank, rank * K, rank * K)


def fold_grads(g: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               scale: float | torch.Tensor, w: torch.Tensor | None = None, out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dw1a, dw1b, dw2a, dw2b, W')`` for ``G = dL/dW'`` ``[M, K]`` (unit column stride), in the factors' dtype.

    With ``w`` given, the same launch also writes ``W' = W + ΔW`` (as :func:`fold`, into ``out`` or a new
    tensor; ``out`` may be ``w``) — a backward that needs both pays one launch; else ``W'`` is None.
    Split into :func:`grad_parts` parts, each program stores its fp32 partial sums (a transient buffer
    ``[parts, 2·R·(M + K)]``) and counts itself done on its block's counter; the block's last program adds the
    parts in part order and writes the gradient — deterministic, one launch, no second pass."""
    M, K = g.shape
    rank = w1a.shape[1]
    g, w1a, w1b, w2a, w2b = _rows(g), w1a.contiguous(), w1b.contiguous(), w2a.contiguous(), w2b.contiguous()
    w = _rows(w) if w is not None else None
    if out is not None and out.stride(-1) != 1:
        raise ValueError("fold_grads: out needs unit column stride")
    parts, blocks, grid, sizes = _grads_plan(M, K, rank, g.device, BLOCK, GRAD_PARTS)
    flat = torch.empty(2 * rank * (M + K), device=g.device, dtype=w1a.dtype)  # the four, one allocation
    d1a, d2a, d1b, d2b = flat.split(sizes)
    if parts > 1:
        partial = torch.empty(parts, 2 * rank * (M + K), device=g.device, dtype=torch.float32)
        counters = _counters(g.device, blocks)
    else:
        partial = counters = g  # not read
    if w is not None and out is None:
        out = torch.empty(M, K, device=g.device, dtype=w1a.dtype)
    scale_t, scale_f, row_scale = _scale_args(scale, w1a)
    w_arg, out_arg = (w, out) if w is not None else (g, g)
    launch(_grads_kernel, g, grid, g, w1a, w1b, w2a, w2b, scale_t, scale_f, flat, w_arg, out_arg, partial, counters,
           M, K, rank, g.stride(0), w_arg.stride(0), out_arg.stride(0), parts, HAS_ROW_SCALE=row_scale,
           FOLD=w is not None, PRECISION=_precision(w1a), BM=BLOCK, BN=BLOCK,
           BR=_block_r(rank), num_warps=4)
    return (d1a.view(M, rank), d1b.view(rank, K), d2a.view(M, rank), d2b.view(rank, K),
            (out if w is not None else None))
