"""DoRA's Linear training path without the dense product: the product and tail Functions (the factored row norm
they read is in :mod:`.norm`, the composition tail's references and kernels in :mod:`.compose`).

DoRA (Liu et al.) rescales each output row of the LoRA-updated weight ``V = W + s·B A``::

    y = g ⊙ z + b,   z = x Wᵀ + s·(x Aᵀ) Bᵀ,   g = m / ‖V‖_row   (‖V‖_row treated as a constant: no gradient)

Shapes: x ``[..., d_in]`` (N tokens), W ``[d_out, d_in]`` (frozen; a dense tensor or a 4-bit
:class:`~slimtune.core.frozen.QuantizedWeight` handle), A ``[r, d_in]``, B ``[d_out, r]``, m / g / b ``[d_out]``.
The bias is added unscaled, as PEFT does.

* :func:`~.norm.factored_row_norm_sq` gets ``‖V‖²_row = ‖W‖²_row + 2s·rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B)`` from
  ``[d_out, r]`` / ``[r, r]`` intermediates: no ``[d_out, d_in]`` tensor is formed. The layer's path is two GEMMs,
  ``W Aᵀ`` and ``A Aᵀ`` (:func:`factored_norm_parts`; on CUDA bf16/fp16 GEMMs with fp32 outputs), and one kernel
  (:func:`~.norm.dora_vectors`) that forms ``B (A Aᵀ)`` in fp32 (three-pass tf32 products) and the rest.
* The Linear layer is two autograd Functions. :class:`DoraProductFunction` queues the big GEMMs
  ``z = x Wᵀ + s·(x Aᵀ) Bᵀ`` first, then the norm's, whose kernel turns them into the ``[4, d_out]`` fp32 vectors
  ``(g − 1, g, 1/‖V‖, 1/m')`` that everything downstream reads (no other ``[d_out]`` kernels). It saves what LoRA
  saves: x (the very input object), W itself (a 4-bit handle
  is kept on ctx instead and dequantised again in backward — no dense copy outlives its GEMM), A, B; never
  ``x Aᵀ``. :class:`DoraTailFunction` writes the fused tail ``y = z + (g − 1)·z + b`` over z. ``g − 1`` is formed
  as ``(m − ‖V‖) / ‖V‖`` in fp32, never as a rounded ``g`` minus one (no cancellation near g = 1, where DoRA's
  magnitudes live), and ``g = 1`` gives back ``z`` bit for bit; where ``|g − 1| > 1/2`` the tail computes ``g·z``
  instead (a tiny g would vanish in ``1 + (g − 1)``). Two Functions, so that what the tail saved is
  released (its backward returns ``dz``) before the product's backward allocates ``dx``: the backward's
  transient peak is LoRA's. Its backward is one fused pass (``dz = g·dy``, ``Σ dy ⊙ z`` scaled by ``1/‖V‖`` (or
  ``1/m'``) per row chunk, ``Σ dy``) and one reduction of the chunks' partials: ``dm`` and ``db`` in fp32, which
  autograd casts to the parameters' dtypes. The product's backward queues the big ``dx`` GEMM first, so the
  device computes while the host issues the small ones (at a few thousand tokens the host is the bottleneck on
  the lent machines: every launch counts, ``benchmarks/host_cost.py``).

For ``dm = Σ_tokens dy ⊙ z / ‖V‖`` the tail saves, where it can, its own **output** y
(``ctx.save_for_backward(output)``: where the next op saves y too — SiLU saves gate, the product saves up,
attention saves v when it takes it as is — it is stored once), from which ``z / ‖V‖ = y / m'``. Never z.

**The rule (host-side, no sync): when y stands in for z.** The training step never reads anything back from the
device; what backward keeps is decided in forward from what the host already knows — the bias's presence, the
dtype, dropout, ``recompute``:

* **output** — no bias, no dropout, y in bf16 / fp32 / fp64 (fp32's exponent range or more). The magnitude
  used is ``m' = sign(m)·max(|m|, ε‖V‖)`` with ``ε = 2^⌊e_min/2⌋`` (2⁻⁶³ for bf16/fp32; :func:`magnitude_floor`),
  computed on the device inside :func:`dora_vectors` (data-parallel; sign(0) = +). So ``|g| ≥ ε`` and
  ``g·z`` is a normal number whenever ``|z| ≥ tiny/ε = 2⁻⁶³``: each recovered ``y/m'`` is within the dtype's
  unit roundoff of ``z/‖V‖`` (as a stored z would be) plus at most ``2⁻⁶³/‖V‖`` absolute — for every m,
  including tiny and zero ones (where ``y / m`` would be 0/0). The price: a channel with ``|m| < ε‖V‖`` outputs
  ``±ε·z`` instead of ``(m/‖V‖)·z`` (a change below ``2⁻⁶³·|z|``, far under any output's rounding), and its
  gradient is the true one, ``Σ dy ⊙ z / ‖V‖`` (it does not depend on m).
* **z** (z saved, as the conv path does) — a bias (``y − b`` would cancel where the bias dominates its channel),
  fp16 (e_min = −14: ``ε`` would be 2⁻⁷, far from negligible), or dropout (y then also holds
  ``(x − drop(x)) Wᵀ``).
* **recompute** (``dora_recompute``) — no ``[N, d_out]`` tensor saved; z rebuilt in backward (one more base
  GEMM). A frozen magnitude needs neither. With the default ``dora_recompute="auto"`` each layer of the output
  kind is measured once (:class:`~.probe.OutputProbe`): it keeps its output where the output
  outlives the forward pass anyway, and recomputes elsewhere — activation memory as LoRA's.

The elementwise tail (forward ``y``; backward ``dz = g·dy``, the ``dm`` and bias column sums, in one pass) and
the ``[d_out]`` vectors run as fused Triton kernels on CUDA (:mod:`.triton_kernels`), else as the
plain-PyTorch references here. Convolutions (``DoraConv``) use :class:`~.compose.DoraScaleFunction`, which keeps z.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.compute import cast, scaled_
from ...core.frozen import WeightOperand, is_quantized, materialize, save_with_weight, saved_with_weight
from ...core.lowrank import dropout_keep_mask, dropout_seed, factor_grads
from .compose import compose_backward, compose_forward
from .norm import dora_vectors, factored_norm_parts, magnitude_floor, saves_output, weight_row_norm_sq


def _product(xd: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
             lead: tuple[int, ...]) -> torch.Tensor:
    """``z = xd Wᵀ + s·(xd Aᵀ) Bᵀ`` ``[*lead, d_out]`` (not a view) from the 2-D ``xd``; all in xd's dtype."""
    z = F.linear(xd.view(*lead, xd.shape[-1]), w)
    z.view(-1, z.shape[-1]).addmm_(xd @ a.t(), b.t(), alpha=scaling)
    return z


