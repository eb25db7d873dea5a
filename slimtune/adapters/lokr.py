"""LoKr (KronA / LyCORIS, as in PEFT): ``ΔW = s · w1 ⊗ w2`` (Kronecker product), ``s = alpha / r``.

Shapes follow PEFT exactly, so checkpoints move both ways. The layer's ``d_out`` and ``d_in`` (a convolution:
``c_out`` and ``c_in/groups``) are split by :func:`factorization` into ``d_out = a_out·b_out``,
``d_in = a_in·b_in``; ``w1`` is ``[a_out, a_in]``, ``w2`` ``[b_out, b_in]`` (a convolution: ``[b_out, b_in, *k]``, the
kernel lives in ``w2``). Each is a full matrix or a rank-r product (:func:`lokr_uses_full`):

* ``lokr_w1`` ``[a_out, a_in]``, or ``lokr_w1_a`` ``[a_out, r]`` @ ``lokr_w1_b`` ``[r, a_in]`` (``decompose_both``);
* ``lokr_w2`` ``[b_out, b_in(, *k)]``, or ``lokr_w2_a`` ``[b_out, r]`` @ ``lokr_w2_b`` ``[r, b_in·k]``, or (conv,
  ``use_effective_conv2d``, kernel > 1) the Tucker form ``lokr_t2`` ``[r, r, kh, kw]`` (Conv1d ``[r, r, k, 1]``)
  with ``lokr_w2_a`` ``[r, b_out]``, ``lokr_w2_b`` ``[r, b_in]``.

**Structured path**: with x reshaped ``[N, a_in, b_in]``, ``x (w1 ⊗ w2)ᵀ = w1 · X · w2ᵀ`` per token — two small
contractions, ``2·N·(a_in·b_in·b_out + a_in·a_out·b_out)`` FLOPs (or the other order when cheaper), no
``[d_out, d_in]`` tensor. A convolution convolves x viewed ``[B·a_in, b_in, ...]`` with ``w2`` and contracts
``a_in`` with ``w1``. **Folded path**: ``W + ΔW`` formed transiently, rebuilt in backward.

PEFT quirk kept for compatibility: on a Conv1d with a full ``lokr_w2`` (3-D), PEFT's ``torch.kron`` of a 2-D
``w1`` with a 3-D ``w2`` interleaves the channels differently (in effect ``w2 ⊗ w1``); :func:`kron_weight`
reproduces it, and such layers use the folded path.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..kernels import structured as S
from .base import AdapterModule
from .loha import StructuredAdapter, check_common, check_target, tucker_weight

LOKR_INITS = (True, False, "lycoris")


def is_lokr_init(value: object) -> bool:
    """PEFT's LoKr ``init_weights`` values: true, false or ``"lycoris"``."""
    return isinstance(value, bool) or value == "lycoris"


# -- the math ---------------------------------------------------------------------------------------
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's / LyCORIS's split ``dimension = m · n``.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension / factor)`` as is. Otherwise
    the divisors ``m`` are walked upwards from 1 while ``m < n`` and ``m ≤ factor`` (``-1``: no bound, giving
    the pair nearest the square root); the result is ordered ``m ≤ n``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt > bound:
            break
        m, n = nxt, dimension // nxt
    return (m, n) if m <= n else (n, m)


