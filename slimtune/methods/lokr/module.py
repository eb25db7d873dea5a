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
``[d_out, d_in]`` tensor (on a Linear: :class:`~.function.KronLinearFunction`). A convolution convolves
x viewed ``[B·a_in, b_in, ...]`` with ``w2`` and contracts ``a_in`` with ``w1`` (:class:`~.ops.LokrConvOp`).
**Folded path**: ``W + ΔW`` formed transiently, rebuilt in backward (:class:`~.ops.LokrFoldOp`). Every backward has
explicit formulas (no autograd inside): the contractions' transposes, then the Kronecker / low-rank / Tucker
products' gradients (:class:`~.factors.LokrFactors`).

PEFT quirk kept for compatibility: on a Conv1d with a full ``lokr_w2`` (3-D), PEFT's ``torch.kron`` of a 2-D
``w1`` with a 3-D ``w2`` interleaves the channels differently (in effect ``w2 ⊗ w1``); :func:`kron_weight`
reproduces it, and such layers use the folded path.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...core.costs import Cost
from ...core.structured import StructuredOp, folded_apply, positions, structured_apply
from ...core.structured_adapter import StructuredAdapter, check_structured_target
from .factors import LokrFactors, lokr_factors
from .function import KronGeometry, KronLinearFunction
from .math import init_lokr_, kron_order, lokr_costs, lokr_delta_weight, lokr_shapes, lokr_uses_full
from .ops import LokrConvOp, LokrFoldOp


class LokrLayer(StructuredAdapter):
    """LoKr over a frozen ``nn.Linear`` (or a 4-bit Linear), ``nn.Conv1d`` or ``nn.Conv2d``."""

    normalize_rank_dropout = False

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, use_effective_conv2d: bool = False, decompose_both: bool = False,
                 decompose_factor: int = -1, rank_dropout_scale: bool = False, init_weights: bool | str = True,
                 path: str = "auto", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        check_structured_target("LoKr", type(base_layer).__name__, base_layer)
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
        self._geometry: KronGeometry = (a_out, a_in, b_out, b_in, kron_order(a_out, a_in, b_out, b_in)[0])
        self._op: StructuredOp | None = None  # a convolution's structured op (a Linear's: KronLinearFunction)
        if self.structured_ok and self.conv is not None:
            self._op = LokrConvOp(self._factors, self.conv, kernel, self.w1_shape, self.w2_shape)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, w1={self.w1_shape}, "
                f"w2={self.w2_shape}, params={list(self._names)}, path={self.path!r}")

    def delta_weight(self) -> torch.Tensor:
        dtype = torch.promote_types(self._params()[0].dtype, torch.float32)
        w1, w2 = lokr_factors(self._names, self._params(), dtype)
        return lokr_delta_weight(w1, w2, self.scaling, self.weight_shape)

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, Cost]:
        _, tokens = positions(x, self.conv, self.kernel)
        (a_out, a_in), (b_out, b_in) = self.w1_shape, self.w2_shape
        return lokr_costs(tokens, a_out, a_in, b_out, b_in * math.prod(self.kernel), x.element_size(), backward,
                            conv=self.conv is not None)

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None, params: tuple[nn.Parameter, ...]
            ) -> torch.Tensor:
        base = self.base_layer
        weight, bias = self.base_operand(base), base.bias
        if path == "folded":
            return folded_apply(x, weight, bias, self._fold_op, (self.scaling, mask), *params)
        if self.conv is None:
            return KronLinearFunction.apply(x, weight, bias, self._geometry, self._factors, self.scaling, mask, *params)
        return structured_apply(x, weight, bias, self._op, (self.scaling, mask), *params)
