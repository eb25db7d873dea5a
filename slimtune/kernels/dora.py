"""The DoRA training path without the dense product: factored row norm, the Linear Function, composition tail.

DoRA (Liu et al.) rescales each output row of the LoRA-updated weight ``V = W + s·B A``::

    y = g ⊙ z + b,   z = x Wᵀ + s·(x Aᵀ) Bᵀ,   g = m / ‖V‖_row   (‖V‖_row treated as a constant: no gradient)

Shapes: x ``[..., d_in]`` (N tokens), W ``[d_out, d_in]`` (frozen; a dense tensor or a 4-bit
:class:`~slimtune.quant.frozen.QuantizedWeight` handle), A ``[r, d_in]``, B ``[d_out, r]``, m / g / b ``[d_out]``.
The bias is added unscaled, as PEFT does.

* :func:`factored_row_norm_sq` gets ``‖V‖²_row = ‖W‖²_row + 2s·rowsum((W Aᵀ + (s/2)·B (A Aᵀ)) ⊙ B)`` from
  ``[d_out, r]`` / ``[r, r]`` intermediates: no ``[d_out, d_in]`` tensor is formed. On CUDA the bf16/fp16 GEMMs
  return fp32 (fp32 accumulation, no fp32 GEMM); ``A Aᵀ`` is split into two bf16 halves for ``B (A Aᵀ)``.
* The Linear layer is two autograd Functions. :class:`DoraProductFunction` queues the big GEMMs
  ``z = x Wᵀ + s·(x Aᵀ) Bᵀ`` first, then computes the norm (its small kernels launch while the GEMMs run), and
  saves what LoRA saves: x (the very input object), W itself (a 4-bit handle is kept on ctx instead and
  dequantised again in backward — no dense copy outlives its GEMM), A, B; never ``x Aᵀ``. :class:`DoraTailFunction`
  writes the fused tail ``y = z + (g − 1)·z + b`` over z. ``g − 1`` is formed as ``(m − ‖V‖) / ‖V‖`` in fp32,
  never as a rounded ``g`` minus one (no cancellation near g = 1, where DoRA's magnitudes live), and ``g = 1``
  gives back ``z`` bit for bit. Two Functions, so that what the tail saved is released (its backward returns
  ``dz``) before the product's backward allocates ``dx``: the backward's transient peak is LoRA's.

For ``dm = Σ_tokens dy ⊙ z / ‖V‖`` the tail saves its own **output** y (``ctx.save_for_backward(output)``: where
the next op saves y too — SiLU saves gate, the product saves up, attention saves v when it takes it as is — it
is stored once), from which ``z / ‖V‖ = (y − b) / m``; besides, ``[d_out]`` fp32 vectors (and the same x, W, A,
B objects, for the fallback below). Never z. Other modes: ``recompute=True`` (``dora_recompute``) saves no
``[N, d_out]`` tensor and recomputes z in backward (one more base GEMM); with dropout (training) z is saved
(``y`` then also holds ``(x − drop(x)) Wᵀ``, so it cannot give z back); a frozen magnitude needs neither.

**When y cannot stand in for z.** In y's dtype (unit roundoff u, smallest normal ``tiny``) each stored element
carries an error up to ``u·max(|g z + b|, tiny)``, so the recovered ``(y − b)/m`` is off by up to
``u·(|g z| + max(|b|, tiny))/|m|`` where storing z would give ``u·|g z|/|m|``: worse by the bias term, and
unbounded as ``g z`` underflows (m → 0: ``0 / 0``). Rule, per call: the forward tail also sums ``Σ_tokens |g z|``
per channel (free: it is in registers), and the output is used only if every channel has
``mean_tokens |g z| ≥ max(|b|, tiny)``. Then the recovered values' error, summed over tokens, is at most twice
what storing z would give (``u·Σ(|g z| + max(|b|, tiny)) ≤ 2u·Σ|g z|``). Otherwise — some ``|m|`` tiny or zero, a bias
dominating its channel's output — that call's backward recomputes z from x, W, A, B (saved anyway), exactly as
``recompute=True``: never a silently wrong gradient. The flag is copied to pinned host memory without a sync
and read in backward (waiting, at most, for this layer's forward to finish on the GPU).

The elementwise tail (forward ``y`` and the ``Σ|g z|`` sums; backward ``dz = g·dy``, the ``dm`` and bias column
sums, in one pass) runs as fused Triton kernels on CUDA (:mod:`slimtune.kernels.dora_triton`), else as the
plain-PyTorch references here. Convolutions (``DoraConv``) use :class:`DoraScaleFunction`, which keeps z.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from ..quant.frozen import WeightOperand, is_quantized, materialize
from .lora import choose_backward, dropout_keep_mask

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_NORM_CHUNK = 1 << 22  # elements of W upcast at a time for ‖W‖²_row
_MM_OUT_DTYPE: dict[torch.dtype, bool] = {}  # whether torch.mm(..., out_dtype=fp32) runs, per input dtype (CUDA)


# -- the factored norm ----------------------------------------------------------------------------------
def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def weight_row_norm_sq(weight2d: torch.Tensor) -> torch.Tensor:
    """``‖W‖²_row`` ``[d_out]`` in fp32 (fp64 for fp64 W), upcasting a few rows at a time (no fp32 copy of W)."""
    acc = accumulate_dtype(weight2d.dtype)
    rows = max(1, _NORM_CHUNK // max(1, weight2d.shape[1]))
    return torch.cat([chunk.to(acc).pow(2).sum(1) for chunk in weight2d.split(rows)])


def _fp32_out_gemm(t: torch.Tensor) -> bool:
    """Whether ``torch.mm(t, ·, out_dtype=torch.float32)`` is available: bf16/fp16 on CUDA (probed once)."""
    if not t.is_cuda or t.dtype not in (torch.float16, torch.bfloat16):
        return False
    if t.dtype not in _MM_OUT_DTYPE:
        try:
            probe = torch.ones(1, 1, device=t.device, dtype=t.dtype)
            _MM_OUT_DTYPE[t.dtype] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[t.dtype] = False
    return _MM_OUT_DTYPE[t.dtype]


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, small: bool) -> torch.Tensor:
    """``a @ b`` in ``acc``: a bf16/fp16 GEMM with fp32 output on CUDA; otherwise with the inputs upcast
    (``small`` operands) or in a's dtype, then upcast (large ones: no upcast copy of W)."""
    if a.dtype == acc:
        return a @ b.to(acc)
    if _fp32_out_gemm(a) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc) if small else (a @ b.to(a.dtype)).to(acc)


