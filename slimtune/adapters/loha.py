"""LoHa (FedPara's low-rank Hadamard product, as in LyCORIS / PEFT): ``ΔW = s · (w1a w1b) ⊙ (w2a w2b)``.

PEFT's parameters, so checkpoints move both ways (``s = alpha / r``):

* Linear: ``hada_w1_a``, ``hada_w2_a`` ``[d_out, r]``; ``hada_w1_b``, ``hada_w2_b`` ``[r, d_in]``.
* Conv1d / Conv2d: the same with ``d_in = c_in/groups · kernel`` (the kernel flattened into the columns).
* Conv with ``use_effective_conv2d`` (kernel > 1), the Tucker form: ``hada_t1``, ``hada_t2`` ``[r, r, kh, kw]``
  (Conv1d ``[r, r, k, 1]``), ``hada_w*_a`` ``[r, c_out]``, ``hada_w*_b`` ``[r, c_in/groups]``, and
  ``W_i[p, q, ·] = Σ_jk t_i[j, k, ·] w_i_a[j, p] w_i_b[k, q]``.

**Structured path.** With ``⊙̂`` the row-wise Kronecker (face-splitting) product, ``ΔW = U D`` exactly, where
``U = s · (w1a ⊙̂ w2a)`` ``[d_out, r²]`` and ``D = (w1bᵀ ⊙̂ w2bᵀ)ᵀ`` ``[r², d_in]`` (row ``(a, b)`` of ``D`` is
``w1b[a] * w2b[b]``). So ``x ΔWᵀ = (x Dᵀ) Uᵀ``: LoRA at rank ``r²`` with computed factors
(:class:`LohaLinearOp` in :class:`~slimtune.kernels.structured.StructuredFunction`, which rebuilds ``D``/``U`` in
backward rather than saving them, and maps ``dD``/``dU`` to the factors with explicit formulas). On a convolution
(groups 1) ``D`` is a down convolution with the base's geometry and ``U`` a 1x1 up; the Tucker form adds a core
``C[(i,i'), (j,j'), ·] = t1[i, j, ·] t2[i', j', ·]`` between a 1x1 down and a 1x1 up. **Folded path**: ``W + ΔW``
formed transiently, one GEMM/convolution, rebuilt in backward — on the GPU by fused Triton kernels
(:mod:`slimtune.kernels.loha_triton`: one pass forward; in backward one kernel writes ``W + ΔW`` and the four
factor gradients from ``dyᵀx``; on a dense frozen Linear the whole layer is one Function over them,
:class:`~slimtune.kernels.loha_triton.FusedLohaLinear`), elsewhere with PyTorch ops (``addcmul``; also the kernels'
reference). No backward runs autograd.
The structured path costs like LoRA at rank ``r²``; :func:`~slimtune.kernels.structured.choose_path` takes the
folded one where that is cheaper (large ``r²`` against the layer's width, few tokens).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, resolve_adapter_dtype
from ..errors import ConfigError, TargetError
from ..kernels import structured as S
from ..kernels.dispatch import use_triton
from ..kernels.lora import choose_backward
from ..quant.frozen import base_weight_operand, is_quantized, weight_dtype, weight_shape
from ..targeting import is_hf_conv1d
from .base import AdapterModule
from .lora import compute_setting

PATH_CHOICES = ("auto", "structured", "folded")
_DENSE_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # exact types: never a 4-bit layer
Scale = float | torch.Tensor  # s, or s · rank-dropout mask over output rows ([d_out])


# -- the math ---------------------------------------------------------------------------------------
tucker_weight = S.tucker_weight  # re-exported: LoKr's Tucker w2 and the tests use it from here


def loha_delta_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                      t1: torch.Tensor | None, t2: torch.Tensor | None, scaling: float,
                      shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The dense ``s · W1 ⊙ W2`` in the base weight's ``shape``, float32 or wider. Merge and tests only."""
    dtype = torch.promote_types(w1a.dtype, torch.float32)
    w1a, w1b, w2a, w2b = (t.to(dtype) for t in (w1a, w1b, w2a, w2b))
    if t1 is not None:
        w1, w2 = tucker_weight(t1.to(dtype), w1a, w1b), tucker_weight(t2.to(dtype), w2a, w2b)
    else:
        w1, w2 = w1a @ w1b, w2a @ w2b
    return (w1 * w2 * scaling).reshape(shape)


