"""Fused Triton kernels for LoHa's folded path; reference: ``LohaFoldOp`` in ``adapters/loha.py`` (PyTorch).

LoHa's update ``ΔW = (S·w1a w1b) ⊙ (w2a w2b)`` (``S`` the scaling ``s`` or a per-row ``s·mask`` for rank
dropout; w1a, w2a ``[M, R]``, w1b, w2b ``[R, K]``; a convolution's weight viewed ``[c_out, c_in·k]``) costs, done
with PyTorch ops, two dense products, an ``addcmul`` and — in backward — two more dense products and four GEMMs:
six launches and ~10 dense passes per layer per pass. Here:

* :func:`fold` — ``W' = W + ΔW`` in one pass: each program forms its ``[BM, BN]`` tiles of ``W1 = S·w1a w1b`` and
  ``W2 = w2a w2b`` with two small matrix products (inner size R) in registers, adds ``W1 ⊙ W2`` to W in fp32 and
  writes W' once (read W, write W': no dense intermediate).
* :func:`fold_grads` — from ``G = dL/dW'`` (``dyᵀx``, the base layer's weight gradient) the four factor gradients
  ``dw1a = S·(G ⊙ W2) w1bᵀ``, ``dw1b = (S·w1a)ᵀ (G ⊙ W2)``, ``dw2a = (G ⊙ W1) w2bᵀ``, ``dw2b = w2aᵀ (G ⊙ W1)``, in
  one launch, deterministic (no atomics): the first ``ceil(M / BM)`` programs own row blocks and walk every
  column tile (``dw1a``, ``dw2a``), the rest own column blocks and walk every row tile (``dw1b``, ``dw2b``); both
  re-form the W1/W2 tiles they need. The row programs can write ``W' = W + ΔW`` on the way (``w=``), so a
  backward gets ``W'`` for ``dx`` and the factor gradients from one launch: G first, then this, then ``dx``.

Products run on the tensor cores in the operands' dtype (bf16/fp16) with fp32 accumulation, in exact fp32
(``ieee``) for fp32 operands. ``R`` up to :data:`MAX_RANK` (one register block). Importing this module defines
the kernels, so ``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import cdiv, launch, next_power_of_2

#: largest LoHa rank the kernels take (the factor blocks live in registers); larger ranks use PyTorch
MAX_RANK = 128
BLOCK = 64  # tile side (rows and columns)


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
def _grads_kernel(g_ptr, w1a_ptr, w1b_ptr, w2a_ptr, w2b_ptr, scale_ptr, scale, d1a_ptr, d1b_ptr, d2a_ptr, d2b_ptr,
                  w_ptr, out_ptr, M, K, rank, stride_g, stride_w, stride_out, n_row_blocks,
                  HAS_ROW_SCALE: tl.constexpr, FOLD: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    ks = tl.arange(0, BR)
    k_ok = ks < rank
    dot_dtype = w1a_ptr.dtype.element_ty
    if pid < n_row_blocks:  # a row block: dw1a, dw2a  [BM, R]
        rows = pid * BM + tl.arange(0, BM)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        acc1 = tl.zeros([BM, BR], dtype=tl.float32)
        acc2 = tl.zeros([BM, BR], dtype=tl.float32)
        row_scale = tl.zeros([BM], dtype=tl.float32)
        for c0 in range(0, K, BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < K
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
        tl.store(d1a_ptr + out, (acc1 * row_scale[:, None]).to(d1a_ptr.dtype.element_ty), mask=mask)
        tl.store(d2a_ptr + out, acc2.to(d2a_ptr.dtype.element_ty), mask=mask)
    else:  # a column block: dw1b, dw2b  [R, BN] (names of their own: Triton unifies the branches' variables)
        c_cols = (pid - n_row_blocks) * BN + tl.arange(0, BN)
        c_col_ok = c_cols < K
        acc1b = tl.zeros([BR, BN], dtype=tl.float32)
        acc2b = tl.zeros([BR, BN], dtype=tl.float32)
        for r0 in range(0, M, BM):
            c_rows = r0 + tl.arange(0, BM)
            c_row_ok = c_rows < M
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


def fold_grads(g: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               scale: float | torch.Tensor, w: torch.Tensor | None = None, out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dw1a, dw1b, dw2a, dw2b, W')`` for ``G = dL/dW'`` ``[M, K]`` (unit column stride), in the factors' dtype.

    With ``w`` given, the same launch also writes ``W' = W + ΔW`` (as :func:`fold`, into ``out`` or a new
    tensor; ``out`` may be ``w``) — a backward that needs both pays one launch; else ``W'`` is None."""
    M, K = g.shape
    rank = w1a.shape[1]
    g, w1a, w1b, w2a, w2b = _rows(g), w1a.contiguous(), w1b.contiguous(), w2a.contiguous(), w2b.contiguous()
    w = _rows(w) if w is not None else None
    if out is not None and out.stride(-1) != 1:
        raise ValueError("fold_grads: out needs unit column stride")
    d1a, d2a = torch.empty_like(w1a), torch.empty_like(w2a)
    d1b, d2b = torch.empty_like(w1b), torch.empty_like(w2b)
    if w is not None and out is None:
        out = torch.empty(M, K, device=g.device, dtype=w1a.dtype)
    scale_t, scale_f, row_scale = _scale_args(scale, w1a)
    n_row_blocks = cdiv(M, BLOCK)
    grid = (n_row_blocks + cdiv(K, BLOCK),)
    w_arg, out_arg = (w, out) if w is not None else (g, g)
    launch(_grads_kernel, g, grid, g, w1a, w1b, w2a, w2b, scale_t, scale_f, d1a, d1b, d2a, d2b, w_arg, out_arg,
           M, K, rank, g.stride(0), w_arg.stride(0), out_arg.stride(0), n_row_blocks, HAS_ROW_SCALE=row_scale,
           FOLD=w is not None, PRECISION=_precision(w1a), BM=BLOCK, BN=BLOCK, BR=_block_r(rank), num_warps=4)
    return d1a, d1b, d2a, d2b, (out if w is not None else None)


