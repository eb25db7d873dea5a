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
``[d_out, d_in]`` tensor (on a Linear: :class:`~slimtune.kernels.lokr.KronLinearFunction`). A convolution convolves
x viewed ``[B·a_in, b_in, ...]`` with ``w2`` and contracts ``a_in`` with ``w1`` (:class:`LokrConvOp`). **Folded path**:
``W + ΔW`` formed transiently, rebuilt in backward (:class:`LokrFoldOp`). Every backward has explicit formulas (no
autograd inside): the contractions' transposes, then the Kronecker / low-rank / Tucker products' gradients
(:class:`LokrFactors`).

PEFT quirk kept for compatibility: on a Conv1d with a full ``lokr_w2`` (3-D), PEFT's ``torch.kron`` of a 2-D
``w1`` with a 3-D ``w2`` interleaves the channels differently (in effect ``w2 ⊗ w1``); :func:`kron_weight`
reproduces it, and such layers use the folded path.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..kernels import structured as S
from ..kernels.lokr import KronGeometry, KronLinearFunction
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
    return LokrFactors(names).build([t.to(dtype) for t in params], 1.0)


class LokrFactors:
    """``w1`` (times ``s``) and ``w2`` from a layer's parameters, in PEFT's forms (w2 2-D when low-rank, the
    full / Tucker w2 with its kernel), and the parameters' gradients from ``dw1``, ``dw2`` — explicit formulas.

    ``names`` come in the layer's order: w1's parameters (``lokr_w1``, or ``lokr_w1_a``, ``lokr_w1_b``), then w2's
    (``lokr_w2``; ``lokr_t2``, ``lokr_w2_a``, ``lokr_w2_b``; or ``lokr_w2_a``, ``lokr_w2_b``). The layout is read
    once here, so the per-call methods index the parameter list directly."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.n_w1 = 2 if "lokr_w1_a" in names else 1  # params[:n_w1] make w1, the rest w2
        self.w2_form = "full" if "lokr_w2" in names else "tucker" if "lokr_t2" in names else "lowrank"

    def build(self, params: S.Params, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = params[0] if self.n_w1 == 1 else params[0] @ params[1]
        p2 = params[self.n_w1:]
        if self.w2_form == "full":
            w2 = p2[0]
        elif self.w2_form == "tucker":
            w2 = tucker_weight(*p2)
        else:
            w2 = p2[0] @ p2[1]
        return (w1 if s == 1.0 else w1 * s), w2

    def needs(self, need: Sequence[bool]) -> tuple[bool, bool]:
        """Whether any w1 parameter, any w2 parameter needs a gradient."""
        return any(need[:self.n_w1]), any(need[self.n_w1:])

    def grads(self, dw1_s: S.Grad, dw2: S.Grad, params: S.Params, s: float, need: Sequence[bool]) -> list[S.Grad]:
        """The parameters' gradients (in ``names`` order) from those of ``w1 · s`` and ``w2``."""
        n1 = self.n_w1
        out: list[S.Grad] = [None] * len(params)
        if dw1_s is not None:
            dw1 = dw1_s if s == 1.0 else dw1_s * s
            if n1 == 1:
                out[0] = dw1
            else:
                out[0], out[1] = S.lowrank_grad(dw1, params[0], params[1], need[0], need[1])
        if dw2 is not None:
            p2, n2 = params[n1:], need[n1:]
            if self.w2_form == "full":
                grads2 = (dw2.reshape(p2[0].shape),)
            elif self.w2_form == "tucker":
                grads2 = S.tucker_grad(dw2, *p2, n2)
            else:
                a, b = p2
                grads2 = S.lowrank_grad(dw2.reshape(a.shape[0], -1), a, b, n2[0], n2[1])
            out[n1:] = grads2
        return [g if wanted else None for g, wanted in zip(out, need)]


LokrScale = tuple[float, "torch.Tensor | None"]  # (s, rank-dropout mask over the output rows [d_out] or None)


