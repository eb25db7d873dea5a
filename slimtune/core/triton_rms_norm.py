"""Triton kernels for the frozen RMSNorm of :mod:`.rms_norm`: one launch forward (``y`` and a float32 ``rstd`` per
row), one backward (``dx``). One program per row, the whole row in registers (rows up to
:data:`~.rms_norm.TRITON_MAX_COLS` wide). The arithmetic and its roundings are the references'
(``rms_norm_reference``, ``rms_norm_backward_reference``); ``tests/core/test_rms_norm.py`` compares them under the
interpreter, ``tests/core/test_lean_llama_cuda.py`` on a GPU. Importing this module defines the kernels, so
``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import launch, next_power_of_2


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the normalised x in x's dtype, as the module rounds it
    tl.store(y_ptr + row * stride_y + cols, (w * h).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, stride_dy, stride_x, stride_dx,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dh = (dy * w).to(dx_ptr.dtype.element_ty).to(tl.float32)  # rounded as autograd's product gradient
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    dot = tl.sum(dh * x, axis=0) / n_cols
    dx = rstd * dh - x * (rstd * rstd * rstd) * dot
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[N, D]`` with unit column stride (a view where it can be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [..., D], rstd float32 [N])`` for x ``[..., D]`` (N rows), weight ``[D]`` of x's dtype or float32; y in
    their promoted dtype, as the module's product."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        block = next_power_of_2(n_cols)
        launch(_forward_kernel, x2, (n_rows,), x2, weight, y, rstd, n_cols, x2.stride(0), n_cols, float(eps),
               BLOCK=block, num_warps=_warps(block))
    return y, rstd


def rms_norm_backward_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             rstd: torch.Tensor) -> torch.Tensor:
    """``dx [..., D]`` (x's dtype) from grad (y's dtype) and x ``[..., D]``, weight ``[D]``, rstd float32 ``[N]``."""
    dy2, x2 = _rows(grad), _rows(x)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows:
        block = next_power_of_2(n_cols)
        launch(_backward_kernel, x2, (n_rows,), dy2, x2, weight, rstd, dx, n_cols, dy2.stride(0), x2.stride(0),
               n_cols, BLOCK=block, num_warps=_warps(block))
    return dx
