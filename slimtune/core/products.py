"""Factor products of structured updates and their gradients, explicit (no autograd): face-splitting and
Kronecker products (LoHa, LoKr), Tucker cores, low-rank products, and 1x1 convolutions as batched GEMMs.

Each ``*_grad`` returns the operands' gradients for the product's output gradient, ``None`` where not asked for.
"""
from __future__ import annotations

from typing import Sequence

import torch

Grad = torch.Tensor | None


def scale_rows(w: torch.Tensor, scale: float | torch.Tensor, dim: int) -> torch.Tensor:
    """``w`` with output row ``o`` (index ``o`` along ``dim`` of a 2-D ``w``) times ``scale[o]``, or all times the
    number ``scale`` (``w`` itself for 1)."""
    if isinstance(scale, torch.Tensor):
        return w * (scale.unsqueeze(1) if dim == 0 else scale.unsqueeze(0))
    return w if scale == 1.0 else w * scale


def rows_kr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: a ``[r, n]``, b ``[s, n]`` → ``[r·s, n]``, row ``(i, j)`` = ``a[i] * b[j]``."""
    return (a.unsqueeze(1) * b).reshape(-1, a.shape[1])


def rows_kr_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
                 ) -> tuple[Grad, Grad]:
    """``(da, db)`` of :func:`rows_kr` for the output gradient ``g`` ``[r·s, n]``."""
    g3 = g.reshape(a.shape[0], b.shape[0], -1)
    da = torch.linalg.vecdot(g3, b, dim=1) if need_a else None  # Σ_j g[i, j] * b[j]
    db = torch.linalg.vecdot(g3, a.unsqueeze(1), dim=0) if need_b else None
    return da, db


def cols_kr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise (face-splitting) product: a ``[n, r]``, b ``[n, s]`` → ``[n, r·s]``, column ``(i, j)`` =
    ``a[:, i] * b[:, j]``."""
    return (a.unsqueeze(2) * b.unsqueeze(1)).reshape(a.shape[0], -1)


def cols_kr_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
                 ) -> tuple[Grad, Grad]:
    """``(da, db)`` of :func:`cols_kr` for ``g`` ``[n, r·s]``: one batched mat-vec each."""
    g3 = g.reshape(a.shape[0], a.shape[1], b.shape[1])
    da = torch.bmm(g3, b.unsqueeze(2)).view(a.shape) if need_a else None
    db = torch.bmm(a.unsqueeze(1), g3).view(b.shape) if need_b else None
    return da, db


def lowrank_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
                 ) -> tuple[Grad, Grad]:
    """``(da, db)`` of ``a @ b`` (a ``[m, r]``, b ``[r, n]``) for ``g`` ``[m, n]``."""
    return (g @ b.t() if need_a else None), (a.t() @ g if need_b else None)


def tucker_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``W[p, q, ·] = Σ_ij t[i, j, ·] wa[i, p] wb[j, q]``: t ``[r, r, *k]``, wa ``[r, c_out]``, wb ``[r, c_in]``."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def tucker_grad(g: torch.Tensor, t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, need: Sequence[bool]
                ) -> tuple[Grad, Grad, Grad]:
    """``(dt, dwa, dwb)`` of :func:`tucker_weight` for ``g`` ``[c_out, c_in, *k]`` (any shape of that size)."""
    need_t, need_a, need_b = need
    gk = g.reshape(wa.shape[1], wb.shape[1], -1)
    tk = t.reshape(t.shape[0], t.shape[1], -1)
    dt = da = db = None
    if need_t or need_a:
        m = torch.einsum("pqk,jq->pjk", gk, wb)
        dt = torch.einsum("ip,pjk->ijk", wa, m).reshape(t.shape) if need_t else None
        da = torch.einsum("ijk,pjk->ip", tk, m) if need_a else None
    if need_b:
        db = torch.einsum("iqk,ijk->jq", torch.einsum("pqk,ip->iqk", gk, wa), tk)
    return dt, da, db


def kron_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool, need_b: bool
              ) -> tuple[Grad, Grad]:
    """``(da, db)`` of ``torch.kron(a, b)`` for ``g`` of the kron's size (the smaller-rank operand is padded
    with leading unit dims, as torch.kron does): g viewed ``[A0, B0, A1, B1, ...]`` times the other operand
    broadcast into its slots, summed over them."""
    n = max(a.dim(), b.dim())
    sa = (1,) * (n - a.dim()) + tuple(a.shape)
    sb = (1,) * (n - b.dim()) + tuple(b.shape)
    gi = g.reshape([size for pair in zip(sa, sb) for size in pair])
    da = db = None
    if need_a:
        da = (gi * b.reshape([size for d in sb for size in (1, d)])).sum(tuple(range(1, 2 * n, 2))).reshape(a.shape)
    if need_b:
        db = (gi * a.reshape([size for d in sa for size in (d, 1)])).sum(tuple(range(0, 2 * n, 2))).reshape(b.shape)
    return da, db


def sum_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_n a[n] b[n]ᵀ``: a ``[N, m, k]``, b ``[N, n, k]`` → ``[m, n]``; a batched GEMM and a sum when the
    ``[N, m, n]`` intermediate is smaller than transposed copies of the operands, else one GEMM on those."""
    (_, m, k), n = a.shape, b.shape[1]
    if m * n <= (m + n) * k:
        return torch.bmm(a, b.transpose(1, 2)).sum(0)
    return a.transpose(0, 1).reshape(m, -1) @ b.transpose(0, 1).reshape(n, -1).t()


def bmm_left(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``w @ t[n]`` for every n: w ``[m, k]`` (any strides), t ``[N, k, n]`` → ``[N, m, n]``, one batched GEMM
    (``torch.matmul`` would copy ``t`` to fold it into a single GEMM)."""
    return torch.bmm(w.expand(t.shape[0], *w.shape), t)


def mix(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a batched GEMM: h ``[B, c, *sp]``, w ``[c_out, c]`` (any strides) → ``[B, c_out, *sp]``."""
    return bmm_left(w, h.reshape(h.shape[0], h.shape[1], -1)).view(h.shape[0], w.shape[0], *h.shape[2:])


def add_mix_(y: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y + mix(h, w)``, accumulated into ``y`` by the GEMM itself when ``y`` is contiguous."""
    if not y.is_contiguous():
        return y + mix(h, w)
    batch = y.shape[0]
    y.view(batch, y.shape[1], -1).baddbmm_(w.expand(batch, *w.shape), h.reshape(batch, h.shape[1], -1))
    return y


def mix_backward(dy: torch.Tensor, h: torch.Tensor | None, w: torch.Tensor, need_h: bool, need_w: bool,
                 w_transposed: bool = False) -> tuple[Grad, Grad]:
    """``(dh, dw)`` of ``mix(h, w)``; ``dw`` is ``[c, c_out]`` when ``w_transposed`` (for a ``w`` given as the
    transpose of a contiguous ``[c, c_out]``). ``h`` is only needed for ``dw``."""
    dy3 = dy.reshape(dy.shape[0], dy.shape[1], -1)
    dh = bmm_left(w.t(), dy3).view(dy.shape[0], w.shape[1], *dy.shape[2:]) if need_h else None
    dw = None
    if need_w:
        h3 = h.reshape(h.shape[0], h.shape[1], -1)
        dw = sum_bmm(h3, dy3) if w_transposed else sum_bmm(dy3, h3)
    return dh, dw
