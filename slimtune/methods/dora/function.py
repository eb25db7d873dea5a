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
* The Linear layer is one autograd Function, :class:`DoraLinearFunction`. It queues the big GEMMs
  ``z = x Wᵀ + s·(x Aᵀ) Bᵀ`` first, then the norm's, and one kernel (:func:`~.compose.vectors_and_compose`) turns
  them into the ``[4, d_out]`` fp32 vectors ``(g − 1, g, 1/‖V‖, 1/m')`` that everything downstream reads and
  writes the tail ``y = z + (g − 1)·z + b`` over z. It saves what LoRA saves: x (the very input object), W itself
  (a 4-bit handle is kept on ctx instead and dequantised again in backward — no dense copy outlives its GEMM), A,
  B; never ``x Aᵀ``. ``g − 1`` is formed as ``(m − ‖V‖) / ‖V‖`` in fp32, never as a rounded ``g`` minus one (no
  cancellation near g = 1, where DoRA's magnitudes live), and ``g = 1`` gives back ``z`` bit for bit; where
  ``|g − 1| > 1/2`` the tail computes ``g·z`` instead (a tiny g would vanish in ``1 + (g − 1)``). Its backward is
  one fused pass (``dz = g·dy``, ``Σ dy ⊙ z`` scaled by ``1/‖V‖`` (or ``1/m'``) per row chunk, ``Σ dy``) and one
  reduction of the chunks' partials — ``dm`` and ``db`` in fp32, which autograd casts to the parameters' dtypes —
  then the product's, which queues the big ``dx`` GEMM first, so the device computes while the host issues the
  small ones. One Function and one Triton launch each way: at a few thousand tokens the host is the bottleneck on
  the lent machines, and every Function and launch costs it tens of microseconds (``benchmarks/host_cost.py``).
* The ``"z"`` route below (z kept) is two Functions, :class:`DoraProductFunction` and :class:`DoraTailFunction`,
  so that the saved z is released (the tail's backward returns ``dz``) before the product's backward allocates
  ``dx``: the backward's transient peak is LoRA's.

For ``dm = Σ_tokens dy ⊙ z / ‖V‖`` the layer saves, where it can, its own **output** y
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

The floor ``m'`` applies on every route where the output route could apply — no bias, a dtype with fp32's range
(:func:`~.norm.saves_output`) — not on the output route alone: so a layer's vectors do not depend on which route a
call takes (the first step's probe, checkpointing's kept outputs, a no-grad call), and the vectors formed ahead for
the whole model (:mod:`.prepass`) serve every such call. Where it does not apply (a bias, fp16) ``m' = m``.

The elementwise tail (forward ``y``; backward ``dz = g·dy``, the ``dm`` and bias column sums, in one pass) and
the ``[d_out]`` vectors run as fused Triton kernels on CUDA (:mod:`.triton_kernels`), else as the
plain-PyTorch references here. Convolutions (``DoraConv``) use :class:`~.compose.DoraScaleFunction`, which keeps z.
"""
from __future__ import annotations

import torch

from ...core.compute import cast
from ...core.frozen import WeightOperand, materialize, save_with_weight, saved_with_weight
from ...core.lowrank import dropout_seed
from ...core.tracing import distinct_when_traced
from .compose import compose_backward, compose_forward, scale, vectors_and_compose
from .norm import dora_vectors, floor_for, saves_output
from .product import as_rows, dora_product, dropped_input, product_backward, product_forward


class DoraLinearFunction(torch.autograd.Function):
    """The whole DoRA Linear in one Function — every route but ``"z"`` (:func:`backward_route`):
    ``y = g ⊙ z + b [+ rest]`` with the product, the norm and the tail of :class:`DoraProductFunction` and
    :class:`DoraTailFunction`, forward and backward, and one Triton launch each way on the GPU
    (:func:`~.compose.vectors_and_compose`; :func:`~.compose.compose_backward`): on a host-bound step every
    Function and launch is host time.

    Arguments as :func:`dora_linear` takes them, plus ``seed`` (dropout), ``keep`` (the route: ``"output"``,
    ``"recompute"``, None — frozen magnitude, no dm — or ``"none"``, no backward), ``eps`` (the magnitude floor
    where it applies: module docstring) and ``vec``: the ``[4, d_out]`` vectors when they were formed ahead (:mod:`.prepass`;
    the forward then runs no norm and no kernel: ``y = g ⊙ z (+ b)``, one PyTorch op), else None. Saves what the
    product saves (x, A, B, W or the 4-bit handle), the ``[4, d_out]`` vectors, and for ``"output"`` its own
    output y. Backward: the tail's (``dz = g·dy``, ``dm``, ``db`` in one pass; z rebuilt for ``"recompute"``, its
    buffer then overwritten by dz), then the product's. The ``"z"`` route keeps two Functions: its saved z is
    released before dx is allocated.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout_p: float, seed,
                weight_sq, keep: str | None, eps: float, vec: torch.Tensor | None = None):
        z, rest, mixed, gram, weight_sq = product_forward(x, weight, lora_a, lora_b, scaling, dropout_p, seed,
                                                          weight_sq, norm=vec is None)
        if vec is None:
            y, vec = vectors_and_compose(z, mixed, gram, lora_b, weight_sq, magnitude, scaling, eps, bias, out=z)
        else:  # the step's vectors, formed ahead (.prepass)
            y = scale(z, vec[1], bias, out=z)
        del mixed, gram
        if rest is not None:
            y.add_(rest)
        y = distinct_when_traced(y)  # z itself eagerly (written in place): see the helper
        ctx.route = keep
        if keep != "none":
            save_with_weight(ctx, weight, vec, x, lora_a, lora_b, *((y,) if keep == "output" else ()))
            ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
            ctx.magnitude_shape, ctx.has_rest = magnitude.shape, rest is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        keep = ctx.route
        weight, (vec, x, lora_a, lora_b, *kept) = saved_with_weight(ctx)
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        dy2 = as_rows(dy)
        _, g, inv_norm, inv_m = vec.unbind(0)
        if keep == "recompute":  # z again, overwritten by dz; dm = Σ dy ⊙ z · (1/‖V‖)
            x2 = as_rows(x)
            xd, _ = dropped_input(x2, ctx.dropout_p, ctx.seed)
            w = materialize(weight, x.dtype)
            pre = dora_product(xd, w, cast(lora_a, x.dtype), cast(lora_b, x.dtype), ctx.scaling, (x2.shape[0],))
            del w, xd
            dz2, grad_m, grad_bias = compose_backward(dy2, pre, g, dbase_out=pre, dy_sum=need_bias, scale=inv_norm)
        elif keep is None:  # frozen magnitude: g·dy (and the bias sum) only
            pre = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
            dz2, grad_m, grad_bias = compose_backward(dy2, pre, g, dy_sum=need_bias)
        else:  # dm = Σ dy ⊙ y · (1/m')
            dz2, grad_m, grad_bias = compose_backward(dy2, kept[0].view(dy2.shape), g, dy_sum=need_bias, scale=inv_m)
        if not (keep and need_m):
            grad_m = None
        elif grad_m.shape != ctx.magnitude_shape:
            grad_m = grad_m.view(ctx.magnitude_shape)
        grad_x, grad_w, grad_a, grad_b = product_backward(
            ctx, weight, x, lora_a, lora_b, dz2, dy2 if ctx.has_rest else None, (need_x, need_w, need_a, need_b))
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None, None, None


class DoraProductFunction(torch.autograd.Function):
    """``(z, rest, vec)`` for the ``"z"`` route: ``z = drop(x) Wᵀ + s·(drop(x) Aᵀ) Bᵀ`` ``[..., d_out]``,
    ``rest = (x − drop(x)) Wᵀ`` (dropout only, else None) and ``vec`` = :func:`dora_vectors` ``[4, d_out]`` fp32 —
    ``(g − 1, g, 1/‖V‖, 1/m')`` — no gradient (m gets its gradient through the tail); with ``ahead`` (the vectors
    were formed ahead, :mod:`.prepass`) no norm and ``vec`` None.

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
    def forward(ctx, x, weight, lora_a, lora_b, magnitude, scaling: float, dropout_p: float, seed, weight_sq,
                eps: float, ahead: bool = False):
        ctx.set_materialize_grads(False)
        z, rest, mixed, gram, weight_sq = product_forward(x, weight, lora_a, lora_b, scaling, dropout_p, seed,
                                                          weight_sq, norm=not ahead)
        vec = None if ahead else dora_vectors(mixed, gram, lora_b, weight_sq, magnitude, scaling, eps)
        if vec is not None:
            ctx.mark_non_differentiable(vec)
        save_with_weight(ctx, weight, x, lora_a, lora_b)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return z, rest, vec

    @staticmethod
    def backward(ctx, dz, drest, _):
        weight, (x, lora_a, lora_b) = saved_with_weight(ctx)
        grads = product_backward(ctx, weight, x, lora_a, lora_b, as_rows(dz) if dz is not None else None,
                                 as_rows(drest) if drest is not None else None, tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None, None, None, None, None, None)


class DoraTailFunction(torch.autograd.Function):
    """``y = z + (g − 1)·z + b [+ rest]`` for the ``"z"`` route (a bias, fp16 or dropout: see the module
    docstring), z saved for ``dm = Σ dy ⊙ z / ‖V‖``; ``vec`` from :class:`DoraProductFunction` (no gradient).

    z ``[..., d_out]``, rest: the product's dropout term or None, magnitude ``[d_out]`` (any shape with d_out
    elements), bias ``[d_out]`` or None; ``ahead``: vec was formed ahead (:mod:`.prepass`), and the tail is one
    PyTorch op, ``g ⊙ z + b`` (:func:`~.compose.scale`), instead of a Triton launch. Backward returns ``dz = g·dy``
    (its own ``[N, d_out]`` buffer) and releases the saved z before the product's backward allocates dx, so the
    backward's transient peak is LoRA's. ``dm`` and the bias gradient come out of the backward pass's own reduction
    in fp32 (autograd casts them to the parameters' dtypes).

    Backward, with ``y = g ⊙ z + b (+ rest)``, ``g = m/‖V‖`` per output row and ‖V‖ a constant:
    ``dz = g ⊙ dy`` (``∂y/∂z = g``); ``dm = Σ_tokens dy ⊙ z / ‖V‖`` (``∂y/∂m = z/‖V‖``); ``db = Σ_tokens dy``,
    ``drest = dy`` (the dropout term is added unscaled) — all in one fused pass (:func:`~.compose.compose_backward`).
    """

    @staticmethod
    def forward(ctx, z, rest, magnitude, vec, bias, ahead: bool = False):
        y = scale(z, vec[1], bias) if ahead else compose_forward(z, vec[0], bias=bias, g=vec[1])[0]
        if rest is not None:
            y.add_(rest)
        y = distinct_when_traced(y)
        ctx.save_for_backward(vec, z)
        ctx.route, ctx.magnitude_shape, ctx.has_rest = "z", magnitude.shape, rest is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        dy2 = as_rows(dy)
        vec, kept = ctx.saved_tensors
        pre = kept.reshape(dy2.shape)
        del kept
        dz, grad_m, grad_bias = compose_backward(dy2, pre, vec[1], dy_sum=ctx.needs_input_grad[4], scale=vec[2])
        grad_m = grad_m.view(ctx.magnitude_shape) if ctx.needs_input_grad[2] else None
        grad_z = dz.view(dy.shape) if ctx.needs_input_grad[0] else None
        return grad_z, dy if ctx.has_rest else None, grad_m, None, grad_bias, None


def dora_linear(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                weight_sq: torch.Tensor | None = None, recompute: bool = False,
                vectors: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA on a Linear: :class:`DoraLinearFunction`, or for the ``"z"`` route :class:`DoraProductFunction` then
    :class:`DoraTailFunction`.

    ``weight`` ``[d_out, d_in]``: dense (any dtype; cast for each GEMM) or a quantised handle; ``bias`` in x's
    dtype; ``weight_sq``: cached ``‖W‖²_row`` (or None); ``recompute``: keep no ``[N, d_out]`` tensor. With
    ``dropout_p`` the result is PEFT's ``x Wᵀ + b + (g−1)·drop(x) Wᵀ + g·s·(drop(x) Aᵀ) Bᵀ``. What backward
    keeps is decided here, on the host (module docstring); nothing is read back from the device. ``vectors``: the
    layer's step vectors ``[4, d_out]`` for this call's dtype and floor (:func:`~.norm.floor_for`) when they were
    formed ahead (:mod:`.prepass`), or None.
    """
    seed = dropout_seed(dropout_p)
    keep = backward_route(x, weight, bias, lora_a, lora_b, magnitude, dropout_p, recompute)
    eps, vec = floor_for(bias, x.dtype), vectors  # (module docstring: the floor on every such route)
    if keep != "z":
        return DoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, seed,
                                        weight_sq, keep, eps, vec)
    z, rest, formed = DoraProductFunction.apply(x, weight, lora_a, lora_b, magnitude, scaling, dropout_p, seed,
                                                weight_sq, eps, vec is not None)
    return DoraTailFunction.apply(z, rest, magnitude, formed if vec is None else vec, bias, vec is not None)


def backward_route(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, magnitude: torch.Tensor, dropout_p: float, recompute: bool) -> str | None:
    """What the layer keeps for backward (its route: ``"output"``, ``"z"``, ``"recompute"``, None or ``"none"``), from
    what the host knows (no sync)."""
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
