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
(:class:`~slimtune.kernels.structured.FactoredLinearFunction`, which rebuilds ``D``/``U`` in backward rather than
saving them). On a convolution (groups 1) ``D`` is a down convolution with the base's geometry and ``U`` a 1x1
up; the Tucker form adds a core ``C[(i,i'), (j,j'), ·] = t1[i, j, ·] t2[i', j', ·]`` between a 1x1 down and a
1x1 up. **Folded path**: ``W + ΔW`` formed transiently (``addcmul``), one GEMM/convolution, rebuilt in backward.
The structured path costs like LoRA at rank ``r²``; :func:`~slimtune.kernels.structured.choose_path` takes the
folded one where that is cheaper (large ``r²`` against the layer's width, few tokens).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, resolve_adapter_dtype
from ..errors import ConfigError, TargetError
from ..kernels import structured as S
from ..targeting import is_hf_conv1d
from .base import AdapterModule
from .lora import compute_setting

PATH_CHOICES = ("auto", "structured", "folded")
Scale = float | torch.Tensor  # s, or s · rank-dropout mask over output rows ([d_out])


# -- the math ---------------------------------------------------------------------------------------
def tucker_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``W[p, q, ·] = Σ_ij t[i, j, ·] wa[i, p] wb[j, q]``: t ``[r, r, *k]``, wa ``[r, c_out]``, wb ``[r, c_in]``."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


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


def face_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: ``[n, r] ⊙̂ [n, r] → [n, r²]``, column ``(i, j)`` = ``a[:, i] * b[:, j]``."""
    return (a.unsqueeze(2) * b.unsqueeze(1)).flatten(1)


def _scale_rows(w: torch.Tensor, scale: Scale, dim: int) -> torch.Tensor:
    """``w`` with output row ``o`` (along ``dim``) scaled by ``scale[o]`` (or all by the number ``scale``)."""
    if isinstance(scale, torch.Tensor):
        return w * (scale.to(w.dtype).unsqueeze(1) if dim == 0 else scale.to(w.dtype).unsqueeze(0))
    return w * scale


def loha_linear_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, *,
                        scale: Scale, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D [r², d_in], U [d_out, r²])`` with ``U D = s · (w1a w1b) ⊙ (w2a w2b)``, in ``dtype``."""
    w1a, w1b, w2a, w2b = (t.to(dtype) for t in (w1a, w1b, w2a, w2b))
    down = face_split(w1b.t(), w2b.t()).t()
    up = face_split(_scale_rows(w1a, scale, 0), w2a)
    return down, up


def loha_tucker_factors(t1: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, t2: torch.Tensor,
                        w2a: torch.Tensor, w2b: torch.Tensor, *, scale: Scale, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D [r², c_in], C [r², r², *k], U [c_out, r²])`` with ``ΔW[p, q, ·] = Σ U[p, I] C[I, J, ·] D[J, q]``."""
    t1, w1a, w1b, t2, w2a, w2b = (t.to(dtype) for t in (t1, w1a, w1b, t2, w2a, w2b))
    r = t1.shape[0]
    down = face_split(w1b.t(), w2b.t()).t()
    up = face_split(_scale_rows(w1a, scale, 1).t(), w2a.t())
    core = torch.einsum("ij...,kl...->ikjl...", t1, t2).reshape(r * r, r * r, *t1.shape[2:])
    return down, core, up


def pointwise(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of ``h`` ``[B, c, *sp]`` with ``w`` ``[c_out, c]``."""
    conv = F.conv1d if h.dim() == 3 else F.conv2d
    return conv(h, w.reshape(*w.shape, *(1,) * (h.dim() - 2)))


def loha_conv_delta(x: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                    w2b: torch.Tensor, *, conv: S.ConvSpec, kernel: tuple[int, ...], scale: Scale) -> torch.Tensor:
    """``conv(x, ΔW)`` as a down convolution to r² channels (base geometry, groups 1) and a 1x1 up."""
    down, up = loha_linear_factors(w1a, w1b, w2a, w2b, scale=scale, dtype=x.dtype)
    h = conv.conv(x, down.reshape(down.shape[0], -1, *kernel))
    return pointwise(h, up)


def loha_tucker_delta(x: torch.Tensor, t1: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, t2: torch.Tensor,
                      w2a: torch.Tensor, w2b: torch.Tensor, *, conv: S.ConvSpec, kernel: tuple[int, ...],
                      scale: Scale) -> torch.Tensor:
    """Tucker ``conv(x, ΔW)``: 1x1 down to r², the ``[r², r², *k]`` core with the base geometry, 1x1 up."""
    down, core, up = loha_tucker_factors(t1, w1a, w1b, t2, w2a, w2b, scale=scale, dtype=x.dtype)
    h = conv.conv(pointwise(x, down), core.reshape(*core.shape[:2], *kernel))
    return pointwise(h, up)


def loha_folded_weight(weight: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                       w2b: torch.Tensor, *, scale: Scale, dtype: torch.dtype) -> torch.Tensor:
    """``W + s · (w1a w1b) ⊙ (w2a w2b)`` in ``dtype`` and W's shape (transient: the folded path)."""
    w = weight.to(dtype)
    w1 = _scale_rows(w1a.to(dtype), scale, 0) @ w1b.to(dtype)
    w2 = w2a.to(dtype) @ w2b.to(dtype)
    return torch.addcmul(w, w1.view(w.shape), w2.view(w.shape))


def loha_folded_tucker_weight(weight: torch.Tensor, t1: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor,
                              t2: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, *, scale: Scale,
                              dtype: torch.dtype) -> torch.Tensor:
    """Tucker form of :func:`loha_folded_weight`."""
    w = weight.to(dtype)
    w1 = tucker_weight(t1.to(dtype), _scale_rows(w1a.to(dtype), scale, 1), w1b.to(dtype))
    w2 = tucker_weight(t2.to(dtype), w2a.to(dtype), w2b.to(dtype))
    return torch.addcmul(w, w1.reshape(w.shape), w2.reshape(w.shape))


def rank_dropout_mask(d_out: int, p: float, normalize: bool, device: torch.device) -> torch.Tensor:
    """PEFT's "rank" dropout: keep each output row of ΔW with probability ``1 − p`` (drawn like PEFT, from the
    CPU generator), optionally divided by the kept fraction. ``[d_out]`` float32."""
    keep = (torch.rand(d_out) > p).float()
    if normalize:
        keep /= keep.mean().clamp_min(1.0 / d_out)  # all dropped: zeros rather than PEFT's NaN
    return keep.to(device)


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
    """LoHa/LoKr adapt nn.Linear, nn.Conv1d and nn.Conv2d (PEFT's set) with zero padding."""
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
    """What LoHa and LoKr layers share: base geometry, dropout draws, path choice, the forward skeleton."""

    def _setup(self, r: int, alpha: float, rank_dropout: float, module_dropout: float, path: str) -> None:
        base = self.base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout, self.path = float(rank_dropout), float(module_dropout), path
        self.conv = S.ConvSpec.of(base) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else None
        self.kernel: tuple[int, ...] = tuple(base.weight.shape[2:])
        self.out_features = base.weight.shape[0]
        self.last_path: str | None = None  # the path the latest forward took (diagnostics, tests)

    # provided by each method
    structured_ok: bool = True
    normalize_rank_dropout: bool = True

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, S.Cost]:
        raise NotImplementedError

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None) -> torch.Tensor:
        """The adapted layer's output on the given path; ``mask``: rank dropout over output rows, or None."""
        raise NotImplementedError

    def choose(self, x: torch.Tensor, backward: bool) -> str:
        if not self.structured_ok or self.path == "folded":
            return "folded"
        if self.path == "structured":
            return "structured"
        return S.choose_path(self.costs(x, backward))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        if self.conv is not None and x.dim() == len(self.kernel) + 1:  # unbatched, as nn.Conv accepts it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        mask = None
        if self.training:
            # PEFT: the adapter runs when rand > module_dropout; rank dropout masks ΔW's output rows.
            if self.module_dropout > 0 and torch.rand(1).item() <= self.module_dropout:
                return self.base_layer(x)
            if self.rank_dropout > 0:
                mask = rank_dropout_mask(self.out_features, self.rank_dropout, self.normalize_rank_dropout, x.device)
        dtype, context = compute_setting(x)
        x = x.to(dtype)
        backward = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        path = self.last_path = self.choose(x, backward)
        with context:
            return self.run(x, path, mask)