def lokr_shapes(d_out: int, d_in: int, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((a_out, a_in), (b_out, b_in))``: the shapes of w1 and (without kernel) w2."""
    a_out, b_out = factorization(d_out, factor)
    a_in, b_in = factorization(d_in, factor)
    return (a_out, a_in), (b_out, b_in)


def lokr_uses_full(r: int, w1_shape: tuple[int, int], w2_shape: tuple[int, int], decompose_both: bool
                   ) -> tuple[bool, bool]:
    """PEFT's rule: w1 is low-rank only with ``decompose_both`` and ``r < max(w1's sides) / 2``; w2 is
    low-rank when ``r < max(w2's sides) / 2`` (kernel not counted)."""
    full_w1 = not (decompose_both and r < max(w1_shape) / 2)
    full_w2 = not (r < max(w2_shape) / 2)
    return full_w1, full_w2


def kron_weight(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``torch.kron(w1, w2)`` the way PEFT forms it (w1 gets two unit dims when w2 is 4-D)."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def lokr_delta_weight(w1: torch.Tensor, w2: torch.Tensor, scaling: float, shape: torch.Size | tuple[int, ...]
                      ) -> torch.Tensor:
    """The dense ``s · w1 ⊗ w2`` in the base weight's ``shape``, float32 or wider. Merge and tests only."""
    dtype = torch.promote_types(w1.dtype, torch.float32)
    return (kron_weight(w1.to(dtype), w2.to(dtype)) * scaling).reshape(shape)


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x (w1 ⊗ w2)ᵀ``: x ``[..., a_in·b_in]`` → ``[..., a_out·b_out]``; w1 ``[a_out, a_in]``, w2 ``[b_out, b_in]``."""
    (a_out, a_in), (b_out, b_in) = w1.shape, w2.shape
    x3 = x.reshape(-1, a_in, b_in)
    if S.kron_order(a_out, a_in, b_out, b_in)[0] == "w2":
        y = torch.matmul(w1, x3 @ w2.t())  # [N, a_in, b_out] -> [N, a_out, b_out]
    else:
        y = torch.matmul(w1, x3) @ w2.t()  # [N, a_out, b_in] -> [N, a_out, b_out]
    return y.reshape(*x.shape[:-1], a_out * b_out)


def kron_conv(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, conv: S.ConvSpec) -> torch.Tensor:
    """``conv(x, w1 ⊗ w2)`` (groups 1): x ``[B, a_in·b_in, *sp]`` viewed ``[B·a_in, b_in, *sp]`` is convolved
    with w2 ``[b_out, b_in, *k]`` (the base geometry), then ``a_in`` is contracted with w1 ``[a_out, a_in]``."""
    (a_out, a_in), b_in = w1.shape, w2.shape[1]
    batch = x.shape[0]
    u = conv.conv(x.reshape(batch * a_in, b_in, *x.shape[2:]), w2, groups=1)  # [B·a_in, b_out, *sp']
    y = torch.matmul(w1, u.reshape(batch, a_in, -1))  # [B, a_out, b_out·sp']
    return y.reshape(batch, a_out * w2.shape[0], *u.shape[2:])


def init_lokr_(params: dict[str, nn.Parameter], init_weights: bool | str) -> None:
    """PEFT's inits. ``True``: w1 (or w1_a) zero, the rest kaiming-uniform (a=√5); ``False``: all random;
    ``"lycoris"``: w2 (or w2_b) zero, the rest random."""
    zero = {True: {"lokr_w1", "lokr_w1_a"}, False: set(), "lycoris": {"lokr_w2", "lokr_w2_b"}}[init_weights]
    with torch.no_grad():
        for name, p in params.items():
            if name in zero:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def lokr_factors(names: tuple[str, ...], params: tuple[torch.Tensor, ...], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) in ``dtype`` from the layer's parameters (w2 as PEFT forms it: 2-D when low-rank)."""
    p = {name: t.to(dtype) for name, t in zip(names, params)}
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = tucker_weight(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    return w1, w2


def _mask_rows(y: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``y`` with its output rows / channels (along ``dim``) times the rank-dropout ``mask`` ``[d_out]``."""
    if mask is None:
        return y
    return y * mask.to(y.dtype).view(-1, *(1,) * (y.dim() - dim - 1))


def lokr_delta(x: torch.Tensor, *params: torch.Tensor, names: tuple[str, ...], conv: S.ConvSpec | None,
               kernel: tuple[int, ...], scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """The structured ``x ΔWᵀ`` (Linear) or ``conv(x, ΔW)`` (groups 1), times the rank-dropout mask."""
    w1, w2 = lokr_factors(names, params, x.dtype)
    w1 = w1 * scaling
    if conv is None:
        return _mask_rows(kron_linear(x, w1, w2), mask, x.dim() - 1)
    return _mask_rows(kron_conv(x, w1, w2.reshape(w2.shape[0], -1, *kernel), conv), mask, 1)


def lokr_folded_weight(weight: torch.Tensor, *params: torch.Tensor, names: tuple[str, ...], scaling: float,
                       mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``W + s · w1 ⊗ w2`` (rows times the rank-dropout mask) in ``dtype`` and W's shape (transient)."""
    w = weight.to(dtype)
    w1, w2 = lokr_factors(names, params, dtype)
    return w + _mask_rows(kron_weight(w1 * scaling, w2).reshape(w.shape), mask, 0)


# -- config -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class LokrConfig(AdapterConfig):
    """LoKr settings: PEFT's ``LoKrConfig`` (r, alpha, rank_dropout, module_dropout, use_effective_conv2d,
    decompose_both, decompose_factor, rank_dropout_scale, init_weights, rank_pattern, alpha_pattern).

    ``path`` and ``adapter_dtype`` as in :class:`~slimtune.adapters.loha.LohaConfig`.
    """

    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True
    path: str = "auto"
    adapter_dtype: torch.dtype | None = None

    method: ClassVar[str] = "lokr"
    peft_type: ClassVar[str] = "LOKR"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_common(self)
        if not is_lokr_init(self.init_weights):
            raise ConfigError(f"init_weights must be true, false or 'lycoris', got {self.init_weights!r}")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ConfigError(f"decompose_factor must be an integer (-1: automatic), got {self.decompose_factor!r}")
        for field in ("decompose_both", "rank_dropout_scale", "use_effective_conv2d"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{field} must be true or false, got {getattr(self, field)!r}")

    def create_adapter(self, name: str, base: nn.Module) -> AdapterModule:
        check_target("LoKr", name, base)
        r = self.rank_for(name)
        self._check_rank(f"rank for {name}", r)
        return LokrLayer(base, r, self.alpha_for(name), rank_dropout=self.rank_dropout,
                         module_dropout=self.module_dropout, use_effective_conv2d=self.use_effective_conv2d,
                         decompose_both=self.decompose_both, decompose_factor=self.decompose_factor,
                         rank_dropout_scale=self.rank_dropout_scale, init_weights=self.init_weights,
                         path=self.path, adapter_dtype=self.adapter_dtype)


# -- module -----------------------------------------------------------------------------------------
class LokrLayer(StructuredAdapter):
    """LoKr over a frozen ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    normalize_rank_dropout = False

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, use_effective_conv2d: bool = False, decompose_both: bool = False,
                 decompose_factor: int = -1, rank_dropout_scale: bool = False, init_weights: bool | str = True,
                 path: str = "auto", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        check_target("LoKr", type(base_layer).__name__, base_layer)
        self._setup(r, alpha, rank_dropout, module_dropout, path)
        self.normalize_rank_dropout = bool(rank_dropout_scale)
        weight = base_layer.weight
        kw = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        kernel = self.kernel
        (a_out, a_in), (b_out, b_in) = self.w1_shape, self.w2_shape = lokr_shapes(*weight.shape[:2], decompose_factor)
        full_w1, full_w2 = lokr_uses_full(r, self.w1_shape, self.w2_shape, decompose_both)
        tucker = self.conv is not None and use_effective_conv2d and any(k != 1 for k in kernel)
        shapes: dict[str, tuple[int, ...]] = (
            {"lokr_w1": (a_out, a_in)} if full_w1 else {"lokr_w1_a": (a_out, r), "lokr_w1_b": (r, a_in)})
        if full_w2:
            shapes["lokr_w2"] = (b_out, b_in, *kernel)
        elif tucker:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            shapes.update(lokr_t2=core, lokr_w2_a=(r, b_out), lokr_w2_b=(r, b_in))
        else:
            shapes.update(lokr_w2_a=(b_out, r), lokr_w2_b=(r, b_in * math.prod(kernel)))
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **kw)))
        self._names = tuple(shapes)
        init_lokr_(self.peft_parameters(), init_weights)
        # PEFT's Conv1d with a full 3-D lokr_w2 lays the channels out as w2 ⊗ w1 (see the module docstring).
        odd_layout = len(kernel) == 1 and full_w2
        self.structured_ok = self.conv is None or (self.conv.groups == 1 and not odd_layout)

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self._names}

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, w1={self.w1_shape}, "
                f"w2={self.w2_shape}, params={list(self._names)}, path={self.path!r}")

    def _params(self) -> tuple[nn.Parameter, ...]:
        return tuple(getattr(self, name) for name in self._names)

    def delta_weight(self) -> torch.Tensor:
        dtype = torch.promote_types(self._params()[0].dtype, torch.float32)
        w1, w2 = lokr_factors(self._names, self._params(), dtype)
        return lokr_delta_weight(w1, w2, self.scaling, self.base_layer.weight.shape)

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, S.Cost]:
        _, tokens = S.positions(x, self.conv, self.kernel)
        (a_out, a_in), (b_out, b_in) = self.w1_shape, self.w2_shape
        return S.lokr_costs(tokens, a_out, a_in, b_out, b_in * math.prod(self.kernel), x.element_size(), backward,
                            conv=self.conv is not None)

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None) -> torch.Tensor:
        base = self.base_layer
        common = dict(names=self._names, scaling=self.scaling, mask=mask)
        if path == "folded":
            return S.folded_apply(x, base.weight, base.bias, self.conv,
                                  functools.partial(lokr_folded_weight, **common), *self._params())
        return S.delta_apply(x, base.weight, base.bias, self.conv,
                             functools.partial(lokr_delta, conv=self.conv, kernel=self.kernel, **common),
                             *self._params())