def core_kr(t1: torch.Tensor, t2: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """The Tucker core ``C[(i, i'), (j, j'), ·] = t1[i, j, ·] t2[i', j', ·]``: ``[r², r², *kernel]``."""
    r = t1.shape[0]
    a, b = t1.reshape(r, r, -1), t2.reshape(r, r, -1)
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(r * r, r * r, *kernel)


def core_kr_grad(g: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, need_1: bool, need_2: bool
                 ) -> tuple[S.Grad, S.Grad]:
    """``(dt1, dt2)`` of :func:`core_kr` for ``g`` ``[r², r², *kernel]``."""
    r = t1.shape[0]
    a, b = t1.reshape(r, r, -1), t2.reshape(r, r, -1)
    g5 = g.reshape(r, r, r, r, -1)  # [i, i', j, j', k]
    d1 = (g5 * b[None, :, None, :]).sum((1, 3)).reshape(t1.shape) if need_1 else None
    d2 = (g5 * a[:, None, :, None]).sum((0, 2)).reshape(t2.shape) if need_2 else None
    return d1, d2


class LohaLinearOp(S.StructuredOp):
    """LoHa on a Linear: LoRA at rank ``R = r²`` with computed factors ``D = w1b ⊙̂ w2b`` ``[R, d_in]`` (rows)
    and ``U = (s·w1a) ⊙̂ w2a`` ``[d_out, R]`` (columns); ``U D = s · (w1a w1b) ⊙ (w2a w2b)``.

    Forward: ``y += (x Dᵀ) Uᵀ`` (2 GEMMs). Backward: ``g = dy U``, ``dx += g D``, ``dU = dyᵀ (x Dᵀ)``,
    ``dD = gᵀ x`` (or both from the Gram matrix ``dyᵀx`` when :func:`~slimtune.kernels.lora.choose_backward` says
    so), then the factor gradients of the two face-splitting products. ``scale``: ``s``, or ``s · mask`` ``[d_out]``.
    """

    def add_delta(self, y, x, params, scale):
        w1a, w1b, w2a, w2b = params
        down, up = S.rows_kr(w1b, w2b), S.cols_kr(S.scale_rows(w1a, scale, 0), w2a)
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        y2.addmm_(F.linear(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), down), up.t())
        return y

    def delta_backward(self, dy, x, params, scale, grad_x, need):
        w1a, w1b, w2a, w2b = params
        w1a_s = S.scale_rows(w1a, scale, 0)
        down, up = S.rows_kr(w1b, w2b), S.cols_kr(w1a_s, w2a)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        need_up, need_down = need[0] or need[2], need[1] or need[3]
        g = torch.mm(dy2, up) if grad_x is not None or need_down else None  # [N, R]
        if grad_x is not None:
            (grad_x if grad_x.dim() == 2 else grad_x.view(-1, x2.shape[1])).addmm_(g, down)
        d_up = d_down = None
        if need_up or need_down:
            if choose_backward(x2.shape[0], x2.shape[1], dy2.shape[1], down.shape[0]) == "gram":
                gram = torch.mm(dy2.t(), x2)
                d_up = F.linear(gram, down) if need_up else None
                d_down = torch.mm(up.t(), gram) if need_down else None
                del gram
            else:
                d_up = torch.mm(dy2.t(), F.linear(x2, down)) if need_up else None
                d_down = torch.mm(g.t(), x2) if need_down else None
        grads: list[S.Grad] = [None] * 4
        if need_up:
            da, grads[2] = S.cols_kr_grad(d_up, w1a_s, w2a, need[0], need[2])
            grads[0] = None if da is None else S.scale_rows(da, scale, 0)
        if need_down:
            grads[1], grads[3] = S.rows_kr_grad(d_down, w1b, w2b, need[1], need[3])
        return grads