class LokrConvOp(S.StructuredOp):
    """``conv(x, s·w1 ⊗ w2)`` (groups 1): x ``[B, a_in·b_in, *sp]`` viewed ``[B·a_in, b_in, *sp]`` is convolved
    with w2 ``[b_out, b_in, *k]`` (the base geometry), then ``a_in`` is contracted with w1 (a batched GEMM
    accumulating into y). Backward: ``du = w1ᵀ dy``, the convolution's backward gives ``dx`` and ``dw2``;
    ``dw1 = Σ_b dy[b] u[b]ᵀ`` with ``u`` recomputed."""

    def __init__(self, factors: LokrFactors, conv: S.ConvSpec, kernel: tuple[int, ...], w1_shape: tuple[int, int],
                 w2_shape: tuple[int, int]) -> None:
        self.factors, self.conv, self.kernel = factors, conv, kernel
        (self.a_out, self.a_in), (self.b_out, self.b_in) = w1_shape, w2_shape

    def _build(self, params: S.Params, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = self.factors.build(params, s)
        return w1, w2.reshape(self.b_out, self.b_in, *self.kernel).contiguous()

    def add_delta(self, y, x, params, scale: LokrScale):
        s, mask = scale
        w1, w2 = self._build(params, s)
        batch, a_out, a_in = x.shape[0], self.a_out, self.a_in
        u = self.conv.conv(x.reshape(batch * a_in, self.b_in, *x.shape[2:]), w2, groups=1)  # [B·a_in, b_out, *sp']
        u3 = u.reshape(batch, a_in, -1)
        if mask is None and y.is_contiguous():
            y.view(batch, a_out, -1).baddbmm_(w1.expand(batch, a_out, a_in), u3)
            return y
        delta = S.bmm_left(w1, u3).view(y.shape)
        if mask is not None:
            delta.mul_(mask.view(-1, *(1,) * (y.dim() - 2)))
        return y.add_(delta)

    def delta_backward(self, dy, x, params, scale: LokrScale, grad_x, need):
        s, mask = scale
        w1, w2 = self._build(params, s)
        batch, a_out, a_in = x.shape[0], self.a_out, self.a_in
        if mask is not None:
            dy = dy * mask.view(-1, *(1,) * (dy.dim() - 2))
        dy3 = dy.reshape(batch, a_out, -1)
        xv = x.reshape(batch * a_in, self.b_in, *x.shape[2:])
        need_1, need_2 = self.factors.needs(need)
        need_dx = grad_x is not None
        dw1 = dw2 = None
        if need_dx or need_2:
            du = S.bmm_left(w1.t(), dy3).reshape(batch * a_in, self.b_out, *dy.shape[2:])
            dxv, dw2 = S.base_backward(du, xv, w2, self.conv, need_dx, need_2, groups=1)
            del du
            if dxv is not None:
                grad_x.add_(dxv.reshape(x.shape))
        if need_1:
            dw1 = S.sum_bmm(dy3, self.conv.conv(xv, w2, groups=1).reshape(batch, a_in, -1))
        return self.factors.grads(dw1, dw2, params, s, need)


class LokrFoldOp(S.FoldOp):
    """``W + s · w1 ⊗ w2`` (rows times the rank-dropout mask), the Kronecker product as PEFT forms it
    (:func:`kron_weight`); backward: :func:`~slimtune.kernels.structured.kron_grad`."""

    def __init__(self, factors: LokrFactors, conv: S.ConvSpec | None) -> None:
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
        da, dw2 = S.kron_grad(g, a, w2, need_1, need_2)
        return self.factors.grads(None if da is None else da.reshape(w1.shape), dw2, params, s, need)


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
    """LoKr over a frozen ``nn.Linear`` (or a 4-bit Linear), ``nn.Conv1d`` or ``nn.Conv2d``."""

    normalize_rank_dropout = False

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, use_effective_conv2d: bool = False, decompose_both: bool = False,
                 decompose_factor: int = -1, rank_dropout_scale: bool = False, init_weights: bool | str = True,
                 path: str = "auto", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        check_target("LoKr", type(base_layer).__name__, base_layer)
        self._setup(r, alpha, rank_dropout, module_dropout, path)
        self.normalize_rank_dropout = bool(rank_dropout_scale)
        kw = self._adapter_kwargs(adapter_dtype)
        kernel = self.kernel
        (a_out, a_in), (b_out, b_in) = self.w1_shape, self.w2_shape = lokr_shapes(*self.weight_shape[:2],
                                                                                 decompose_factor)
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
        self._factors = LokrFactors(self._names)
        self._fold_op = LokrFoldOp(self._factors, self.conv)
        self._geometry: KronGeometry = (a_out, a_in, b_out, b_in, S.kron_order(a_out, a_in, b_out, b_in)[0])
        self._op: S.StructuredOp | None = None  # a convolution's structured op (a Linear's: KronLinearFunction)
        if self.structured_ok and self.conv is not None:
            self._op = LokrConvOp(self._factors, self.conv, kernel, self.w1_shape, self.w2_shape)

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self._names}

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, w1={self.w1_shape}, "
                f"w2={self.w2_shape}, params={list(self._names)}, path={self.path!r}")

    def _params(self) -> tuple[nn.Parameter, ...]:
        return tuple(map(self._parameters.__getitem__, self._names))

    def delta_weight(self) -> torch.Tensor:
        dtype = torch.promote_types(self._params()[0].dtype, torch.float32)
        w1, w2 = lokr_factors(self._names, self._params(), dtype)
        return lokr_delta_weight(w1, w2, self.scaling, self.weight_shape)

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, S.Cost]:
        _, tokens = S.positions(x, self.conv, self.kernel)
        (a_out, a_in), (b_out, b_in) = self.w1_shape, self.w2_shape
        return S.lokr_costs(tokens, a_out, a_in, b_out, b_in * math.prod(self.kernel), x.element_size(), backward,
                            conv=self.conv is not None)

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None, params: tuple[nn.Parameter, ...]
            ) -> torch.Tensor:
        base = self.base_layer
        weight, bias = self.base_operand(base), base.bias
        if path == "folded":
            return S.folded_apply(x, weight, bias, self._fold_op, (self.scaling, mask), *params)
        if self.conv is None:
            return KronLinearFunction.apply(x, weight, bias, self._geometry, self._factors, self.scaling, mask, *params)
        return S.structured_apply(x, weight, bias, self._op, (self.scaling, mask), *params)