class DoraProductFunction(torch.autograd.Function):
    """``(z, rest, vec)``: ``z = drop(x) Wᵀ + s·(drop(x) Aᵀ) Bᵀ`` ``[..., d_out]``, ``rest = (x − drop(x)) Wᵀ``
    (dropout only, else None) and ``vec`` = :func:`dora_vectors` ``[4, d_out]`` fp32 — ``(g − 1, g, 1/‖V‖, 1/m')``
    with ``m'`` the magnitude floored at ``eps·‖V‖`` — no gradient (m gets its gradient through the tail).

    x ``[..., d_in]``; weight ``[d_out, d_in]`` dense (any dtype; cast per GEMM) or a quantised handle
    (dequantised once in forward — base GEMM and ``W Aᵀ`` — and once in backward for dx); lora_a / lora_b in
    any float dtype (cast to x's for the GEMMs, gradients in theirs); weight_sq: cached ``‖W‖²_row`` or None.
    The norm (two GEMMs and one kernel) is queued after the base GEMM (its launches overlap that GEMM). Saves x,
    A, B, W (or keeps the handle); the dropout mask is redrawn in backward from ``seed``.

    Backward, given ``dz`` (from the tail: ``g·dy``) and ``drest`` (dropout only), with ``m`` the keep mask and
    ``xd = m ⊙ x`` — line by line as the code does it:

    * ``g_r = s·dz B`` ``[N, r]`` (the adapter's output gradient pulled back through B);
    * ``dx = dz W`` first (the big GEMM, queued before the small ones), and with dropout ``rest_x = drest W``;
    * ``(dA, dB)`` = :func:`~slimtune.core.lowrank.factor_grads` — ``dB = s·dzᵀ (xd Aᵀ)``, ``dA = g_rᵀ xd`` (or
      through ``G = dzᵀ xd``): z is LoRA's product of ``xd``, so its factor gradients are LoRA's;
    * ``dx += g_r A``; with dropout ``dx = m ⊙ (dz W + g_r A) + (1 − m) ⊙ drest W`` (z saw ``xd``, rest saw
      ``x − xd``);
    * ``dW = dzᵀ xd (+ drestᵀ (x − xd))`` only if W asks for a gradient. ``vec`` has none (the norm is a
      constant, DoRA §4.3), so the magnitude's gradient comes from the tail alone.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, magnitude, scaling: float, dropout_p: float, seed: int, weight_sq,
                save: bool, eps: float):
        ctx.set_materialize_grads(False)
        dtype, lead, d_in = x.dtype, tuple(x.shape[:-1]), x.shape[-1]
        x2 = x.reshape(-1, d_in)
        a, b = cast(lora_a, dtype), cast(lora_b, dtype)
        mask = dropout_keep_mask(x2, dropout_p, seed) if dropout_p > 0 else None
        xd = x2 * mask if mask is not None else x2
        w = materialize(weight, dtype)
        z = _product(xd, w, a, b, scaling, lead)
        if weight_sq is None:
            weight_sq = weight_row_norm_sq(w)
        mixed, gram = factored_norm_parts(w, a)
        vec = dora_vectors(mixed, gram, b, weight_sq, magnitude, scaling, eps)
        del mixed, gram
        rest = F.linear((x2 - xd).view(*lead, d_in), w) if mask is not None else None
        del w
        ctx.mark_non_differentiable(vec)
        if save:
            save_with_weight(ctx, weight, x, lora_a, lora_b)
            ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return z, rest, vec

    @staticmethod
    def backward(ctx, dz, drest, _):
        weight, (x, lora_a, lora_b) = saved_with_weight(ctx)
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        s, dtype, p = ctx.scaling, x.dtype, ctx.dropout_p
        a, b = cast(lora_a, dtype), cast(lora_b, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        if dz is None:  # only rest got a gradient
            dz2 = torch.zeros(x2.shape[0], b.shape[0], dtype=dtype, device=x.device)
        else:
            dz2 = cast(dz.reshape(-1, dz.shape[-1]), dtype)
        drest2 = cast(drest.reshape(-1, drest.shape[-1]), dtype) if drest is not None else None
        grad_x = grad_w = grad_a = grad_b = grad_x2 = rest = None
        dya = scaled_(dz2 @ b, s) if (need_a or need_x) else None  # s·dz B, [N, r]
        if need_x:  # the big GEMMs first (a dequantised weight is dropped right after them)
            w = materialize(weight, dtype)
            grad_x2 = dz2 @ w
            rest = drest2 @ w if p > 0 and drest2 is not None else None
            del w
        mask = dropout_keep_mask(x2, p, ctx.seed) if p > 0 else None
        xd = x2 * mask if mask is not None else x2
        grad_a, grad_b = factor_grads(dz2, xd, a, b, s, need_a, need_b, dy_up=dya)
        grad_a = cast(grad_a, lora_a.dtype) if grad_a is not None else None
        grad_b = cast(grad_b, lora_b.dtype) if grad_b is not None else None
        if need_x:
            grad_x2.addmm_(dya, a)
            if mask is not None:  # mask ⊙ (dz W + dya A) + (1 − mask) ⊙ drest W
                if rest is not None:
                    grad_x2.sub_(rest).mul_(mask).add_(rest)
                else:
                    grad_x2.mul_(mask)
            grad_x = grad_x2.view(x.shape)
        if need_w and not is_quantized(weight):
            grad_w = dz2.t() @ xd
            if mask is not None and drest2 is not None:
                grad_w.addmm_(drest2.t(), x2 - xd)
            grad_w = cast(grad_w, weight.dtype)
        return grad_x, grad_w, grad_a, grad_b, None, None, None, None, None, None, None


class DoraTailFunction(torch.autograd.Function):
    """``y = z + (g − 1)·z + b [+ rest]`` (``vec`` from :class:`DoraProductFunction`: ``g`` and ``g − 1``; no
    gradient), written over z where it can be.

    z ``[..., d_out]``, rest: the product's dropout term or None, magnitude ``[d_out]`` (any shape with d_out
    elements), bias ``[d_out]`` or None. keep — what backward gets ``dm = Σ dy ⊙ z / ‖V‖`` from, chosen on the
    host by :func:`dora_linear`: ``"output"`` (y itself, saved as the output: ``z / ‖V‖ = y / m'``; bias-free
    bf16/fp32/fp64 only, see the module docstring), ``"z"`` (z saved: dropout, a bias, fp16), ``"recompute"``
    (z rebuilt from x, W, A, B), None (no dm: frozen magnitude), ``"none"`` (no backward). x, weight, lora_a,
    lora_b, scaling, dropout_p, seed: the product's inputs, kept for ``"recompute"`` only (the same objects the
    product saves); they get no gradient here. Backward returns ``dz = g·dy`` (its own ``[N, d_out]`` buffer)
    and releases what it saved before the product's backward allocates dx, so the backward's transient peak is
    LoRA's. ``dm`` and the bias gradient come out of the backward pass's own reduction in fp32 (autograd casts
    them to the parameters' dtypes).

    Backward, with ``y = g ⊙ z + b (+ rest)``, ``g = m/‖V‖`` per output row and ‖V‖ a constant — as the code does it:

    * ``dz = g ⊙ dy`` (``∂y/∂z = g``);
    * ``dm = Σ_tokens dy ⊙ z / ‖V‖`` (``∂y/∂m = z/‖V‖``), where z is: the saved output over the floored magnitude
      (``"output"``: ``z/‖V‖ = y/m'``, so the sum is taken over y and scaled by ``1/m'``), the saved z
      (``"z"``: scaled by ``1/‖V‖``), or z rebuilt as ``xd Wᵀ + s·(xd Aᵀ) Bᵀ`` (``"recompute"``, its buffer then
      overwritten by dz);
    * ``db = Σ_tokens dy``, ``drest = dy`` (the dropout term is added unscaled);
    * all three sums and dz in one fused pass (:func:`~.compose.compose_backward`).
    """

    @staticmethod
    def forward(ctx, z, rest, magnitude, vec, bias, keep: str | None, x, weight, lora_a, lora_b, scaling: float,
                dropout_p: float, seed: int):
        if keep == "z":
            y, _ = compose_forward(z, vec[0], bias=bias, g=vec[1])
        else:
            y, _ = compose_forward(z, vec[0], bias=bias, out=z, g=vec[1])
            ctx.mark_dirty(z)
        if rest is not None:
            y.add_(rest)
        ctx.route = keep
        if keep != "none":
            if keep == "output":
                ctx.save_for_backward(vec, y)
            elif keep == "z":
                ctx.save_for_backward(vec, z)
            elif keep == "recompute":
                save_with_weight(ctx, weight, vec, x, lora_a, lora_b)
                ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
            else:
                ctx.save_for_backward(vec)
            ctx.magnitude_shape = magnitude.shape
            ctx.has_rest = rest is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        keep = ctx.route
        dy2 = dy.reshape(-1, dy.shape[-1])
        inplace = False
        if keep == "recompute":
            weight, (vec, x, lora_a, lora_b) = saved_with_weight(ctx)
            dtype = x.dtype
            x2 = x.reshape(-1, x.shape[-1])
            xd = x2 * dropout_keep_mask(x2, ctx.dropout_p, ctx.seed) if ctx.dropout_p > 0 else x2
            w = materialize(weight, dtype)
            pre = _product(xd, w, cast(lora_a, dtype), cast(lora_b, dtype), ctx.scaling, (x2.shape[0],))
            del w, xd
            inplace, scale = True, vec[2]  # z again, overwritten by dz; dm = Σ dy ⊙ z · (1/‖V‖)
        elif keep is None:  # frozen magnitude: g·dy (and the bias sum) only
            (vec,) = ctx.saved_tensors
            pre, scale = (dy2 if dy2.stride(-1) == 1 else dy2.contiguous()), None
        else:
            vec, kept = ctx.saved_tensors
            pre = kept.view(dy2.shape) if keep == "output" else kept.reshape(dy2.shape)
            scale = vec[3] if keep == "output" else vec[2]  # dm = Σ dy ⊙ y · (1/m')  or  Σ dy ⊙ z · (1/‖V‖)
            del kept
        need_bias = ctx.needs_input_grad[4]
        dz, grad_m, grad_bias = compose_backward(dy2, pre, vec[1], dbase_out=pre if inplace else None,
                                                 dy_sum=need_bias, scale=scale)
        grad_m = grad_m.view(ctx.magnitude_shape) if keep and ctx.needs_input_grad[2] else None
        grad_z = dz.view(dy.shape) if ctx.needs_input_grad[0] else None
        return (grad_z, dy if ctx.has_rest else None, grad_m, None, grad_bias, None, None, None, None, None, None,
                None, None)


def dora_linear(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                weight_sq: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
    """DoRA on a Linear: :class:`DoraProductFunction` then :class:`DoraTailFunction`.

    ``weight`` ``[d_out, d_in]``: dense (any dtype; cast for each GEMM) or a quantised handle; ``bias`` in x's
    dtype; ``weight_sq``: cached ``‖W‖²_row`` (or None); ``recompute``: keep no ``[N, d_out]`` tensor. With
    ``dropout_p`` the result is PEFT's ``x Wᵀ + b + (g−1)·drop(x) Wᵀ + g·s·(drop(x) Aᵀ) Bᵀ``. What backward
    keeps is decided here, on the host (module docstring); nothing is read back from the device.
    """
    seed = dropout_seed(dropout_p)
    keep = backward_route(x, weight, bias, lora_a, lora_b, magnitude, dropout_p, recompute)
    eps = magnitude_floor(x.dtype) if keep == "output" else 0.0
    z, rest, vec = DoraProductFunction.apply(x, weight, lora_a, lora_b, magnitude, scaling, dropout_p, seed,
                                             weight_sq, keep != "none", eps)
    return DoraTailFunction.apply(z, rest, magnitude, vec, bias, keep, x, weight, lora_a, lora_b, scaling,
                                  dropout_p, seed)


def backward_route(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, magnitude: torch.Tensor, dropout_p: float, recompute: bool) -> str | None:
    """What :class:`DoraTailFunction` keeps for backward (its ``keep``), from what the host knows (no sync)."""
    if not torch.is_grad_enabled() or not (
            x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or magnitude.requires_grad
            or (bias is not None and bias.requires_grad)
            or (isinstance(weight, torch.Tensor) and weight.requires_grad)):
        return "none"
    if not magnitude.requires_grad:
        return None
    if recompute:
        return "recompute"
    return "output" if dropout_p == 0 and saves_output(bias, x.dtype) else "z"
