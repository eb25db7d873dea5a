"""HRA (Householder Reflection Adaptation), applied to activations — never a dense transform.

PEFT's convention: ``hra_u`` is ``[d_in, r]`` (Conv2d: ``[c_in·kh·kw, r]``); with normalised columns
``u_i``, ``H = H_0 H_1 ⋯ H_{r−1}``, ``H_i = I − 2 u_i u_iᵀ``, and the layer computes ``base`` with weight
``W H``, i.e. ``y = base(x Hᵀ)``. With ``apply_GS`` the columns are orthonormalised (Gram–Schmidt; here a
QR factorisation, whose column signs do not change ``H``) and ``H = I − 2 Q Qᵀ``.

The compact WY form ``H = I − U T Uᵀ`` (``T`` upper triangular, ``T⁻¹ = striu(UᵀU) + I/2``; for GS
``T = 2I``) turns the adapted weight into a low-rank update of the frozen one::

    W H = W + up · down,   down = Uᵀ  [r, d_in],   up = −(W U) T  [d_out, r]

so the layer is LoRA with computed factors: the training path is the same autograd Function
(:mod:`slimtune.core.lowrank`), which saves x alone; ``U``, ``T``, ``W U`` are ``[d, r]`` / ``[r, r]``
tensors built by autograd in O(d_out·d_in·r) — no ``[d, d]`` tensor, no copy or cast of W. Conv2d takes the
same factors as a down convolution (kernel ``Uᵀ`` reshaped ``[r, c_in, kh, kw]``) and a 1x1 up convolution.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...core.autograd_state import tensor_version
from ...core.compute import compute_setting
from ...core.explain import Choice, lowrank_backward_choice
from ...core.frozen import WeightOperand, base_weight_operand, is_quantized, weight_dtype, weight_matmul, weight_shape
from ...core.lowrank import conv_low_rank_forward, lowrank_linear
from ...core.module import AdapterModule
from ...core.tracing import compiling
from ...errors import ConfigError
from .factors import HraFactorCache
from .math import hra_low_rank_factors, init_hra_, orthogonality_penalty, reflections_cancel, wy_factors


class HraLayer(AdapterModule):
    """HRA over a frozen ``nn.Linear`` or ``nn.Conv2d`` (groups 1)."""

    def __init__(self, base_layer: nn.Module, r: int, apply_GS: bool = False, init_weights: bool = True,
                 orth_reg_weight: float = 0.0, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        shape = weight_shape(base_layer)
        self.r, self.apply_GS, self.orth_reg_weight = r, apply_GS, float(orth_reg_weight)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        d_in = math.prod(shape[1:])
        if r > d_in:
            raise ConfigError(f"HRA rank {r} exceeds the reflected dimension {d_in}")
        self.hra_u = nn.Parameter(torch.empty(d_in, r, device=base_layer.weight.device,
                                              dtype=adapter_dtype or weight_dtype(base_layer)))
        init_hra_(self.hra_u, symmetric=init_weights)
        self.factor_cache: HraFactorCache | None = None  # set by HraConfig.finalize: factors batched over layers
        # hra_u's version right after a symmetric init (None: the reflections do not start cancelled); see _start
        self._identity_version = tensor_version(self.hra_u) if init_weights and r % 2 == 0 and not apply_GS else None

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {"hra_u": self.hra_u}

    def extra_repr(self) -> str:
        return f"r={self.r}, apply_GS={self.apply_GS}"

    def factors(self, weight2d: WeightOperand) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down [r, d_in], up [d_out, r])`` with ``W H = W + up · down``."""
        if self.factor_cache is None:
            return hra_low_rank_factors(weight2d, self.hra_u, self.apply_GS)
        unit, neg_ut = self.factor_cache.factors(self)  # in W's dtype
        return unit.t(), weight_matmul(weight2d, neg_ut)

    def explain(self, x: torch.Tensor) -> list[Choice]:
        """On a Linear, LoRA's backward order at rank r (the layer runs as LoRA with computed factors); a
        convolution runs through PyTorch's autograd (no choice)."""
        if self.is_conv:
            return []
        d_out, d_in = weight_shape(self.base_layer)
        return [lowrank_backward_choice(x.numel() // x.shape[-1], d_in, d_out, self.r, x.dtype)]

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w2 = weight.reshape(weight.shape[0], -1)
        down, up = hra_low_rank_factors(w2, self.hra_u.to(weight.dtype), self.apply_GS)
        return (w2 + up.to(weight.dtype) @ down.to(weight.dtype)).view_as(weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # (W H) Hᵀ = W: Hᵀ = I − U Tᵀ Uᵀ
        w2 = weight.reshape(weight.shape[0], -1)
        unit, t = wy_factors(self.hra_u.to(weight.dtype), self.apply_GS)
        unit, t = unit.to(weight.dtype), t.to(weight.dtype)
        return (w2 - ((w2 @ unit) @ t.t()) @ unit.t()).view_as(weight)

    def orthogonality_loss(self) -> torch.Tensor:
        return self.orth_reg_weight * orthogonality_penalty(self.hra_u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        return self._start(x, self._forward(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.is_conv:
            weight = base.weight
            down, up = self.factors(weight.reshape(weight.shape[0], -1))
            return conv_low_rank_forward(x, x, base, down.reshape(self.r, *weight.shape[1:]),
                                         up.reshape(*up.shape, 1, 1))
        weight = base_weight_operand(base)
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"HRA layer expects inputs [..., {weight.shape[1]}], got {tuple(x.shape)}")
        down, up = self.factors(weight)
        dtype, context = compute_setting(x)
        bias = base.bias.to(dtype) if base.bias is not None else None
        if not is_quantized(weight):
            weight = weight.to(dtype)
        with context:
            return lowrank_linear(x.to(dtype), weight, bias, down, up, 1.0)

    def _start(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The exact identity of a fresh layer. With PEFT's symmetric init the reflections cancel in pairs, so the
        layer is its base — but in floating point the compact WY form leaves a residue of the order of the unit
        roundoff (``‖û‖²`` is not exactly 1), enough to move a bf16 output off the base model's. While hra_u is as
        the init left it (its version, checked on the host) and its pairs still cancel (checked on the device, no
        sync), the output is the base's own, ``base(x) + (y − y.detach())``: the base's value to the bit, y's
        gradient (the exact product's). Costs one more base GEMM until the first optimizer step, nothing after.
        Skipped under ``torch.compile`` (the version check cannot be traced, and the device check alone would cost
        that GEMM on every step): there a fresh layer is its base within the unit roundoff."""
        if self._identity_version is None or compiling():
            return y
        if tensor_version(self.hra_u) != self._identity_version:  # trained: versions only grow, so never again
            self._identity_version = None
            return y
        with torch.no_grad():
            base = self.base_layer(x)
        return torch.where(reflections_cancel(self.hra_u), base + (y - y.detach()), y)


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``orth_reg_weight · ‖ÛᵀÛ − I‖²`` over the model's HRA layers; add it to the training loss."""
    terms = [m.orthogonality_loss() for m in model.modules() if isinstance(m, HraLayer) and m.orth_reg_weight]
    return torch.stack(terms).sum() if terms else torch.zeros(())
