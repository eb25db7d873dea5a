"""HRA (Householder Reflection Adaptation), applied to activations — never a dense transform.

PEFT's convention: ``hra_u`` is ``[d_in, r]`` (Conv2d: ``[c_in·kh·kw, r]``); with normalised columns
``u_i``, ``H = H_0 H_1 ⋯ H_{r−1}``, ``H_i = I − 2 u_i u_iᵀ``, and the layer computes ``base`` with weight
``W H``, i.e. ``y = base(x Hᵀ)``. With ``apply_GS`` the columns are orthonormalised (Gram–Schmidt; here a
QR factorisation, whose column signs do not change ``H``) and ``H = I − 2 Q Qᵀ``.

The compact WY form ``H = I − U T Uᵀ`` (``T`` upper triangular, ``T⁻¹ = striu(UᵀU) + I/2``; for GS
``T = 2I``) turns the adapted weight into a low-rank update of the frozen one::

    W H = W + up · down,   down = Uᵀ  [r, d_in],   up = −(W U) T  [d_out, r]

so the layer is LoRA with computed factors: the training path is the same autograd Function
(:mod:`slimtune.kernels.lora`), which saves x alone; ``U``, ``T``, ``W U`` are ``[d, r]`` / ``[r, r]``
tensors built by autograd in O(d_out·d_in·r) — no ``[d, d]`` tensor, no copy or cast of W. Conv2d takes the
same factors as a down convolution (kernel ``Uᵀ`` reshaped ``[r, c_in, kh, kw]``) and a 1x1 up convolution.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig, resolve_adapter_dtype
from ..errors import ConfigError, TargetError
from ..kernels.hra import HraFactorCache, attach_factor_cache
from ..kernels.lora import lora_linear
from ..quant.linear import NF4Linear
from ..quant.frozen import WeightOperand, base_weight_operand, is_quantized, weight_dtype, weight_matmul, weight_shape
from ..targeting import is_hf_conv1d
from .base import AdapterModule
from .locon import conv_low_rank_forward
from .lora import compute_setting


# -- the math ---------------------------------------------------------------------------------------
def wy_factors(u: torch.Tensor, apply_gs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, T)`` with ``H_0 ⋯ H_{r−1} = I − U T Uᵀ``; u ``[d, r]``; U ``[d, r]``, T ``[r, r]``, fp32 or wider."""
    u = u.to(torch.promote_types(u.dtype, torch.float32))
    r = u.shape[1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    if apply_gs:
        q, _ = torch.linalg.qr(u)
        return q, 2.0 * eye
    unit = u / u.norm(dim=0, keepdim=True)
    t_inv = torch.triu(unit.t() @ unit, diagonal=1) + 0.5 * eye
    return unit, torch.linalg.solve_triangular(t_inv, eye, upper=True)


def hra_low_rank_factors(weight2d: WeightOperand, u: torch.Tensor, apply_gs: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [r, d_in], up [d_out, r])`` with ``W H = W + up · down``. ``W U`` runs in W's dtype (a 4-bit W:
    its compute dtype)."""
    unit, t = wy_factors(u, apply_gs)
    w_u = weight_matmul(weight2d, unit.to(weight2d.dtype)).to(t.dtype)
    return unit.t(), -(w_u @ t)


def hra_dense_transform(u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """The dense ``H`` ``[d, d]`` by PEFT's recipe (reflection by reflection / ``I − 2QQᵀ``): the reference."""
    d, r = u.shape
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    if apply_gs:
        q = []
        for i in range(r):
            v = u[:, i]
            for prev in q:
                v = v - (prev @ v) * prev
            q.append(v / v.norm())
        q = torch.stack(q, dim=1)
        return eye - 2 * q @ q.t()
    unit = u / u.norm(dim=0)
    h = eye
    for i in range(r):
        ui = unit[:, i:i + 1]
        h = h - 2 * (h @ ui) @ ui.t()
    return h


def orthogonality_penalty(u: torch.Tensor) -> torch.Tensor:
    """HRA's regulariser ``‖ÛᵀÛ − I‖²_F`` over the normalised columns Û of u (a scalar)."""
    unit = u / u.norm(dim=0, keepdim=True)
    gram = unit.t() @ unit
    return (gram - torch.eye(gram.shape[0], device=u.device, dtype=gram.dtype)).pow(2).sum()


def init_hra_(u: torch.Tensor, symmetric: bool = True) -> None:
    """PEFT's init: even r pairs each column with a copy of itself, so ``H = I`` at the start."""
    with torch.no_grad():
        r = u.shape[1]
        if symmetric and r % 2 == 0:
            half = torch.empty(u.shape[0], r // 2, dtype=u.dtype, device=u.device)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u.copy_(half.repeat_interleave(2, dim=1))
        else:
            if symmetric:
                warnings.warn("HRA's symmetric (identity) initialisation needs an even r; using a random init")
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))


# -- config -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class HraConfig(AdapterConfig):
    """HRA settings (PEFT's ``HRAConfig``: r, apply_GS, init_weights).

    ``orth_reg_weight``: weight of the orthogonality regulariser; add :func:`orthogonality_loss` of the
    model to the training loss. ``alpha`` and ``alpha_pattern`` are unused by HRA.
    """

    apply_GS: bool = False
    init_weights: bool = True
    orth_reg_weight: float = 0.0
    adapter_dtype: torch.dtype | None = None

    method: ClassVar[str] = "hra"
    peft_type: ClassVar[str] = "HRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.orth_reg_weight, bool) or not isinstance(self.orth_reg_weight, (int, float)) \
                or self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")
        self.adapter_dtype = resolve_adapter_dtype(self.adapter_dtype)

    def create_adapter(self, name: str, base: nn.Module) -> AdapterModule:
        r = self.rank_for(name)
        self._check_rank(f"rank for {name}", r)
        if is_hf_conv1d(base) or not isinstance(base, (nn.Linear, NF4Linear, nn.Conv2d)):
            raise TargetError(f"HRA adapts nn.Linear (also 4-bit) and nn.Conv2d; {name!r} is a {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise TargetError(f"HRA cannot adapt {name!r}: a Conv2d with groups={base.groups} (needs groups=1)")
        return HraLayer(base, r, apply_GS=self.apply_GS, init_weights=self.init_weights,
                        orth_reg_weight=self.orth_reg_weight, adapter_dtype=self.adapter_dtype)

    def finalize(self, model: nn.Module, adapters: list) -> None:
        """All HRA layers of the model compute their WY factors together, once per forward pass."""
        attach_factor_cache(model, adapters)


# -- module -----------------------------------------------------------------------------------------
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
            return lora_linear(x.to(dtype), weight, bias, down, up, 1.0)


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``orth_reg_weight · ‖ÛᵀÛ − I‖²`` over the model's HRA layers; add it to the training loss."""
    terms = [m.orthogonality_loss() for m in model.modules() if isinstance(m, HraLayer) and m.orth_reg_weight]
    return torch.stack(terms).sum() if terms else torch.zeros(())
