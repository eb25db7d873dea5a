"""The low-rank product every LoRA-like method trains through, written once: ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``.

Shapes: x ``[..., d_in]`` (N tokens), W ``[d_out, d_in]`` (frozen; a dense tensor or a 4-bit
:class:`~slimtune.core.frozen.QuantizedWeight` handle), A ("down") ``[r, d_in]``, B ("up") ``[d_out, r]``.
LoRA uses it with its parameters, HRA with computed factors (``down = Uᵀ``, ``up = −W U T``), DoRA's product and
LoHa's rank-``r²`` structured path with :func:`factor_grads` and :func:`choose_backward`.

:class:`LowRankLinearFunction` saves for backward: x itself (the very tensor object, so q/k/v projections that share
an input store it once), the parameters (no copies), and for dropout a seed (an int; under ``torch.compile`` a
one-element tensor, :mod:`slimtune.core.tracing`) from which backward redraws
the mask — never ``x Aᵀ``, never a dropped copy of x, never an fp32 copy. A 4-bit base is dequantised right before
each GEMM that needs it (forward, and ``dx`` in backward) and dropped after; only the handle is kept. All GEMMs run
in x's dtype (bf16 GEMMs accumulate in fp32); fp32 master adapter weights are cast for the GEMM and their gradients
returned in fp32.

Backward has two ways to get dA and dB (RunLoRA's choice by FLOP count, :func:`choose_backward`): ``"recompute"``
rebuilds ``x Aᵀ`` (``[N, r]``) and works with thin GEMMs; ``"gram"`` forms ``G = dyᵀ x`` (``[d_out, d_in]``) once
and projects it, which is cheaper only when tokens vastly outnumber a small layer's size. The plain composition
:func:`lowrank_linear_reference` is the reference the tests compare against.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import timed
from .compute import add_product, cast, compute_setting, mm_scaled
from .frozen import WeightOperand, is_quantized, materialize, save_with_weight, saved_with_weight
from .rebuild import keep_input, kept_input
from .tracing import compiling, seeded_keep_mask, traced_seed

Variant = str  # "recompute" | "gram"
Grad = torch.Tensor | None
_CONV = {1: F.conv1d, 2: F.conv2d}


# -- the backward-order chooser (RunLoRA) ---------------------------------------------------------------------
def backward_flops(variant: Variant, tokens: int, d_in: int, d_out: int, r: int) -> int:
    """FLOPs to get dA and dB (dx is the same for both variants)."""
    if variant == "recompute":
        # x Aᵀ, dyᵀ(xAᵀ), dy B, (dyB)ᵀ x
        return 2 * tokens * r * (2 * d_in + 2 * d_out)
    if variant == "gram":
        # G = dyᵀ x, G Aᵀ, Bᵀ G, plus dy B for dx's adapter term
        return 2 * d_out * d_in * (tokens + 2 * r) + 2 * tokens * d_out * r
    raise ValueError(f"unknown low-rank backward variant {variant!r}")


def choose_backward(tokens: int, d_in: int, d_out: int, r: int) -> Variant:
    """The backward variant with fewer FLOPs (ties go to ``"recompute"``, which allocates less). A plain comparison,
    which ``torch.compile`` traces (it cannot trace ``min`` with a ``key``)."""
    gram = backward_flops("gram", tokens, d_in, d_out, r)
    return "gram" if gram < backward_flops("recompute", tokens, d_in, d_out, r) else "recompute"


# -- dropout, by seed ------------------------------------------------------------------------------------------
def dropout_keep_mask(like: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """The scaled keep mask ``bernoulli(1 - p) / (1 - p)`` for ``like``, redrawable from ``seed`` (a tensor seed,
    as :func:`dropout_seed` gives under ``torch.compile``: the same mask through a custom op a graph can hold)."""
    if isinstance(seed, torch.Tensor):
        return seeded_keep_mask(like, p, seed)
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p, generator=gen)
    return mask.mul_(1.0 / (1.0 - p))


def dropout_seed(p: float) -> int | torch.Tensor:
    """A fresh seed for :func:`dropout_keep_mask` (drawn from torch's generator, so ``torch.manual_seed`` repeats
    it), or 0 without dropout; under ``torch.compile`` the same draw as a one-element tensor (no ``.item()`` in a
    graph)."""
    if p <= 0:
        return 0
    if compiling():
        return traced_seed()
    return int(torch.randint(0, 2**62, (1,)).item())


# -- the factor gradients, shared ------------------------------------------------------------------------------
def pick_backward(dy2: torch.Tensor, xd: torch.Tensor, down: torch.Tensor) -> Variant:
    """:func:`choose_backward` for these operands, or under ``slimtune.set_variant_criterion("timed")`` the
    variant measured fastest for their shapes and dtype on their device (:mod:`slimtune.core.timed`)."""
    (tokens, d_in), d_out, r = xd.shape, dy2.shape[1], down.shape[0]
    counted = choose_backward(tokens, d_in, d_out, r)
    if not timed.timing():  # the default: nothing to measure (no key, no closure per call)
        return counted

    def variants() -> dict[str, Callable[[], object]]:
        gen = torch.Generator(device=xd.device).manual_seed(0)
        dy_, xd_ = (torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in (dy2, xd))
        down_ = torch.randn(down.shape, generator=gen, device=down.device, dtype=xd.dtype)
        up_ = torch.randn((d_out, r), generator=gen, device=down.device, dtype=xd.dtype)
        return {v: (lambda v=v: _factor_grads_by(v, dy_, xd_, down_, up_, 1.0, True, True, None))
                for v in ("recompute", "gram")}

    return timed.choose("lowrank-backward", (tokens, d_in, d_out, r, str(xd.dtype)), xd.device, counted, variants)


def factor_grads(dy2: torch.Tensor, xd: torch.Tensor, down: torch.Tensor, up: torch.Tensor, s: float,
                 need_down: bool, need_up: bool, dy_up: torch.Tensor | None = None) -> tuple[Grad, Grad]:
    """``(d_down [r, d_in], d_up [d_out, r])`` of ``y += s·(xd downᵀ) upᵀ`` for ``dy2`` ``[N, d_out]``, ``xd``
    ``[N, d_in]`` (both in the compute dtype); ``dy_up``: ``s·dy2 up`` ``[N, r]`` when the caller already formed it
    (for dx). With ``h = xd downᵀ`` and ``g = s·dy2 up``::

        recompute:  d_up = s·dy2ᵀ h            d_down = gᵀ xd
        gram:       G = dy2ᵀ xd [d_out, d_in]  d_up = s·G downᵀ     d_down = s·upᵀ G

    (the same products, associated the other way: ``dy2ᵀ (xd downᵀ) = (dy2ᵀ xd) downᵀ``; :func:`pick_backward`
    chooses).
    """
    if not (need_down or need_up):
        return None, None
    return _factor_grads_by(pick_backward(dy2, xd, down), dy2, xd, down, up, s, need_down, need_up, dy_up)


def _factor_grads_by(variant: Variant, dy2: torch.Tensor, xd: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                     s: float, need_down: bool, need_up: bool, dy_up: torch.Tensor | None) -> tuple[Grad, Grad]:
    """:func:`factor_grads` by the given variant."""
    d_down = d_up = None
    if variant == "gram":
        gram = dy2.t() @ xd  # [d_out, d_in]
        d_up = mm_scaled(gram, down.t(), s) if need_up else None
        d_down = mm_scaled(up.t(), gram, s) if need_down else None
        return d_down, d_up
    if need_up:
        d_up = mm_scaled(dy2.t(), F.linear(xd, down), s)
    if need_down:
        g = dy_up if dy_up is not None else mm_scaled(dy2, up, s)
        d_down = g.t() @ xd
    return d_down, d_up


# -- the Function ----------------------------------------------------------------------------------------------
class LowRankLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``; see the module docstring for what is saved.

    Backward, with ``x2`` = x as ``[N, d_in]``, ``dy2`` = dy as ``[N, d_out]``, ``m`` the dropout keep mask
    (redrawn from the seed; ``m = 1`` without dropout) and ``xd = m ⊙ x2``, line by line as the code does it:

    * ``g = s·dy2 B`` ``[N, r]`` — the adapter's output gradient pulled back through B (dx and, on the
      recompute variant, dA need it);
    * ``dx = dy2 W`` (queued first: the big GEMM, the device works while the host queues the small ones);
    * ``(dA, dB)`` = :func:`factor_grads` — ``dB = s·dy2ᵀ (xd Aᵀ)``, ``dA = gᵀ xd`` (or via ``G = dy2ᵀ xd``);
    * ``dx += m ⊙ (g A)`` — the adapter's term (``addmm`` into dx without dropout);
    * ``dW = dy2ᵀ x2`` only if the base weight asks for a gradient (it is frozen under slimtune), ``db = Σ dy2``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, seed: int | torch.Tensor):
        dtype = x.dtype
        a, b = cast(lora_a, dtype), cast(lora_b, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 * dropout_keep_mask(x2, dropout_p, seed) if dropout_p > 0 else x2
        y = add_product(F.linear(x2, materialize(weight, dtype), bias), F.linear(xd, a), b.t(), scaling)
        save_with_weight(ctx, weight, *keep_input(ctx, x), lora_a, lora_b)  # x, or its recipe (core.rebuild)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, saved = saved_with_weight(ctx)
        x, (lora_a, lora_b) = kept_input(ctx, saved)
        s, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dtype = x.dtype
        a, b = cast(lora_a, dtype), cast(lora_b, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = cast(dy.reshape(-1, dy.shape[-1]), dtype)
        mask = dropout_keep_mask(x2, p, ctx.seed) if p > 0 and (need_a or need_b or need_x) else None
        xd = x2 * mask if mask is not None else x2

        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        g = mm_scaled(dy2, b, s) if need_a or need_x else None  # s · dy B, [N, r]
        grad_x2 = dy2 @ materialize(weight, dtype) if need_x else None
        grad_a, grad_b = factor_grads(dy2, xd, a, b, s, need_a, need_b, dy_up=g)
        grad_a = cast(grad_a, lora_a.dtype) if grad_a is not None else None
        grad_b = cast(grad_b, lora_b.dtype) if grad_b is not None else None
        del xd
        if need_x:
            if mask is None:
                grad_x2 = add_product(grad_x2, g, a)
            else:
                grad_x2.add_((g @ a).mul_(mask))
            grad_x = grad_x2.view(x.shape)
        if need_w and not is_quantized(weight):
            grad_w = dy2.t() @ x2
        if need_bias and ctx.has_bias:
            grad_bias = dy2.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def lowrank_linear(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Apply :class:`LowRankLinearFunction`. A dense ``weight`` and ``bias`` must already be in x's dtype; a
    quantised ``weight`` is dequantised to it."""
    return LowRankLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, dropout_seed(dropout_p))


def lowrank_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                             dropout: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """The plain composition ``x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` through PyTorch's own autograd."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropout(x), lora_a), lora_b)


# -- the same on a convolution ---------------------------------------------------------------------------------
def conv_low_rank_forward(x: torch.Tensor, x_down: torch.Tensor, base: nn.Module, down: torch.Tensor,
                          up: torch.Tensor) -> torch.Tensor:
    """``base(x) + up(down(x_down))`` without a dense kernel update (LoCon, HRA on Conv2d), through PyTorch's
    autograd (convolutions save their inputs; no custom backward is needed).

    ``down`` ``[r, c_in, *k]`` runs with the base's stride, padding and dilation; ``up`` ``[c_out, r / groups, 1(, 1)]``
    is a 1x1 convolution with the base's groups. Both run in the compute dtype (autocast's, else x's); x_down is x,
    or x after dropout.
    """
    y = base(x)
    dtype, context = compute_setting(x)
    conv = _CONV[down.dim() - 2]
    with context:
        h = conv(x_down.to(dtype), down.to(dtype), None, base.stride, base.padding, base.dilation)
        delta = conv(h, up.to(dtype), None, 1, 0, 1, base.groups)
    return y + delta.to(y.dtype)
