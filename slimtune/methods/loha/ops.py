"""LoHa's explicit forward/backward ops for the shared structured and folded Functions
(:mod:`slimtune.core.structured`): on a Linear (LoRA at rank r² with computed factors), a convolution, the Tucker
form, and the fold ``W + ΔW`` (fused Triton kernels on the GPU, these PyTorch ops elsewhere and as their reference).
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F

from ...core.lowrank import factor_grads
from ...core.products import (Grad, add_mix_, cols_kr, cols_kr_grad, lowrank_grad, mix, mix_backward, rows_kr,
                              rows_kr_grad, scale_rows, tucker_grad, tucker_weight)
from ...core.structured import ConvSpec, FoldOp, Params, StructuredOp, base_backward
from ...core.structured_adapter import Scale
from ...core.triton import use_triton
from .math import core_kr, core_kr_grad


@functools.cache
def kernels() -> ModuleType:
    """:mod:`.triton_kernels`, imported on first use: it imports triton, an optional dependency (a CPU install has
    none), so only code behind :func:`~slimtune.core.triton.use_triton` reaches it."""
    from . import triton_kernels

    return triton_kernels


def _add_into(grad_x: torch.Tensor | None, dx: torch.Tensor | None) -> None:
    if dx is not None:
        grad_x.add_(dx)


def _down_grads(grads: list[Grad], d_down: Grad, w1b: torch.Tensor, w2b: torch.Tensor, need, at: tuple[int, int]
                ) -> None:
    """``dw1b``, ``dw2b`` into ``grads[at]`` from the gradient of ``D = w1b ⊙̂ w2b`` (rows); nothing if not needed."""
    i, j = at
    if d_down is not None and (need[i] or need[j]):
        grads[i], grads[j] = rows_kr_grad(d_down, w1b, w2b, need[i], need[j])


def _up_grads(grads: list[Grad], d_up: Grad, w1a_s: torch.Tensor, w2a: torch.Tensor, scale, need,
              at: tuple[int, int], columns: bool) -> None:
    """``dw1a``, ``dw2a`` into ``grads[at]`` from the gradient of ``U = (S·w1a) ⊙̂ w2a`` — its columns on a Linear
    / convolution, its rows in the Tucker form (``Uᵀ``) — where ``S`` (the scale, or ``s·mask`` per output row)
    multiplies w1a: ``dw1a = S ⊙ d(S·w1a)``."""
    i, j = at
    if d_up is None or not (need[i] or need[j]):
        return
    da, grads[j] = (cols_kr_grad if columns else rows_kr_grad)(d_up, w1a_s, w2a, need[i], need[j])
    grads[i] = None if da is None else scale_rows(da, scale, 0 if columns else 1)


class LohaLinearOp(StructuredOp):
    """LoHa on a Linear: LoRA at rank ``R = r²`` with computed factors ``D = w1b ⊙̂ w2b`` ``[R, d_in]`` (rows)
    and ``U = (s·w1a) ⊙̂ w2a`` ``[d_out, R]`` (columns); ``U D = s · (w1a w1b) ⊙ (w2a w2b)``.

    Forward: ``y += (x Dᵀ) Uᵀ`` (2 GEMMs). Backward: ``g = dy U``, ``dx += g D``, ``dU = dyᵀ (x Dᵀ)``,
    ``dD = gᵀ x`` (both by :func:`~slimtune.core.lowrank.factor_grads`, which may go through the Gram matrix
    ``dyᵀx``), then the factor gradients of the two face-splitting products. ``scale``: ``s``, or ``s · mask``
    ``[d_out]``.
    """

    def add_delta(self, y, x, params, scale, built):
        w1a, w1b, w2a, w2b = params
        down, up = rows_kr(w1b, w2b), cols_kr(scale_rows(w1a, scale, 0), w2a)
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        y2.addmm_(F.linear(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), down), up.t())
        return y

    def delta_backward(self, dy, x, params, scale, grad_x, need, built):
        w1a, w1b, w2a, w2b = params
        w1a_s = scale_rows(w1a, scale, 0)
        down, up = rows_kr(w1b, w2b), cols_kr(w1a_s, w2a)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        need_up, need_down = need[0] or need[2], need[1] or need[3]
        g = torch.mm(dy2, up) if grad_x is not None or need_down else None  # [N, R]
        if grad_x is not None:
            (grad_x if grad_x.dim() == 2 else grad_x.view(-1, x2.shape[1])).addmm_(g, down)
        d_down, d_up = factor_grads(dy2, x2, down, up, 1.0, need_down, need_up, dy_up=g)
        grads: list[Grad] = [None] * 4
        _up_grads(grads, d_up, w1a_s, w2a, scale, need, (0, 2), columns=True)
        _down_grads(grads, d_down, w1b, w2b, need, (1, 3))
        return grads


class LohaConvOp(StructuredOp):
    """LoHa on a convolution (groups 1): ``D`` (the LoRA form's rows, reshaped ``[R, c_in, *k]``) is a down
    convolution with the base geometry, ``U`` ``[c_out, R]`` a 1x1 up (a batched GEMM added into y).

    Backward (``h = conv(x, D)`` recomputed when U needs a gradient): ``dh = Uᵀ dy`` and ``dU = Σ dy hᵀ``
    (:func:`mix_backward`); the down convolution's backward gives ``dx += convᵀ(dh, D)`` and ``dD``; then the
    face-splitting products' gradients (:func:`_down_grads`, :func:`_up_grads`)."""

    def __init__(self, conv: ConvSpec, kernel: tuple[int, ...]) -> None:
        self.conv, self.kernel = conv, kernel

    def _factors(self, params: Params, scale: Scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w1a, w1b, w2a, w2b = params
        w1a_s = scale_rows(w1a, scale, 0)
        down = rows_kr(w1b, w2b)
        return w1a_s, down.view(down.shape[0], -1, *self.kernel), cols_kr(w1a_s, w2a)

    def add_delta(self, y, x, params, scale, built):
        _, down, up = self._factors(params, scale)
        return add_mix_(y, self.conv.conv(x, down, groups=1), up)

    def delta_backward(self, dy, x, params, scale, grad_x, need, built):
        _, w1b, w2a, w2b = params
        w1a_s, down, up = self._factors(params, scale)
        need_up, need_down, need_dx = need[0] or need[2], need[1] or need[3], grad_x is not None
        h = self.conv.conv(x, down, groups=1) if need_up else None
        dh, d_up = mix_backward(dy, h, up, need_dx or need_down, need_up)
        del h
        grads: list[Grad] = [None] * 4
        if need_dx or need_down:
            dx, d_down = base_backward(dh, x, down, self.conv, need_dx, need_down, groups=1)
            _add_into(grad_x, dx)
            _down_grads(grads, d_down, w1b, w2b, need, (1, 3))
        _up_grads(grads, d_up, w1a_s, w2a, scale, need, (0, 2), columns=True)
        return grads


class LohaTuckerOp(StructuredOp):
    """Tucker LoHa on a convolution (groups 1): a 1x1 down to ``R = r²`` channels (``D = w1b ⊙̂ w2b``
    ``[R, c_in]``), the core ``[R, R, *k]`` (:func:`core_kr`) with the base geometry, a 1x1 up
    (``Uᵀ = (s·w1a) ⊙̂ w2a`` ``[R, c_out]``, rows).

    Backward, the chain ``h1 = D x``, ``h2 = conv(h1, C)``, ``Δy = U h2`` taken back link by link (h1, h2
    recomputed): ``dh2 = Uᵀ dy``, ``dU = Σ dy h2ᵀ``; the core convolution's backward gives ``dh1`` and ``dC``, and
    ``dC`` goes to ``(dt1, dt2)`` (:func:`core_kr_grad`); ``dx += Dᵀ dh1``, ``dD = Σ dh1 xᵀ``; then the row-wise
    products' gradients."""

    def __init__(self, conv: ConvSpec, kernel: tuple[int, ...]) -> None:
        self.conv, self.kernel = conv, kernel

    def _factors(self, params: Params, scale: Scale) -> tuple[torch.Tensor, ...]:
        t1, w1a, w1b, t2, w2a, w2b = params
        w1a_s = scale_rows(w1a, scale, 1)
        return w1a_s, rows_kr(w1b, w2b), core_kr(t1, t2, self.kernel), rows_kr(w1a_s, w2a).t()

    def add_delta(self, y, x, params, scale, built):
        _, down, core, up = self._factors(params, scale)
        return add_mix_(y, self.conv.conv(mix(x, down), core, groups=1), up)

    def delta_backward(self, dy, x, params, scale, grad_x, need, built):
        t1, _, w1b, t2, w2a, w2b = params
        w1a_s, down, core, up = self._factors(params, scale)
        need_dx = grad_x is not None
        need_up, need_core, need_down = need[1] or need[4], need[0] or need[3], need[2] or need[5]
        need_dh1 = need_dx or need_down
        h1 = mix(x, down) if need_up or need_core or need_dh1 else None
        h2 = self.conv.conv(h1, core, groups=1) if need_up else None
        dh2, d_up = mix_backward(dy, h2, up, need_dh1 or need_core, need_up, w_transposed=True)
        del h2
        grads: list[Grad] = [None] * 6
        if need_dh1 or need_core:
            dh1, d_core = base_backward(dh2, h1, core, self.conv, need_dh1, need_core, groups=1)
            del dh2, h1
            if need_core:
                grads[0], grads[3] = core_kr_grad(d_core, t1, t2, need[0], need[3])
            if need_dh1:
                dx, d_down = mix_backward(dh1, x, down, need_dx, need_down)
                _add_into(grad_x, dx)
                _down_grads(grads, d_down, w1b, w2b, need, (2, 5))
        _up_grads(grads, d_up, w1a_s, w2a, scale, need, (1, 4), columns=False)
        return grads


class LohaFoldOp(FoldOp):
    """``W + W1 ⊙ W2`` with ``W1 = (s·w1a) w1b``, ``W2 = w2a w2b`` (Tucker: :func:`tucker_weight`); backward, for
    ``g = dL/dW'``: ``dW1 = g ⊙ W2``, ``dW2 = g ⊙ W1`` (the Hadamard product's gradients), then the low-rank products'
    (``d(s·w1a) = dW1 w1bᵀ``, ``dw1b = (s·w1a)ᵀ dW1``, likewise for W2) or the Tucker products' gradients, and
    ``dw1a = s ⊙ d(s·w1a)``.

    On the GPU (non-Tucker, rank ≤ :data:`slimtune.methods.loha.triton_kernels.MAX_RANK`) both run as one fused
    Triton kernel each (:mod:`.triton_kernels`: no dense ``W1`` / ``W2`` / ``g ⊙ W2``); the PyTorch code below is
    their reference and the path everywhere else."""

    def __init__(self, conv: ConvSpec | None, tucker: bool, rank: int) -> None:
        self.conv, self.tucker, self.rank = conv, tucker, rank
        self._kernel_ok: bool | None = None  # Tucker off and the rank within the kernels' limit; set on first use

    def fused(self, w: torch.Tensor) -> bool:
        """Whether :meth:`fold` / :meth:`fold_backward` take the Triton kernels for a weight like ``w``."""
        if not use_triton(w):
            return False
        if self._kernel_ok is None:
            self._kernel_ok = not self.tucker and self.rank <= kernels().MAX_RANK
        return self._kernel_ok

    @staticmethod
    def _rows(w: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W as [c_out, rest], the buffer W + ΔW may be written into or None)``: in place only into W itself."""
        w2d = w.reshape(w.shape[0], -1)
        return w2d, (w2d if inplace and w2d.is_contiguous() and w2d.data_ptr() == w.data_ptr() else None)

    def fold(self, w, params, scale, inplace):
        if self.fused(w):
            w2d, out = self._rows(w, inplace)
            return kernels().fold(w2d, *params, scale, out=out).view(w.shape), ()
        if self.tucker:
            t1, w1a, w1b, t2, w2a, w2b = params
            w1a_s = scale_rows(w1a, scale, 1)
            w1, w2 = tucker_weight(t1, w1a_s, w1b), tucker_weight(t2, w2a, w2b)
        else:
            w1a, w1b, w2a, w2b = params
            w1a_s = scale_rows(w1a, scale, 0)
            w1, w2 = w1a_s @ w1b, w2a @ w2b
        w1, w2 = w1.reshape(w.shape), w2.reshape(w.shape)
        return (w.addcmul_(w1, w2) if inplace else torch.addcmul(w, w1, w2)), (w1a_s, w1, w2)

    def fused_backward(self, w, params, scale, dy, x, need_x, need, inplace):
        """On the GPU: ``G = dyᵀx`` (the base's weight gradient), then one kernel for ``W'`` and the four factor
        gradients, then ``dx = dy W'``: three launches."""
        if not self.fused(w):
            return None
        _, g = base_backward(dy, x, w, self.conv, False, True)
        w2d, out = self._rows(w, inplace and need_x)
        *grads, w_eff = kernels().fold_grads(g.reshape(g.shape[0], -1), *params, scale,
                                             w=w2d if need_x else None, out=out)
        del g
        grad_x = base_backward(dy, x, w_eff.view(w.shape), self.conv, True, False)[0] if need_x else None
        return grad_x, [grad if wanted else None for grad, wanted in zip(grads, need)]

    def fold_backward(self, g, params, parts, scale, need):
        if not parts:  # the fused fold
            grads = kernels().fold_grads(g.reshape(g.shape[0], -1), *params, scale)[:4]
            return [grad if wanted else None for grad, wanted in zip(grads, need)]
        w1a_s, w1, w2 = parts
        if self.tucker:
            t1, _, w1b, t2, w2a, w2b = params
            n1, n2 = need[:3], need[3:]
            grads1 = tucker_grad(g * w2, t1, w1a_s, w1b, n1) if any(n1) else (None,) * 3
            grads2 = tucker_grad(g * w1, t2, w2a, w2b, n2) if any(n2) else (None,) * 3
            dt1, da, dw1b = grads1
            return [dt1, None if da is None else scale_rows(da, scale, 1), dw1b, *grads2]
        _, w1b, w2a, w2b = params
        rows = w1a_s.shape[0]
        da, dw1b = (lowrank_grad((g * w2).reshape(rows, -1), w1a_s, w1b, need[0], need[1]) if need[0] or need[1]
                    else (None, None))
        dw2a, dw2b = (lowrank_grad((g * w1).reshape(rows, -1), w2a, w2b, need[2], need[3]) if need[2] or need[3]
                      else (None, None))
        return [None if da is None else scale_rows(da, scale, 0), dw1b, dw2a, dw2b]