class LohaConvOp(S.StructuredOp):
    """LoHa on a convolution (groups 1): ``D`` (the LoRA form's rows, reshaped ``[R, c_in, *k]``) is a down
    convolution with the base geometry, ``U`` ``[c_out, R]`` a 1x1 up (a batched GEMM added into y)."""

    def __init__(self, conv: S.ConvSpec, kernel: tuple[int, ...]) -> None:
        self.conv, self.kernel = conv, kernel

    def _factors(self, params: S.Params, scale: Scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w1a, w1b, w2a, w2b = params
        w1a_s = S.scale_rows(w1a, scale, 0)
        down = S.rows_kr(w1b, w2b)
        return w1a_s, down.view(down.shape[0], -1, *self.kernel), S.cols_kr(w1a_s, w2a)

    def add_delta(self, y, x, params, scale):
        _, down, up = self._factors(params, scale)
        return S.add_mix_(y, self.conv.conv(x, down, groups=1), up)

    def delta_backward(self, dy, x, params, scale, grad_x, need):
        _, w1b, w2a, w2b = params
        w1a_s, down, up = self._factors(params, scale)
        need_up, need_down, need_dx = need[0] or need[2], need[1] or need[3], grad_x is not None
        h = self.conv.conv(x, down, groups=1) if need_up else None
        dh, d_up = S.mix_backward(dy, h, up, need_dx or need_down, need_up)
        del h
        grads: list[S.Grad] = [None] * 4
        if need_dx or need_down:
            dx, d_down = S.base_backward(dh, x, down, self.conv, need_dx, need_down, groups=1)
            if dx is not None:
                grad_x.add_(dx)
            if need_down:
                grads[1], grads[3] = S.rows_kr_grad(d_down, w1b, w2b, need[1], need[3])
        if need_up:
            da, grads[2] = S.cols_kr_grad(d_up, w1a_s, w2a, need[0], need[2])
            grads[0] = None if da is None else S.scale_rows(da, scale, 0)
        return grads


class LohaTuckerOp(S.StructuredOp):
    """Tucker LoHa on a convolution (groups 1): a 1x1 down to ``R = r²`` channels (``D = w1b ⊙̂ w2b``
    ``[R, c_in]``), the core ``[R, R, *k]`` (:func:`core_kr`) with the base geometry, a 1x1 up
    (``Uᵀ = (s·w1a) ⊙̂ w2a`` ``[R, c_out]``, rows)."""

    def __init__(self, conv: S.ConvSpec, kernel: tuple[int, ...]) -> None:
        self.conv, self.kernel = conv, kernel

    def _factors(self, params: S.Params, scale: Scale) -> tuple[torch.Tensor, ...]:
        t1, w1a, w1b, t2, w2a, w2b = params
        w1a_s = S.scale_rows(w1a, scale, 1)
        return w1a_s, S.rows_kr(w1b, w2b), core_kr(t1, t2, self.kernel), S.rows_kr(w1a_s, w2a).t()

    def add_delta(self, y, x, params, scale):
        _, down, core, up = self._factors(params, scale)
        return S.add_mix_(y, self.conv.conv(S.mix(x, down), core, groups=1), up)

    def delta_backward(self, dy, x, params, scale, grad_x, need):
        t1, _, w1b, t2, w2a, w2b = params
        w1a_s, down, core, up = self._factors(params, scale)
        need_dx = grad_x is not None
        need_up, need_core, need_down = need[1] or need[4], need[0] or need[3], need[2] or need[5]
        need_dh1 = need_dx or need_down
        h1 = S.mix(x, down) if need_up or need_core or need_dh1 else None
        h2 = self.conv.conv(h1, core, groups=1) if need_up else None
        dh2, d_up = S.mix_backward(dy, h2, up, need_dh1 or need_core, need_up, w_transposed=True)
        del h2
        grads: list[S.Grad] = [None] * 6
        if need_dh1 or need_core:
            dh1, d_core = S.base_backward(dh2, h1, core, self.conv, need_dh1, need_core, groups=1)
            del dh2, h1
            if need_core:
                grads[0], grads[3] = core_kr_grad(d_core, t1, t2, need[0], need[3])
            if need_dh1:
                dx, d_down = S.mix_backward(dh1, x, down, need_dx, need_down)
                if dx is not None:
                    grad_x.add_(dx)
                if need_down:
                    grads[2], grads[5] = S.rows_kr_grad(d_down, w1b, w2b, need[2], need[5])
        if need_up:
            da, grads[4] = S.rows_kr_grad(d_up, w1a_s, w2a, need[1], need[4])
            grads[1] = None if da is None else S.scale_rows(da, scale, 1)
        return grads


class LohaFoldOp(S.FoldOp):
    """``W + W1 ⊙ W2`` with ``W1 = (s·w1a) w1b``, ``W2 = w2a w2b`` (Tucker: :func:`tucker_weight`); backward:
    ``dW1 = g ⊙ W2``, ``dW2 = g ⊙ W1`` and the low-rank / Tucker products' gradients.

    On the GPU (non-Tucker, rank ≤ :data:`slimtune.kernels.loha_triton.MAX_RANK`) both run as one fused Triton
    kernel each (:mod:`slimtune.kernels.loha_triton`: no dense ``W1`` / ``W2`` / ``g ⊙ W2``); the PyTorch code
    below is their reference and the path everywhere else."""

    def __init__(self, conv: S.ConvSpec | None, tucker: bool, rank: int) -> None:
        self.conv, self.tucker, self.rank = conv, tucker, rank
        self._kernel_ok: bool | None = None  # Tucker off and the rank within the kernels' limit; set on first use

    def fused(self, w: torch.Tensor) -> bool:
        """Whether :meth:`fold` / :meth:`fold_backward` take the Triton kernels for a weight like ``w``."""
        if not use_triton(w):
            return False
        if self._kernel_ok is None:
            from ..kernels import loha_triton  # importable: use_triton found triton

            self._kernel_ok = not self.tucker and self.rank <= loha_triton.MAX_RANK
        return self._kernel_ok

    @staticmethod
    def _rows(w: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W as [c_out, rest], the buffer W + ΔW may be written into or None)``: in place only into W itself."""
        w2d = w.reshape(w.shape[0], -1)
        return w2d, (w2d if inplace and w2d.is_contiguous() and w2d.data_ptr() == w.data_ptr() else None)

    def fold(self, w, params, scale, inplace):
        if self.fused(w):
            from ..kernels import loha_triton

            w2d, out = self._rows(w, inplace)
            return loha_triton.fold(w2d, *params, scale, out=out).view(w.shape), ()
        if self.tucker:
            t1, w1a, w1b, t2, w2a, w2b = params
            w1a_s = S.scale_rows(w1a, scale, 1)
            w1, w2 = tucker_weight(t1, w1a_s, w1b), tucker_weight(t2, w2a, w2b)
        else:
            w1a, w1b, w2a, w2b = params
            w1a_s = S.scale_rows(w1a, scale, 0)
            w1, w2 = w1a_s @ w1b, w2a @ w2b
        w1, w2 = w1.reshape(w.shape), w2.reshape(w.shape)
        return (w.addcmul_(w1, w2) if inplace else torch.addcmul(w, w1, w2)), (w1a_s, w1, w2)

    def fused_backward(self, w, params, scale, dy, x, need_x, need, inplace):
        """On the GPU: ``G = dyᵀx`` (the base's weight gradient), then one kernel for ``W'`` and the four factor
        gradients, then ``dx = dy W'``: three launches."""
        if not self.fused(w):
            return None
        from ..kernels import loha_triton

        _, g = S.base_backward(dy, x, w, self.conv, False, True)
        w2d, out = self._rows(w, inplace and need_x)
        *grads, w_eff = loha_triton.fold_grads(g.reshape(g.shape[0], -1), *params, scale,
                                               w=w2d if need_x else None, out=out)
        del g
        grad_x = S.base_backward(dy, x, w_eff.view(w.shape), self.conv, True, False)[0] if need_x else None
        return grad_x, [grad if wanted else None for grad, wanted in zip(grads, need)]

    def fold_backward(self, g, params, parts, scale, need):
        if not parts:  # the fused fold
            from ..kernels import loha_triton

            grads = loha_triton.fold_grads(g.reshape(g.shape[0], -1), *params, scale)[:4]
            return [grad if wanted else None for grad, wanted in zip(grads, need)]
        w1a_s, w1, w2 = parts
        if self.tucker:
            t1, _, w1b, t2, w2a, w2b = params
            n1, n2 = need[:3], need[3:]
            grads1 = S.tucker_grad(g * w2, t1, w1a_s, w1b, n1) if any(n1) else (None,) * 3
            grads2 = S.tucker_grad(g * w1, t2, w2a, w2b, n2) if any(n2) else (None,) * 3
            dt1, da, dw1b = grads1
            return [dt1, None if da is None else S.scale_rows(da, scale, 1), dw1b, *grads2]
        _, w1b, w2a, w2b = params
        rows = w1a_s.shape[0]
        da, dw1b = (S.lowrank_grad((g * w2).reshape(rows, -1), w1a_s, w1b, need[0], need[1]) if need[0] or need[1]
                    else (None, None))
        dw2a, dw2b = (S.lowrank_grad((g * w1).reshape(rows, -1), w2a, w2b, need[2], need[3]) if need[2] or need[3]
                      else (None, None))
        return [None if da is None else S.scale_rows(da, scale, 0), dw1b, dw2a, dw2b]


def rank_dropout_mask(d_out: int, p: float, normalize: bool, device: torch.device, dtype: torch.dtype,
                      scale: float = 1.0) -> torch.Tensor:
    """PEFT's "rank" dropout: keep each output row of ΔW with probability ``1 − p`` (drawn like PEFT, from the
    CPU generator), optionally divided by the kept fraction, times ``scale``. ``[d_out]`` in ``dtype``."""
    keep = (torch.rand(d_out) > p).float()
    if normalize:
        keep /= keep.mean().clamp_min(1.0 / d_out)  # all dropped: zeros rather than PEFT's NaN
    if scale != 1.0:
        keep *= scale
    if torch.device(device).type == "cuda":  # no stall: copy from pinned memory behind the queued work
        return keep.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return keep.to(device=device, dtype=dtype)


def init_loha_(params: dict[str, nn.Parameter], init_weights: bool) -> None:
    """PEFT's init: everything kaiming-uniform (a=√5) except ``hada_w2_b = 0`` (ΔW = 0) unless ``init_weights``
    is False (all random)."""
    with torch.no_grad():
        for name, p in params.items():
            if name == "hada_w2_b" and init_weights:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))