class FusedLohaLinear(torch.autograd.Function):
    """LoHa's folded path on a dense Linear, as one autograd Function over the two kernels — the GPU hot path.

    ``y = x (W + ΔW)ᵀ + b``: forward :func:`fold` then one GEMM; backward ``G = dyᵀx``, :func:`fold_grads` (the
    four factor gradients and ``W'`` in one launch), ``dx = dy W'``. Saves x, W and the factors only (what
    :class:`~slimtune.kernels.structured.FoldedFunction` saves); ``W'`` lives only inside forward and backward.
    The generic path (``FoldedFunction`` with ``LohaFoldOp``) computes the same; this one skips its layers of
    Python, which a host-bound step pays per layer. W (``[d_out, d_in]``, x's dtype, frozen) and b must already be
    in x's dtype; fp32 factors are cast for the kernels and their gradients returned in fp32. ``scale``: the
    number ``s`` or ``s · mask`` ``[d_out]``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, w1a, w1b, w2a, w2b):
        dtype = x.dtype
        factors = [f if f.dtype == dtype else f.to(dtype) for f in (w1a, w1b, w2a, w2b)]
        y = F.linear(x, fold(weight, *factors, scale), bias)
        ctx.save_for_backward(x, weight, w1a, w1b, w2a, w2b)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, *params = ctx.saved_tensors
        dtype = x.dtype
        need_x = ctx.needs_input_grad[0]
        factors = [p if p.dtype == dtype else p.to(dtype) for p in params]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != dtype:
            dy2 = dy2.to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        *grads, w_eff = fold_grads(dy2.t() @ x2, *factors, ctx.scale, w=weight if need_x else None)
        grad_x = (dy2 @ w_eff).view(x.shape) if need_x else None
        grad_b = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grads = [g if p.dtype == dtype and wanted else (g.to(p.dtype) if wanted else None)
                 for g, p, wanted in zip(grads, params, ctx.needs_input_grad[4:])]
        return grad_x, None, grad_b, None, *grads
