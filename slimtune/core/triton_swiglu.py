"""Triton kernels for :class:`~.swiglu.SwigluFunction`: ``h = silu(g) ⊙ u`` in one launch, and ``(dg, du)`` in
one, over flat contiguous elements. The arithmetic and roundings are PyTorch's (``silu(g) = g / (1 + exp(−g))``
rounded to the dtype, then the product; SiLU's backward ``ds · σ · (1 + g (1 − σ))``); only ``exp`` is Triton's.
References: ``swiglu_reference`` and ``swiglu_backward_reference`` in :mod:`.swiglu` (``tests/core/test_swiglu.py``
under the interpreter, ``tests/core/test_lean_llama_cuda.py`` on a GPU). Importing this module defines the kernels, so
``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import cdiv, launch

BLOCK = 2048


@triton.jit
def _forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (s * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    e = tl.exp(-g)
    s = (g / (1.0 + e)).to(du_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + offs, (dh * s).to(du_ptr.dtype.element_ty), mask=ok)
    ds = (dh * u).to(dg_ptr.dtype.element_ty).to(tl.float32)
    sig = 1.0 / (1.0 + e)
    tl.store(dg_ptr + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)


def swiglu_forward_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) ⊙ u`` for g, u ``[..., d_ff]`` of one shape and dtype."""
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        launch(_forward_kernel, g, (cdiv(n, BLOCK),), g, u, h, n, BLOCK=BLOCK, num_warps=8)
    return h


def swiglu_backward_triton(grad: torch.Tensor, g: torch.Tensor,
                           u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` from ``dh = grad`` and the saved g, u (all ``[..., d_ff]``)."""
    grad, g, u = grad.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        launch(_backward_kernel, g, (cdiv(n, BLOCK),), grad, g, u, dg, du, n, BLOCK=BLOCK, num_warps=8)
    return dg, du