@torch.no_grad()
def factored_row_norm_sq(weight2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                         weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``‖W + s·B A‖²_row`` ``[d_out]``, fp32 (fp64 for fp64 W), clamped at 0; no ``[d_out, d_in]`` tensor.

    weight2d ``[d_out, d_in]`` (dense), lora_a ``[r, d_in]``, lora_b ``[d_out, r]``; ``weight_sq``: a cached
    ``‖W‖²_row``. ``W Aᵀ`` runs in W's dtype, ``A Aᵀ`` and ``B (A Aᵀ)`` in the factors' dtype, all with fp32
    accumulation and (on CUDA, bf16/fp16) fp32 outputs; ``A Aᵀ`` enters ``B (A Aᵀ)`` as the sum of two
    bf16/fp16 halves (~16 significant bits). Elsewhere the small products run in fp32.
    """
    acc = accumulate_dtype(weight2d.dtype)
    if weight_sq is None:
        weight_sq = weight_row_norm_sq(weight2d)
    mixed = _mm_acc(weight2d, lora_a.to(weight2d.dtype).t(), acc, small=False)  # W Aᵀ, [d_out, r]
    gram = _mm_acc(lora_a, lora_a.t(), acc, small=True)  # A Aᵀ, [r, r]
    half = scaling / 2
    if _fp32_out_gemm(lora_b):
        hi = gram.to(lora_b.dtype)
        lo = (gram - hi).to(lora_b.dtype)
        mixed.add_(torch.mm(lora_b, hi, out_dtype=acc), alpha=half)
        mixed.add_(torch.mm(lora_b, lo, out_dtype=acc), alpha=half)
    else:
        mixed.add_(lora_b.to(acc) @ gram, alpha=half)  # W Aᵀ + (s/2)·B (A Aᵀ)
    rowsum = mixed.mul_(lora_b).sum(1)
    return torch.add(weight_sq.to(acc), rowsum, alpha=2 * scaling).clamp_min_(0)


def dense_row_norm(weight2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + s·B A‖_row`` through the dense ``[d_out, d_in]`` sum: the reference for tests and benchmarks."""
    acc = accumulate_dtype(weight2d.dtype)
    return (weight2d.to(acc) + scaling * (lora_b.to(acc) @ lora_a.to(acc))).norm(dim=1)


def dora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA by its definition, through PyTorch's autograd: ``x (g·V)ᵀ + b`` with the dense V, norm detached."""
    v = weight + scaling * (lora_b @ lora_a)
    g = magnitude / v.norm(dim=1).detach()
    return F.linear(x, g[:, None] * v, bias)


# -- the composition tail: references --------------------------------------------------------------------
def _channel_view(vec: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``[C]`` -> broadcastable against ``like`` along ``dim``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return vec.view(shape)


def _other_dims(t: torch.Tensor, dim: int) -> list[int]:
    return [d for d in range(t.dim()) if d != dim % t.dim()]


def _scaled_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None, scaling: float,
                      dim: int) -> torch.Tensor:
    """``v = base + (g−1)·base + g·s·lora`` in fp32 (fp64 for fp64)."""
    acc = accumulate_dtype(base.dtype)
    gm1 = _channel_view(gm1.to(acc), base, dim)
    b = base.to(acc)
    v = b + gm1 * b
    return v if lora is None else v + (1 + gm1) * scaling * lora.to(acc)


def compose_forward_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None,
                              scaling: float = 1.0, bias: torch.Tensor | None = None,
                              dim: int = -1) -> torch.Tensor:
    """``base + (g−1)·base + g·s·lora + b`` in fp32 (fp64 for fp64), returned in base's dtype.

    base / lora ``[..., C, ...]`` with the channel axis ``dim``; gm1 (``g − 1``), bias ``[C]``.
    """
    v = _scaled_reference(base, gm1, lora, scaling, dim)
    if bias is not None:
        v = v + _channel_view(bias.to(v.dtype), base, dim)
    return v.to(base.dtype)