class LohaLayer(StructuredAdapter):
    """LoHa over a frozen ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, use_effective_conv2d: bool = False, init_weights: bool = True,
                 path: str = "auto", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        check_target("LoHa", type(base_layer).__name__, base_layer)
        self._setup(r, alpha, rank_dropout, module_dropout, path)
        weight = base_layer.weight
        kw = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        d_out, c_in = weight.shape[:2]
        self.tucker = bool(self.conv is not None and use_effective_conv2d and any(k != 1 for k in self.kernel))
        if self.tucker:
            core = (r, r, *self.kernel) if len(self.kernel) == 2 else (r, r, self.kernel[0], 1)
            shapes = {"hada_t1": core, "hada_w1_a": (r, d_out), "hada_w1_b": (r, c_in),
                      "hada_t2": core, "hada_w2_a": (r, d_out), "hada_w2_b": (r, c_in)}
        else:
            d_in = weight[0].numel()
            shapes = {"hada_w1_a": (d_out, r), "hada_w1_b": (r, d_in), "hada_w2_a": (d_out, r), "hada_w2_b": (r, d_in)}
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **kw)))
        self._names = tuple(shapes)
        init_loha_(self.peft_parameters(), init_weights)
        self.structured_ok = self.conv is None or self.conv.groups == 1

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self._names}

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, tucker={self.tucker}, "
                f"path={self.path!r}, rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}")

    def _factors(self) -> tuple[nn.Parameter, ...]:
        """The parameters in the argument order of the math functions above ((t1,) w1a, w1b, (t2,) w2a, w2b)."""
        return tuple(getattr(self, name) for name in self._names)

    def delta_weight(self) -> torch.Tensor:
        t1, t2 = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        return loha_delta_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, t1, t2,
                                 self.scaling, self.base_layer.weight.shape)

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, S.Cost]:
        tokens_in, tokens = S.positions(x, self.conv, self.kernel)
        weight = self.base_layer.weight
        if self.tucker:
            return S.loha_tucker_costs(tokens_in, tokens, weight.shape[1], weight.shape[0], math.prod(self.kernel),
                                       self.r, x.element_size(), backward)
        return S.loha_costs(tokens, weight[0].numel(), weight.shape[0], self.r, x.element_size(), backward)

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None) -> torch.Tensor:
        base = self.base_layer
        scale: Scale = self.scaling if mask is None else mask * self.scaling
        if path == "folded":
            build = loha_folded_tucker_weight if self.tucker else loha_folded_weight
            return S.folded_apply(x, base.weight, base.bias, self.conv, functools.partial(build, scale=scale),
                                  *self._factors())
        if self.conv is None:
            return S.factored_linear(x, base.weight, base.bias, functools.partial(loha_linear_factors, scale=scale),
                                     *self._factors())
        delta = loha_tucker_delta if self.tucker else loha_conv_delta
        return S.delta_apply(x, base.weight, base.bias, self.conv,
                             functools.partial(delta, conv=self.conv, kernel=self.kernel, scale=scale),
                             *self._factors())