# -- config -----------------------------------------------------------------------------------------
def check_probability(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{field} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_common(config: Any) -> None:
    """Checks LoHa and LoKr share: dropouts, path, adapter dtype."""
    config.rank_dropout = check_probability("rank_dropout", config.rank_dropout)
    config.module_dropout = check_probability("module_dropout", config.module_dropout)
    if config.path not in PATH_CHOICES:
        raise ConfigError(f"path must be one of {PATH_CHOICES}, got {config.path!r}")
    config.adapter_dtype = resolve_adapter_dtype(config.adapter_dtype)


def check_target(method: str, name: str, base: nn.Module) -> None:
    """LoHa/LoKr adapt nn.Linear (also 4-bit: slimtune's NF4Linear, bitsandbytes' Linear4bit), nn.Conv1d and
    nn.Conv2d (PEFT's set) with zero padding."""
    if is_quantized(base_weight_operand(base)):
        return
    if is_hf_conv1d(base) or not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise TargetError(f"{method} adapts nn.Linear, nn.Conv1d and nn.Conv2d; {name!r} is a {type(base).__name__}")
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        if base.padding_mode != "zeros":
            raise TargetError(f"{method} cannot adapt {name!r}: padding_mode={base.padding_mode!r} (needs 'zeros')")
        try:
            S.ConvSpec.of(base)
        except ValueError as exc:
            raise TargetError(f"{method} cannot adapt {name!r}: {exc}") from None


@dataclasses.dataclass
class LohaConfig(AdapterConfig):
    """LoHa settings: PEFT's ``LoHaConfig`` (r, alpha, rank_dropout, module_dropout, use_effective_conv2d,
    init_weights, rank_pattern, alpha_pattern).

    ``path``: ``"auto"`` picks structured or folded per layer and call by FLOP and byte counts;
    ``"structured"`` / ``"folded"`` force one (structured falls back to folded on grouped convolutions).
    ``adapter_dtype``: as :class:`~slimtune.LoraConfig` (``None``: the base weight's dtype).
    """

    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    path: str = "auto"
    adapter_dtype: torch.dtype | None = None

    method: ClassVar[str] = "loha"
    peft_type: ClassVar[str] = "LOHA"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_common(self)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be true or false, got {self.init_weights!r}")

    def create_adapter(self, name: str, base: nn.Module) -> AdapterModule:
        check_target("LoHa", name, base)
        r = self.rank_for(name)
        self._check_rank(f"rank for {name}", r)
        return LohaLayer(base, r, self.alpha_for(name), rank_dropout=self.rank_dropout,
                         module_dropout=self.module_dropout, use_effective_conv2d=self.use_effective_conv2d,
                         init_weights=self.init_weights, path=self.path, adapter_dtype=self.adapter_dtype)


# -- module -----------------------------------------------------------------------------------------
class StructuredAdapter(AdapterModule):
    """What LoHa and LoKr layers share: base geometry, dropout draws, path choice, the forward skeleton.

    The base weight reaches the Functions as :func:`~slimtune.quant.frozen.base_weight_operand` (a dense tensor,
    or a 4-bit handle dequantised right before each use); shapes come from
    :func:`~slimtune.quant.frozen.weight_shape`. Convolutions are dense only.
    """

    def _setup(self, r: int, alpha: float, rank_dropout: float, module_dropout: float, path: str) -> None:
        base = self.base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout, self.path = float(rank_dropout), float(module_dropout), path
        self.conv = S.ConvSpec.of(base) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else None
        self.weight_shape = tuple(weight_shape(base))
        self.kernel: tuple[int, ...] = self.weight_shape[2:]
        self.out_features = self.weight_shape[0]
        # input features (a Linear) / input channels (a convolution: c_in/groups per group, times the groups)
        self.in_features = self.weight_shape[1] * (1 if self.conv is None else self.conv.groups)
        self._last_path: list[str | None] = [None]  # a list: set per forward without nn.Module.__setattr__
        self._choices: dict[tuple, str] = {}  # "auto" path per (input shape, dtype, backward)

    @property
    def last_path(self) -> str | None:
        """The path the latest forward took (``"structured"`` / ``"folded"``; diagnostics and tests)."""
        return self._last_path[0]

    def _adapter_kwargs(self, adapter_dtype: torch.dtype | None) -> dict[str, Any]:
        """Device and dtype of new adapter parameters (a 4-bit base: its compute dtype, never uint8)."""
        return dict(device=self.base_layer.weight.device, dtype=adapter_dtype or weight_dtype(self.base_layer))

    # provided by each method
    structured_ok: bool = True
    normalize_rank_dropout: bool = True
    mask_has_scaling: bool = False  # whether the rank-dropout mask handed to run() includes s = alpha / r

    def _params(self) -> tuple[nn.Parameter, ...]:
        raise NotImplementedError

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, S.Cost]:
        raise NotImplementedError

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None, params: tuple[nn.Parameter, ...]
            ) -> torch.Tensor:
        """The adapted layer's output on the given path; ``mask``: rank dropout over output rows, or None;
        ``params``: :meth:`_params`."""
        raise NotImplementedError

    def base_operand(self, base: nn.Module | None = None) -> S.WeightOperand:
        """The base weight for the Functions: ``base.weight`` (dense), or a 4-bit layer's handle (``base``: the
        base layer, when the caller has it at hand)."""
        base = self.base_layer if base is None else base
        return base.weight if type(base) in _DENSE_BASES else base_weight_operand(base)

    def _check_input(self, x: torch.Tensor) -> None:
        """A clear error for an input the base layer cannot take (naming the layer and the expected shape)."""
        name = type(self).__name__
        if self.conv is None:
            if x.dim() == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"{name} expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        else:
            spatial = len(self.kernel)
            batched = x.dim() == spatial + 2
            if not (batched or x.dim() == spatial + 1) or x.shape[1 if batched else 0] != self.in_features:
                raise ValueError(f"{name} over a Conv{spatial}d expects inputs [batch, {self.in_features}, <{spatial} "
                                 f"spatial sizes>] (or without the batch), got {tuple(x.shape)}")

    def choose(self, x: torch.Tensor, backward: bool) -> str:
        if not self.structured_ok or self.path == "folded":
            return "folded"
        if self.path == "structured":
            return "structured"
        key = (tuple(x.shape), x.dtype, backward)
        path = self._choices.get(key)
        if path is None:
            path = self._choices[key] = S.choose_path(self.costs(x, backward))
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        self._check_input(x)
        if self.conv is not None and x.dim() == len(self.kernel) + 1:  # unbatched, as nn.Conv accepts it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        dtype, context = compute_setting(x)
        mask = None
        if self.training:
            # PEFT: the adapter runs when rand > module_dropout; rank dropout masks ΔW's output rows.
            if self.module_dropout > 0 and torch.rand(1).item() <= self.module_dropout:
                return self.base_layer(x)
            if self.rank_dropout > 0:
                mask = rank_dropout_mask(self.out_features, self.rank_dropout, self.normalize_rank_dropout, x.device,
                                         dtype, self.scaling if self.mask_has_scaling else 1.0)
        if x.dtype != dtype:
            x = x.to(dtype)
        params = self._params()
        backward = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        path = self._last_path[0] = self.choose(x, backward)
        with context:
            return self.run(x, path, mask, params)