def compose_stats_reference(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None,
                            scaling: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``Σ |base + (g−1)·base + g·s·lora|`` over all but the channel axis, ``[C]`` fp32 (fp64 for fp64)."""
    return _scaled_reference(base, gm1, lora, scaling, dim).abs().sum(_other_dims(base, dim))


def compose_backward_reference(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor,
                               lora: torch.Tensor | None = None, scaling: float = 1.0, dim: int = -1,
                               shift: torch.Tensor | None = None, dy_sum: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dbase, pre_sum, dy_sum)``: ``dbase = g·dy`` in base's dtype (``dlora = s·dbase``), the fp32 channel
    sums ``Σ dy ⊙ (base + s·lora − shift)`` ``[C]`` (``dm = pre_sum / ‖V‖``; with base = the output y and
    shift = b, ``dm = pre_sum / m``) and, with ``dy_sum``, ``Σ dy`` ``[C]`` (the bias gradient), else None."""
    acc = accumulate_dtype(base.dtype)
    dy = dy.to(acc)
    pre = base.to(acc) if lora is None else base.to(acc) + scaling * lora.to(acc)
    if shift is not None:
        pre = pre - _channel_view(shift.to(acc), base, dim)
    dims = _other_dims(base, dim)
    dbase = (dy * _channel_view(g.to(acc), base, dim)).to(base.dtype)
    return dbase, (dy * pre).sum(dims), (dy.sum(dims) if dy_sum else None)


# -- dispatch ---------------------------------------------------------------------------------------------
def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors in fp32/fp16/bf16; on the CPU only under ``TRITON_INTERPRET=1`` (tests)."""
    if not _HAS_TRITON or t.dtype not in _TRITON_DTYPES:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _fused(t: torch.Tensor, dim: int) -> bool:
    return dim % t.dim() == t.dim() - 1 and t.is_contiguous() and use_triton(t)


def compose_forward(base: torch.Tensor, gm1: torch.Tensor, lora: torch.Tensor | None = None, scaling: float = 1.0,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None, dim: int = -1,
                    stats: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, sums)``: :func:`compose_forward_reference` (``out`` may be ``base`` itself) and, with ``stats``,
    :func:`compose_stats_reference` (else None) — one fused pass on the GPU."""
    if _fused(base, dim):
        from . import dora_triton

        return dora_triton.compose_forward(base, gm1, lora, scaling, bias, out, stats)
    sums = compose_stats_reference(base, gm1, lora, scaling, dim) if stats else None
    result = compose_forward_reference(base, gm1, lora, scaling, bias, dim)
    return (out.copy_(result) if out is not None else result), sums


def compose_backward(dy: torch.Tensor, base: torch.Tensor, g: torch.Tensor, lora: torch.Tensor | None = None,
                     scaling: float = 1.0, dbase_out: torch.Tensor | None = None, dim: int = -1,
                     shift: torch.Tensor | None = None, dy_sum: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`compose_backward_reference` in one fused pass on the GPU; ``dbase_out`` may be ``base`` itself."""
    if _fused(base, dim):
        from . import dora_triton

        return dora_triton.compose_backward(dy, base, g, lora, scaling, dbase_out, shift, dy_sum)
    dbase, pre_sum, dys = compose_backward_reference(dy, base, g, lora, scaling, dim, shift, dy_sum)
    return (dbase_out.copy_(dbase) if dbase_out is not None else dbase), pre_sum, dys


# -- the scale Function (convolutions) ----------------------------------------------------------------------
class DoraScaleFunction(torch.autograd.Function):
    """``out = z + (g − 1)·z + b`` along channel axis ``dim``, ``g = m / norm``, norm constant.

    z ``[..., C, ...]``; magnitude: C elements (any shape, e.g. PEFT's ``[1, C, 1, 1]`` for convolutions);
    norm ``[C]`` fp32, no grad; bias ``[C]`` or None. Saves z and the ``[C]`` fp32 vectors norm and g − 1;
    backward: ``dz = g·dy``, ``dm = Σ dy ⊙ z / norm`` (one fused pass), ``db = Σ dy``.
    """

    @staticmethod
    def forward(ctx, z, magnitude, norm, bias, dim: int):
        m = magnitude.detach().reshape(-1).to(norm.dtype)
        gm1 = (m - norm) / norm
        out, _ = compose_forward(z, gm1, bias=bias, dim=dim)
        ctx.save_for_backward(z, norm, gm1)
        ctx.dim, ctx.has_bias = dim, bias is not None
        ctx.magnitude_shape, ctx.magnitude_dtype = magnitude.shape, magnitude.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        z, norm, gm1 = ctx.saved_tensors
        need_z, need_m, _, need_bias = ctx.needs_input_grad[:4]
        grad_z = grad_m = grad_bias = None
        if need_z or need_m:
            dz, dm_sum, _ = compose_backward(dy, z, gm1 + 1, dim=ctx.dim)
            grad_z = dz if need_z else None
            if need_m:
                grad_m = (dm_sum / norm).to(ctx.magnitude_dtype).view(ctx.magnitude_shape)
        if need_bias and ctx.has_bias:
            grad_bias = dy.sum(_other_dims(dy, ctx.dim))
        return grad_z, grad_m, None, grad_bias, None


def dora_scale(z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None,
               dim: int = -1) -> torch.Tensor:
    """Apply :class:`DoraScaleFunction`; without autograd the tail runs in place in z (a fresh tensor)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, magnitude, bias)):
        return DoraScaleFunction.apply(z, magnitude, norm, bias, dim)
    gm1 = (magnitude.detach().reshape(-1).to(norm.dtype) - norm) / norm
    return compose_forward(z, gm1, bias=bias, out=z, dim=dim)[0]


# -- the Linear Functions -------------------------------------------------------------------------------------
class _HostFlag:
    """A device bool for the host to read later: copied to pinned memory without a sync; reading it waits only
    for the work queued before the copy (this layer's forward), not for the whole stream."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.event = None
        if flag.is_cuda:
            self.value = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.value.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = flag

    def __bool__(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.value)


def output_unusable(sums: torch.Tensor, bias: torch.Tensor | None, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The rule of the module docstring, as a device bool: some channel has ``mean |g z| < max(|b|, tiny)``.

    sums: ``Σ_tokens |g z|`` ``[d_out]`` fp32; bias ``[d_out]`` or None; dtype: the output's dtype."""
    tiny = torch.finfo(dtype).tiny
    floor = bias.detach().float().abs().clamp_min_(tiny) if bias is not None else tiny
    return (sums < floor * tokens).any()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s`` in place, skipped for s = 1 (alpha = r, the common case)."""
    return t if s == 1.0 else t.mul_(s)


def _saved(ctx) -> dict[str, torch.Tensor]:
    return dict(zip(ctx.names, ctx.saved_tensors))


def _save(ctx, weight: WeightOperand, **tensors: torch.Tensor | None) -> None:
    """Save ``tensors`` (None skipped) and the weight: a dense one with them, a quantised handle on ctx."""
    if not is_quantized(weight):
        tensors["w"] = weight
    tensors = {k: v for k, v in tensors.items() if v is not None}
    ctx.names = tuple(tensors)
    ctx.save_for_backward(*tensors.values())
    ctx.weight = weight if is_quantized(weight) else None


def _weight(ctx, t: dict[str, torch.Tensor]) -> WeightOperand:
    return ctx.weight if ctx.weight is not None else t["w"]


def _product(xd: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
             lead: tuple[int, ...]) -> torch.Tensor:
    """``z = xd Wᵀ + s·(xd Aᵀ) Bᵀ`` ``[*lead, d_out]`` (not a view) from the 2-D ``xd``; all in xd's dtype."""
    z = F.linear(xd.view(*lead, xd.shape[-1]), w)
    z.view(-1, z.shape[-1]).addmm_(xd @ a.t(), b.t(), alpha=scaling)
    return z


class DoraProductFunction(torch.autograd.Function):
    """``(z, rest, ‖V‖)``: ``z = drop(x) Wᵀ + s·(drop(x) Aᵀ) Bᵀ`` ``[..., d_out]``, ``rest = (x − drop(x)) Wᵀ``
    (dropout only, else None) and the row norm ``‖W + s·B A‖`` ``[d_out]`` fp32 (no gradient).

    x ``[..., d_in]``; weight ``[d_out, d_in]`` dense (any dtype; cast per GEMM) or a quantised handle
    (dequantised once in forward — base GEMM and ``W Aᵀ`` — and once in backward for dx); lora_a / lora_b in
    any float dtype (cast to x's for the GEMMs, gradients in theirs); weight_sq: cached ``‖W‖²_row`` or None.
    The norm is computed after the base GEMM is queued (its small kernels launch while the GEMM runs). Saves x,
    W (or keeps the handle), A, B; the dropout mask is redrawn in backward from ``seed``.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float, dropout_p: float, seed: int, weight_sq,
                save: bool):
        ctx.set_materialize_grads(False)
        dtype, lead, d_in = x.dtype, tuple(x.shape[:-1]), x.shape[-1]
        x2 = x.reshape(-1, d_in)
        a, b = _cast(lora_a, dtype), _cast(lora_b, dtype)
        mask = dropout_keep_mask(x2, dropout_p, seed) if dropout_p > 0 else None
        xd = x2 * mask if mask is not None else x2
        w = materialize(weight, dtype)
        z = _product(xd, w, a, b, scaling, lead)
        norm = factored_row_norm_sq(w, a, b, scaling, weight_sq).sqrt_()
        rest = F.linear((x2 - xd).view(*lead, d_in), w) if mask is not None else None
        del w
        ctx.mark_non_differentiable(norm)
        if save:
            _save(ctx, weight, x=x, a=lora_a, b=lora_b)
            ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return z, rest, norm

    @staticmethod
    def backward(ctx, dz, drest, _):
        t = _saved(ctx)
        x, lora_a, lora_b = t["x"], t["a"], t["b"]
        weight = _weight(ctx, t)
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        s, dtype = ctx.scaling, x.dtype
        a, b = _cast(lora_a, dtype), _cast(lora_b, dtype)
        x2 = x.reshape(-1, x.shape[-1])
        mask = dropout_keep_mask(x2, ctx.dropout_p, ctx.seed) if ctx.dropout_p > 0 else None
        xd = x2 * mask if mask is not None else x2
        grad_x = grad_w = grad_a = grad_b = None
        if dz is None:  # only rest got a gradient
            dz2 = torch.zeros(x2.shape[0], b.shape[0], dtype=dtype, device=x.device)
        else:
            dz2 = _cast(dz.reshape(-1, dz.shape[-1]), dtype)
        drest2 = _cast(drest.reshape(-1, drest.shape[-1]), dtype) if drest is not None else None
        dya = _scaled(dz2 @ b, s) if (need_a or need_x) else None  # s·dz B, [N, r]
        if need_a or need_b:
            tokens, d_in = x2.shape
            if choose_backward(tokens, d_in, dz2.shape[1], a.shape[0]) == "gram":
                gram = dz2.t() @ xd  # [d_out, d_in]
                grad_b = _scaled(gram @ a.t(), s) if need_b else None
                grad_a = _scaled(b.t() @ gram, s) if need_a else None
                del gram
            else:
                grad_b = _scaled(dz2.t() @ (xd @ a.t()), s) if need_b else None
                grad_a = dya.t() @ xd if need_a else None
            grad_a = _cast(grad_a, lora_a.dtype) if grad_a is not None else None
            grad_b = _cast(grad_b, lora_b.dtype) if grad_b is not None else None
        if need_x:
            w = materialize(weight, dtype)
            grad_x2 = (dz2 @ w).addmm_(dya, a)
            if mask is not None:  # mask ⊙ (dz W + dya A) + (1 − mask) ⊙ drest W
                if drest2 is not None:
                    rest = drest2 @ w
                    grad_x2.sub_(rest).mul_(mask).add_(rest)
                else:
                    grad_x2.mul_(mask)
            del w
            grad_x = grad_x2.view(x.shape)
        if need_w and ctx.weight is None:
            grad_w = dz2.t() @ xd
            if mask is not None and drest2 is not None:
                grad_w.addmm_(drest2.t(), x2 - xd)
            grad_w = _cast(grad_w, t["w"].dtype)
        return grad_x, grad_w, grad_a, grad_b, None, None, None, None, None


class DoraTailFunction(torch.autograd.Function):
    """``y = z + (g − 1)·z + b [+ rest]``, ``g = m / ‖V‖`` (norm constant), written over z where it can be.

    z ``[..., d_out]`` (from :class:`DoraProductFunction`), rest: its dropout term or None, magnitude ``[d_out]``,
    norm ``[d_out]`` fp32, bias ``[d_out]`` or None. keep — what backward gets ``dm = Σ dy ⊙ z / ‖V‖`` from:
    ``"output"`` (y itself, saved as the output: ``z / ‖V‖ = (y − b) / m``, guarded by the rule of the module
    docstring), ``"z"`` (z saved; dropout), ``"recompute"`` (z rebuilt from x, W, A, B), None (no dm: frozen
    magnitude), ``"none"`` (no backward). x, weight, lora_a, lora_b, scaling, dropout_p, seed: the product's
    inputs, kept (the same objects the product saves) to rebuild z; they get no gradient here.
    Backward returns ``dz = g·dy`` (its own ``[N, d_out]`` buffer) and releases what it saved before the
    product's backward allocates dx, so the backward's transient peak is LoRA's.
    """

    @staticmethod
    def forward(ctx, z, rest, magnitude, norm, bias, keep: str | None, x, weight, lora_a, lora_b, scaling: float,
                dropout_p: float, seed: int):
        m = magnitude.detach().reshape(-1).to(norm.dtype)
        gm1 = (m - norm) / norm
        if keep == "z":
            y, _ = compose_forward(z, gm1, bias=bias)
        else:
            y, sums = compose_forward(z, gm1, bias=bias, out=z, stats=keep == "output")
            ctx.mark_dirty(z)
            if keep == "output":
                ctx.unusable = _HostFlag(output_unusable(sums, bias, y.numel() // max(1, y.shape[-1]), y.dtype))
        if rest is not None:
            y.add_(rest)
        if keep != "none":
            g = gm1 + 1
            if keep == "output":
                _save(ctx, weight, y=y, m=m, g=g, norm=norm, bias=bias, x=x, a=lora_a, b=lora_b)
            elif keep == "z":
                _save(ctx, weight, z=z, g=g, norm=norm)
            elif keep == "recompute":
                _save(ctx, weight, g=g, norm=norm, x=x, a=lora_a, b=lora_b)
            else:
                _save(ctx, weight, g=g)
            ctx.keep, ctx.scaling, ctx.dropout_p, ctx.seed = keep, scaling, dropout_p, seed
            ctx.magnitude_shape, ctx.magnitude_dtype = magnitude.shape, magnitude.dtype
            ctx.has_rest = rest is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        t = _saved(ctx)
        keep = ctx.keep
        if keep == "output" and bool(ctx.unusable):
            keep = "recompute"
        dy2 = dy.reshape(-1, dy.shape[-1])
        shift, divisor, inplace = None, t.get("norm"), False
        if keep == "output":
            pre, shift, divisor = t["y"].view(dy2.shape), t.get("bias"), t["m"]
        elif keep == "z":
            pre = t["z"].reshape(dy2.shape)
        elif keep == "recompute":
            x = t["x"]
            dtype = x.dtype
            x2 = x.reshape(-1, x.shape[-1])
            xd = x2 * dropout_keep_mask(x2, ctx.dropout_p, ctx.seed) if ctx.dropout_p > 0 else x2
            w = materialize(_weight(ctx, t), dtype)
            pre = _product(xd, w, _cast(t["a"], dtype), _cast(t["b"], dtype), ctx.scaling, (x2.shape[0],))
            del w, xd
            inplace = True  # z again, overwritten by dz
        else:  # frozen magnitude: g·dy (and the bias sum) only
            pre = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        need_z, _, need_m, _, need_bias = ctx.needs_input_grad[:5]
        dz, pre_sum, dy_sum = compose_backward(dy2, pre, t["g"], dbase_out=pre if inplace else None, shift=shift,
                                               dy_sum=bool(need_bias))
        grad_m = (pre_sum / divisor).to(ctx.magnitude_dtype).view(ctx.magnitude_shape) if need_m and keep else None
        grad_bias = dy_sum.to(dy.dtype) if dy_sum is not None else None
        grad_z = dz.view(dy.shape) if need_z else None
        grad_rest = dy if ctx.has_rest else None
        return grad_z, grad_rest, grad_m, None, grad_bias, None, None, None, None, None, None, None, None


def dora_linear(x: torch.Tensor, weight: WeightOperand, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                weight_sq: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
    """DoRA on a Linear: :class:`DoraProductFunction` then :class:`DoraTailFunction`.

    ``weight`` ``[d_out, d_in]``: dense (any dtype; cast for each GEMM) or a quantised handle; ``bias`` in x's
    dtype; ``weight_sq``: cached ``‖W‖²_row`` (or None); ``recompute``: keep no ``[N, d_out]`` tensor. With
    ``dropout_p`` the result is PEFT's ``x Wᵀ + b + (g−1)·drop(x) Wᵀ + g·s·(drop(x) Aᵀ) Bᵀ``.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    inputs = (x, weight, bias, lora_a, lora_b, magnitude)
    keep: str | None
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)):
        keep = "none"
    elif not magnitude.requires_grad:
        keep = None
    else:
        keep = "recompute" if recompute else ("z" if dropout_p > 0 else "output")
    z, rest, norm = DoraProductFunction.apply(x, weight, lora_a, lora_b, scaling, dropout_p, seed, weight_sq,
                                              keep != "none")
    return DoraTailFunction.apply(z, rest, magnitude, norm, bias, keep, x, weight, lora_a, lora_b, scaling,
                                  dropout_p, seed)
