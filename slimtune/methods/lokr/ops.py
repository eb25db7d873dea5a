"""LoKr's explicit forward/backward ops for the shared Functions (:mod:`slimtune.core.structured`): the structured
path on a convolution (:class:`LokrConvOp`; a Linear's is :class:`~.function.KronLinearFunction`) and the fold
``W + s·w1 ⊗ w2`` (:class:`LokrFoldOp`)."""
from __future__ import annotations

import torch

from ...core.products import bmm_left, kron_grad, sum_bmm
from ...core.aten_grads import conv_grads, conv_input_grad
from ...core.structured import ConvSpec, FoldOp, Params, StructuredOp
from .factors import LokrFactors
from .math import kron_weight

LokrScale = tuple[float, "torch.Tensor | None"]  # (s, rank-dropout mask over the output rows [d_out] or None)


class LokrConvOp(StructuredOp):
    """``conv(x, s·w1 ⊗ w2)`` (groups 1): x ``[B, a_in·b_in, *sp]`` viewed ``[B·a_in, b_in, *sp]`` is convolved
    with w2 ``[b_out, b_in, *k]`` (the base geometry), then ``a_in`` is contracted with w1 (a batched GEMM
    accumulating into y).

    Backward, for dy viewed ``[B·a_out, b_out, *sp']``: the delta is also ``conv(w1 X, w2)`` (convolution is linear in
    its input; ``w1 X`` contracts ``a_in``: ``[B·a_out, b_in, *sp]``), so one ``convolution_backward`` call of w2's
    convolution at input ``w1 X`` and output gradient dy gives both ``z = conv_wᵀ(dy)`` (its input gradient,
    ``[B·a_out, b_in, *sp]``) and ``dw2`` (its weight gradient). Then ``dx += w1ᵀ z`` and ``dw1 = Σ_b z[b] X[b]ᵀ``
    (X: x viewed ``[B, a_in, b_in·sp]``) — by linearity ``⟨dy_j, conv(x_i, w2)⟩ = ⟨conv_wᵀ(dy_j), x_i⟩``, so
    neither needs ``conv(x, w2)`` again. One convolution backward call per layer beside the base's, as PEFT's dense
    delta convolution takes; ``w1 X`` is a transient of the input's size times ``a_out / a_in``."""

    def __init__(self, factors: LokrFactors, conv: ConvSpec, kernel: tuple[int, ...], w1_shape: tuple[int, int],
                 w2_shape: tuple[int, int]) -> None:
        self.factors, self.conv, self.kernel = factors, conv, kernel
        (self.a_out, self.a_in), (self.b_out, self.b_in) = w1_shape, w2_shape

    def build(self, params: Params, scale: LokrScale) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·w1, w2)``, w2 with its kernel ``[b_out, b_in, *k]``: factor-sized, kept for backward."""
        w1, w2 = self.factors.build(params, scale[0])
        return w1, w2.reshape(self.b_out, self.b_in, *self.kernel).contiguous()

    def add_delta(self, y, x, params, scale: LokrScale, built):
        mask, (w1, w2) = scale[1], built
        batch, a_out, a_in = x.shape[0], self.a_out, self.a_in
        u = self.conv.conv(x.reshape(batch * a_in, self.b_in, *x.shape[2:]), w2, groups=1)  # [B·a_in, b_out, *sp']
        u3 = u.reshape(batch, a_in, -1)
        if mask is None and y.is_contiguous():
            y.view(batch, a_out, -1).baddbmm_(w1.expand(batch, a_out, a_in), u3)
            return y
        delta = bmm_left(w1, u3).view(y.shape)
        if mask is not None:
            delta.mul_(mask.view(-1, *(1,) * (y.dim() - 2)))
        return y.add_(delta)

    def delta_backward(self, dy, x, params, scale: LokrScale, grad_x, need, built):
        (s, mask), (w1, w2) = scale, built
        batch, a_out, a_in = x.shape[0], self.a_out, self.a_in
        if mask is not None:
            dy = dy * mask.view(-1, *(1,) * (dy.dim() - 2))
        spatial_out, conv = dy.shape[2:], self.conv
        need_1, need_2 = self.factors.needs(need)
        want_z = grad_x is not None or need_1
        dw1 = dw2 = z = None
        dy_r = dy.reshape(batch * a_out, self.b_out, *spatial_out)
        in_shape = (batch * a_out, self.b_in, *x.shape[2:])
        x3 = x.reshape(batch, a_in, -1)
        if need_2:  # w2's convolution at input w1 X: its input and weight gradients in one call
            mixed = bmm_left(w1, x3).view(in_shape)
            z, dw2, _ = conv_grads(dy_r, mixed, w2, conv.stride, conv.padding, conv.dilation, 1, (want_z, True, False))
            del mixed
        elif want_z:
            z = conv_input_grad(dy_r, w2, in_shape, conv.stride, conv.padding, conv.dilation, 1)
        if z is not None:
            z3 = z.view(batch, a_out, -1)
            if grad_x is not None:
                w1t = w1.t().expand(batch, a_in, a_out)
                if grad_x.is_contiguous():
                    grad_x.view(batch, a_in, -1).baddbmm_(w1t, z3)
                else:
                    grad_x.add_(torch.bmm(w1t, z3).view(grad_x.shape))
            if need_1:
                dw1 = sum_bmm(z3, x3)
            del z, z3
        return self.factors.grads(dw1, dw2, params, s, need)


class LokrFoldOp(FoldOp):
    """``W + s · w1 ⊗ w2`` (rows times the rank-dropout mask), the Kronecker product as PEFT forms it
    (:func:`kron_weight`). Backward, for ``g = dL/dW'``: ``g ⊙ mask`` (rows), then the Kronecker product's gradients
    (:func:`~slimtune.core.products.kron_grad`: ``d(s·w1)[i, j] = Σ g[i·, j·] ⊙ w2``, ``dw2 = Σ_ij (s·w1)[i, j]·g[i·,
    j·]`` over the blocks), then :meth:`LokrFactors.grads` to the parameters."""

    def __init__(self, factors: LokrFactors, conv: ConvSpec | None) -> None:
        self.factors, self.conv = factors, conv

    @staticmethod
    def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return mask.view(-1, *(1,) * (like.dim() - 1))

    def fold(self, w, params, scale: LokrScale, inplace):
        s, mask = scale
        w1, w2 = self.factors.build(params, s)
        delta = kron_weight(w1, w2).reshape(w.shape)
        if mask is not None:
            delta = delta * self._rows(mask, w)
        return (w.add_(delta) if inplace else w + delta), (w1, w2)

    def fold_backward(self, g, params, parts, scale: LokrScale, need):
        s, mask = scale
        w1, w2 = parts
        if mask is not None:
            g = g * self._rows(mask, g)
        need_1, need_2 = self.factors.needs(need)
        a = w1[:, :, None, None] if w2.dim() == 4 else w1
        da, dw2 = kron_grad(g, a, w2, need_1, need_2)
        return self.factors.grads(None if da is None else da.reshape(w1.shape), dw2, params, s, need)