class LohaLayer(StructuredAdapter):
    """LoHa over a frozen ``nn.Linear`` (or a 4-bit Linear), ``nn.Conv1d`` or ``nn.Conv2d``."""

    mask_has_scaling = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, use_effective_conv2d: bool = False, init_weights: bool = True,
                 path: str = "auto", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        check_target("LoHa", type(base_layer).__name__, base_layer)
        self._setup(r, alpha, rank_dropout, module_dropout, path)
        kw = self._adapter_kwargs(adapter_dtype)
        d_out, c_in = self.weight_shape[:2]
        self.tucker = bool(self.conv is not None and use_effective_conv2d and any(k != 1 for k in self.kernel))
        if self.tucker:
            core = (r, r, *self.kernel) if len(self.kernel) == 2 else (r, r, self.kernel[0], 1)
            shapes = {"hada_t1": core, "hada_w1_a": (r, d_out), "hada_w1_b": (r, c_in),
                      "hada_t2": core, "hada_w2_a": (r, d_out), "hada_w2_b": (r, c_in)}
        else:
            d_in = math.prod(self.weight_shape[1:])
            shapes = {"hada_w1_a": (d_out, r), "hada_w1_b": (r, d_in), "hada_w2_a": (d_out, r), "hada_w2_b": (r, d_in)}
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **kw)))
        self._names = tuple(shapes)
        init_loha_(self.peft_parameters(), init_weights)
        self.structured_ok = self.conv is None or self.conv.groups == 1
        self._fold_op = LohaFoldOp(self.conv, self.tucker, r)
        self._op: S.StructuredOp | None = None
        if self.structured_ok:
            self._op = (LohaLinearOp() if self.conv is None else
                        LohaTuckerOp(self.conv, self.kernel) if self.tucker else LohaConvOp(self.conv, self.kernel))

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self._names}

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, tucker={self.tucker}, "
                f"path={self.path!r}, rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}")

    def _params(self) -> tuple[nn.Parameter, ...]:
        """The parameters in the ops' order ((t1,) w1a, w1b, (t2,) w2a, w2b)."""
        return tuple(map(self._parameters.__getitem__, self._names))


    def delta_weight(self) -> torch.Tensor:
        t1, t2 = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        return loha_delta_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, t1, t2,
                                 self.scaling, self.weight_shape)

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, S.Cost]:
        tokens_in, tokens = S.positions(x, self.conv, self.kernel)
        d_out, c_in = self.weight_shape[:2]
        if self.tucker:
            return S.loha_tucker_costs(tokens_in, tokens, c_in, d_out, math.prod(self.kernel), self.r,
                                       x.element_size(), backward)
        return S.loha_costs(tokens, c_in * math.prod(self.kernel), d_out, self.r, x.element_size(), backward,
                            fused_fold=self._fold_op.fused(x))

    def _fused_linear(self, x: torch.Tensor, base: nn.Module) -> bool:
        """Whether the folded path can take :class:`~slimtune.kernels.loha_triton.FusedLohaLinear`: a dense, frozen
        ``nn.Linear`` weight (and bias) in x's dtype, and the kernels take it."""
        if self.conv is not None or type(base) is not nn.Linear:
            return False
        weight, bias = base.weight, base.bias
        return (weight.dtype == x.dtype and not weight.requires_grad and (bias is None or bias.dtype == x.dtype)
                and self._fold_op.fused(x))

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None, params: tuple[nn.Parameter, ...]
            ) -> torch.Tensor:
        scale: Scale = self.scaling if mask is None else mask  # the mask already includes s
        base = self.base_layer
        if path == "folded":
            if self._fused_linear(x, base):
                return _fused_loha_linear().apply(x, base.weight, base.bias, scale, *params)
            return S.folded_apply(x, self.base_operand(base), base.bias, self._fold_op, scale, *params)
        return S.structured_apply(x, self.base_operand(base), base.bias, self._op, scale, *params)


_FUSED_LINEAR: type[torch.autograd.Function] | None = None


def _fused_loha_linear() -> type[torch.autograd.Function]:
    """:class:`~slimtune.kernels.loha_triton.FusedLohaLinear`, imported once (the module needs triton)."""
    global _FUSED_LINEAR
    if _FUSED_LINEAR is None:
        from ..kernels.loha_triton import FusedLohaLinear

        _FUSED_LINEAR = FusedLohaLinear
    return _FUSED_LINEAR
