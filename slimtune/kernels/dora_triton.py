"""Fused Triton kernels for DoRA's elementwise tail; references: ``compose_*_reference`` in ``dora.py``.

Forward, one pass over ``[N, D]``::

    out = base + (g−1)·base + g·s·lora + b          (lora, b optional; fp32 in registers)

Backward, one pass: ``dbase = g·dy`` (``dlora = s·dbase``, not written) and the fp32 column sums
``Σ_n dy ⊙ (base + s·lora)`` (DoRA's ``dm`` times ‖V‖) as per-chunk partials, summed by the caller —
deterministic, no atomics. base / lora / out / dbase: 2-D with contiguous rows (``out`` and ``dbase`` may be
``base`` itself: each element is read before it is written, by the same program); dy: any strides (e.g. the
stride-0 gradient of ``.sum()``). fp32 / fp16 / bf16.

Importing this module defines the kernels, so ``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
Only long-standing ``tl`` operations are used (Triton 3.x).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_D = 128
TILE = 4096  # elements per loaded tile


@triton.jit
def _compose_fwd_kernel(base_ptr, lora_ptr, gm1_ptr, bias_ptr, out_ptr, n_rows, n_cols,
                        stride_base, stride_lora, stride_out, scaling,
                        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gm1 = tl.load(gm1_ptr + cols, mask=col_ok, other=0.0)[None, :]
    base = tl.load(base_ptr + rows64 * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = base + gm1 * base
    if HAS_LORA:
        lora = tl.load(lora_ptr + rows64 * stride_lora + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out += (1.0 + gm1) * scaling * lora
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _compose_bwd_kernel(dy_ptr, base_ptr, lora_ptr, g_ptr, dbase_ptr, partial_ptr, n_rows, n_cols, rows_per_chunk,
                        stride_dy_row, stride_dy_col, stride_base, stride_lora, stride_dbase, scaling,
                        HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(1)
    col_ok = cols < n_cols
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # reduced over rows once, after the loop
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
        acc += dy * pre
        tl.store(dbase_ptr + rows64 * stride_dbase + cols[None, :], (dy * g).to(dbase_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(partial_ptr + chunk * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[N, D]`` view with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _blocks(n_cols: int) -> tuple[int, int]:
    block_d = min(BLOCK_D, triton.next_power_of_2(n_cols))
    return TILE // block_d, block_d


def _device_ctx(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def compose_forward(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None, scaling: float = 1.0,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``base + (g−1)·base + g·s·lora + b`` over the last axis; base ``[..., D]``, gm1 / bias ``[D]``."""
    shape, n_cols = base.shape, base.shape[-1]
    base2 = _as_rows(base)
    lora2 = _as_rows(lora) if lora is not None else base2
    out = torch.empty_like(base, memory_format=torch.contiguous_format) if out is None else out
    out2 = out.view(-1, n_cols)
    gm1 = gm1.to(torch.float32).contiguous()
    bias_arg = bias.contiguous() if bias is not None else gm1
    n_rows = base2.shape[0]
    block_n, block_d = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_d))
    with _device_ctx(base):
        _compose_fwd_kernel[grid](base2, lora2, gm1, bias_arg, out2, n_rows, n_cols, base2.stride(0),
                                  lora2.stride(0), out2.stride(0), float(scaling), HAS_LORA=lora is not None,
                                  HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return out.view(shape)


def compose_backward(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor, lora: torch.Tensor | None = None,
                     scaling: float = 1.0, dbase_out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g·dy`` in base's dtype, fp32 ``Σ_rows dy ⊙ (base + s·lora)`` ``[D])`` in one pass over dy and base."""
    shape, n_cols = base.shape, base.shape[-1]
    base2 = _as_rows(base)
    lora2 = _as_rows(lora) if lora is not None else base2
    dy2 = dy.reshape(-1, n_cols)  # any strides: stride-0 (expanded) gradients are read as they are
    dbase = torch.empty_like(base, memory_format=torch.contiguous_format) if dbase_out is None else dbase_out
    dbase2 = dbase.view(-1, n_cols)
    g = g.to(torch.float32).contiguous()
    n_rows = base2.shape[0]
    block_n, block_d = _blocks(n_cols)
    n_col_blocks = triton.cdiv(n_cols, block_d)
    target = 4 * (torch.cuda.get_device_properties(base.device).multi_processor_count if base.is_cuda else 2)
    n_chunks = max(1, min(triton.cdiv(target, n_col_blocks), triton.cdiv(n_rows, block_n)))
    rows_per_chunk = triton.cdiv(triton.cdiv(n_rows, n_chunks), block_n) * block_n
    n_chunks = triton.cdiv(n_rows, rows_per_chunk)
    partial = torch.empty(n_chunks, n_cols, device=base.device, dtype=torch.float32)
    with _device_ctx(base):
        _compose_bwd_kernel[(n_col_blocks, n_chunks)](
            dy2, base2, lora2, g, dbase2, partial, n_rows, n_cols, rows_per_chunk, dy2.stride(0), dy2.stride(1),
            base2.stride(0), lora2.stride(0), dbase2.stride(0), float(scaling), HAS_LORA=lora is not None,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return dbase.view(shape), partial.sum(0)
