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
(:class:`~.ops.LohaLinearOp` in :class:`~slimtune.core.structured.StructuredFunction`, which rebuilds ``D``/``U``
in backward rather than saving them, and maps ``dD``/``dU`` to the factors with explicit formulas). On a convolution
(groups 1) ``D`` is a down convolution with the base's geometry and ``U`` a 1x1 up; the Tucker form adds a core
``C[(i,i'), (j,j'), ·] = t1[i, j, ·] t2[i', j', ·]`` between a 1x1 down and a 1x1 up. **Folded path**: ``W + ΔW``
formed transiently, one GEMM/convolution, rebuilt in backward — on the GPU by fused Triton kernels
(:mod:`.triton_kernels`: one pass forward; in backward one kernel writes ``W + ΔW`` and the four factor gradients
from ``dyᵀx``; on a dense frozen Linear the whole layer is one Function over them,
:class:`~.fused.FusedLohaLinear`), elsewhere with PyTorch ops (``addcmul``; also the kernels' reference). No
backward runs autograd. The structured path costs like LoRA at rank ``r²``; :func:`~slimtune.core.costs.choose_path`
takes the folded one where that is cheaper (large ``r²`` against the layer's width, few tokens).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ...core.costs import Cost
from ...core.explain import Choice, lowrank_backward_choice
from ...core.structured import StructuredOp, folded_apply, positions, structured_apply
from ...core.structured_adapter import Scale, StructuredAdapter, check_structured_target
from .costs import loha_costs, loha_tucker_costs
from .math import init_loha_, loha_delta_weight
from .ops import LohaConvOp, LohaFoldOp, LohaLinearOp, LohaTuckerOp


class LohaLayer(StructuredAdapter):
    """LoHa over a frozen ``nn.Linear`` (or a 4-bit Linear), ``nn.Conv1d`` or ``nn.Conv2d``."""

    mask_has_scaling = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, use_effective_conv2d: bool = False, init_weights: bool = True,
                 path: str = "auto", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        check_structured_target("LoHa", type(base_layer).__name__, base_layer)
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
        self._op: StructuredOp | None = None
        if self.structured_ok:
            self._op = (LohaLinearOp() if self.conv is None else
                        LohaTuckerOp(self.conv, self.kernel) if self.tucker else LohaConvOp(self.conv, self.kernel))

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, tucker={self.tucker}, "
                f"path={self.path!r}, rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}")

    def delta_weight(self) -> torch.Tensor:
        t1, t2 = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        return loha_delta_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, t1, t2,
                                 self.scaling, self.weight_shape)

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, Cost]:
        tokens_in, tokens = positions(x, self.conv, self.kernel)
        d_out, c_in = self.weight_shape[:2]
        if self.tucker:
            return loha_tucker_costs(tokens_in, tokens, c_in, d_out, math.prod(self.kernel), self.r,
                                     x.element_size(), backward)
        return loha_costs(tokens, c_in * math.prod(self.kernel), d_out, self.r, x.element_size(), backward,
                          fused_fold=self._fold_op.fused(x))

    def explain(self, x: torch.Tensor) -> list[Choice]:
        """The path; on a Linear's structured path also LoRA's backward order at rank r² (its factors' gradients)."""
        choices = super().explain(x)
        if self.conv is None and choices[0].chosen.startswith("structured"):
            choices.append(lowrank_backward_choice(x.numel() // x.shape[-1], self.in_features, self.out_features,
                                                   self.r * self.r, x.dtype))
        return choices

    def _fused_linear(self, x: torch.Tensor, base: nn.Module) -> bool:
        """Whether the folded path can take :class:`~slimtune.methods.loha.fused.FusedLohaLinear`: a dense, frozen
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
                return _fused_linear_function().apply(x, base.weight, base.bias, scale, *params)
            return folded_apply(x, self.base_operand(base), base.bias, self._fold_op, scale, *params)
        return structured_apply(x, self.base_operand(base), base.bias, self._op, scale, *params)


@functools.cache
def _fused_linear_function() -> type[torch.autograd.Function]:
    """:class:`~.fused.FusedLohaLinear`, imported on first use (it imports triton, an optional dependency; reached
    only where :meth:`LohaFoldOp.fused` found the kernels usable)."""
    from .fused import FusedLohaLinear

    return FusedLohaLinear
