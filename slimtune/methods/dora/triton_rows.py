"""Triton kernel of :func:`~.stacked.rows_norm_parts`: a stacked DoRA chain's norm parts ``P = S Aᵀ`` and its
weights' ``‖W‖²_row`` in one pass over the rows S ``[M, K]`` (``M = Σd + R``; W = S's first ``total`` rows, A = the
last R), where cuBLAS's GEMM and Inductor's reduction each read all of S (RESULTS.md run 152: the reductions alone
1.45 ms of a compiled 3B DoRA step on an H100).

Each program takes ``BLOCK_M`` rows of S and one slice of K (split-K, so that narrow chains such as o or down still
fill the GPU); per K block it loads its S tile once, adds ``tile · A_tileᵀ`` (``tl.dot``, fp32 accumulation) and the
tile's squares (fp32). The slices' partial sums ``[splits, M, R]`` / ``[splits, M]`` are added by PyTorch ops in the
op's body, which ``torch.compile`` fuses into the kernels that read P. Registered as ``slimtune::dora_rows_parts``
through ``torch.library.triton_op``, so that a compiled graph holds the kernel. Reference:
:func:`~.stacked.rows_norm_parts_reference` (``tests/methods/dora/test_triton_rows.py``: fp16 under the interpreter,
bf16 on a GPU). Importing this module defines the kernel, so ``TRITON_INTERPRET=1`` (CPU tests) must be
set before that.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.triton import cdiv, next_power_of_2, sm_count

BLOCK_M, BLOCK_K = 64, 64


@triton.jit
def _rows_parts_kernel(rows_ptr, parts_ptr, sq_ptr, M, K, R, total, stride_row, k_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    row_ok, rank_ok = rows < M, ranks < R
    rows64, a_rows64 = rows.to(tl.int64), (total + ranks).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    k_start = split * k_per_split  # k_per_split: a multiple of BLOCK_K
    for k in range(0, k_per_split, BLOCK_K):
        cols = k_start + k + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        tile = tl.load(rows_ptr + rows64[:, None] * stride_row + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0)
        a_t = tl.load(rows_ptr + a_rows64[None, :] * stride_row + cols[:, None],
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]: Aᵀ's tile
        acc = tl.dot(tile, a_t, acc)
        wide = tile.to(tl.float32)
        squares += wide * wide
    out = split.to(tl.int64) * M
    tl.store(parts_ptr + (out + rows64)[:, None] * R + ranks[None, :], acc, mask=row_ok[:, None] & rank_ok[None, :])
    tl.store(sq_ptr + out + rows64, tl.sum(squares, axis=1), mask=row_ok)


def splits_for(row_blocks: int, k: int, device: torch.device) -> int:
    """K slices per row block: enough programs for two per streaming multiprocessor, each slice at least four K
    blocks long (the interpreter: as for 8 multiprocessors)."""
    wanted = cdiv(2 * sm_count(device, elsewhere=8), row_blocks)
    return max(1, min(wanted, k // (4 * BLOCK_K)))


@torch.library.triton_op("slimtune::dora_rows_parts", mutates_args=())
def rows_parts_triton(rows: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S Aᵀ [M, R], ‖S‖²_row [M])`` in fp32 for rows S ``[M, K]`` of fp16 / bf16 with unit column stride and
    ``A = S[total:]`` (``R = M − total`` rows, at most :data:`~.stacked.ROWS_KERNEL_MAX_RANK`); the caller takes
    ``‖W‖²_row`` as the first ``total`` row sums (each output a tensor of its own: a custom op returns no views)."""
    m, k = rows.shape
    rank = m - total
    row_blocks = cdiv(m, BLOCK_M)
    k_per_split = cdiv(cdiv(k, splits_for(row_blocks, k, rows.device)), BLOCK_K) * BLOCK_K
    splits = cdiv(k, k_per_split) if k else 1
    lead = (splits,) if splits > 1 else ()  # one slice: the kernel writes the results themselves
    alloc = torch.zeros if k == 0 else torch.empty  # K = 0: the empty sums
    parts = alloc((*lead, m, rank), dtype=torch.float32, device=rows.device)
    squares = alloc((*lead, m), dtype=torch.float32, device=rows.device)
    # the CPU interpreter's kernel is no JITFunction, which torch 2.11's wrap_triton refuses: launched as it is
    # (eagerly: a compiled chain takes the kernel on CUDA only)
    kernel = _rows_parts_kernel if rows.device.type == "cpu" else torch.library.wrap_triton(_rows_parts_kernel)
    if k and m:
        kernel[(row_blocks, splits)](
            rows, parts, squares, m, k, rank, total, rows.stride(0), k_per_split,
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=max(16, next_power_of_2(rank)),  # tl.dot: blocks of 16 and more
            num_warps=4)
    return (parts.sum(0), squares.sum(0)) if lead else (parts, squares)
