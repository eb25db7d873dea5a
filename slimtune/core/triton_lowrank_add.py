"""Triton kernel of :func:`~.lowrank_add.lowrank_add`: ``y = base + s·h upᵀ`` in one pass, each output tile reading
its ``base`` tile and writing y, the rank-``R`` product formed in registers (``tl.dot`` accumulates in fp32; the sum
is rounded once, as cuBLAS's ``addmm`` rounds ``alpha·(h upᵀ) + base``). Registered as the custom op
``slimtune::lowrank_add`` through ``torch.library.triton_op``, so that ``torch.compile`` keeps the kernel in its graph
(Inductor calls it as a user-defined Triton kernel) and runs it between its own kernels. Reference:
:func:`~.lowrank_add.lowrank_add_reference` (``tests/core/test_lowrank_add.py`` under the interpreter in float16,
``tests/core/test_lowrank_add_cuda.py`` in bf16 on a GPU). Importing this module defines the kernel, so
``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import cdiv, next_power_of_2

BLOCK_M, BLOCK_N = 128, 128


@triton.jit
def _lowrank_add_kernel(base_ptr, h_ptr, up_ptr, y_ptr, M, N, R, stride_base, stride_h, stride_up, scaling,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        ranks = start + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        h = tl.load(h_ptr + rows64[:, None] * stride_h + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        up_t = tl.load(up_ptr + cols64[None, :] * stride_up + ranks[:, None], mask=rank_ok[:, None] & col_ok[None, :],
                       other=0.0)  # [BLOCK_R, BLOCK_N]: upᵀ's tile
        acc = tl.dot(h, up_t, acc)
    ok = row_ok[:, None] & col_ok[None, :]
    base = tl.load(base_ptr + rows64[:, None] * stride_base + cols64[None, :], mask=ok, other=0.0)
    y = base.to(tl.float32) + scaling * acc
    tl.store(y_ptr + rows64[:, None] * N + cols64[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@torch.library.triton_op("slimtune::lowrank_add", mutates_args=())
def lowrank_add_triton(base: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """``base + scaling · h @ up.t()`` ``[M, N]``, contiguous: base ``[M, N]``, h ``[M, R]`` and up ``[N, R]`` of one
    half-precision dtype, each with unit column stride (rows may be strided: slices of a wider buffer)."""
    (m, n), rank = base.shape, h.shape[1]
    y = torch.empty((m, n), dtype=base.dtype, device=base.device)
    block_r = min(64, max(16, next_power_of_2(rank)))  # tl.dot takes blocks of 16 and more
    grid = (cdiv(m, BLOCK_M), cdiv(n, BLOCK_N))
    if m and n:
        torch.library.wrap_triton(_lowrank_add_kernel)[grid](
            base, h, up, y, m, n, rank, base.stride(0), h.stride(0), up.stride(0), float(scaling),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r, num_warps=8)
    return y

