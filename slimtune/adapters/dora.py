"""DoRA (Liu et al., weight-decomposed LoRA): ``LoraConfig(use_dora=True)``, PEFT-compatible.

Each output row (output channel, for convolutions) of the LoRA-updated weight is rescaled to a learned
magnitude: ``W' = g ⊙ (W + s·B A)``, ``g = m / ‖W + s·B A‖_row``, the norm treated as a constant in backward
(DoRA's paper, §4.3; PEFT). The bias is added unscaled. m is PEFT's ``lora_magnitude_vector``: ``[d_out]`` on a
Linear / transformers ``Conv1D``, ``[1, c_out, 1(, 1)]`` on a Conv1d / Conv2d; it starts at the row norms of W,
so a fresh DoRA layer computes what its base does.

The norm comes from :func:`slimtune.kernels.dora.factored_row_norm_sq` once per forward — O(d_out·d_in·r) work,
``[d_out, r]`` / ``[r, r]`` intermediates, never the dense ``B A`` — with ``‖W‖²_row`` cached (W is frozen; the
cache is keyed on W's storage and version and dropped on merge, unmerge and load). The Linear training path is
:func:`slimtune.kernels.dora.dora_linear`; convolutions run LoCon's two convolutions and the same scale Function
along the channel axis. Grouped convolutions are refused (the update is not a dense ``[c_out, c_in·k]`` matrix).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..errors import ConfigError
from ..kernels.dora import dora_linear, dora_scale, factored_row_norm_sq, weight_row_norm_sq
from .locon import LoraConv
from .lora import LoraLinear, compute_setting


class DoraMixin:
    """The magnitude vector, the norm (and its cache), DoRA's merge and the PEFT key, for Linear and conv."""

    magnitude: nn.Parameter
    use_dora = True
    recompute = False  # LoraConfig.dora_recompute: recompute the pre-scale product in backward instead of saving it

    # -- 2-D views: weight rows are output units -------------------------------------------------------------
    def weight2d(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the base's layout -> ``[d_out, d_in]`` (a view)."""
        if getattr(self, "fan_in_fan_out", False):
            return weight.t()
        return weight.reshape(weight.shape[0], -1)

    def _from2d(self, weight2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return weight2d.t() if getattr(self, "fan_in_fan_out", False) else weight2d.reshape(like.shape)

    def factors2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ``[r, d_in]``, B ``[d_out, r]``) as matrices (conv kernels flattened)."""
        return self.lora_A.reshape(self.lora_A.shape[0], -1), self.lora_B.reshape(self.lora_B.shape[0], -1)

    def _setup_dora(self, shape: tuple[int, ...]) -> None:
        self._weight_sq_cache: tuple[tuple, torch.Tensor] | None = None
        self._merged_norm: torch.Tensor | None = None
        norm = self.weight_norm(self.weight2d(self.base_weight.detach()))
        self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype).reshape(shape))

    # -- the norm ------------------------------------------------------------------------------------------
    def cached_weight_row_norm_sq(self) -> torch.Tensor:
        """``‖W‖²_row`` ``[d_out]`` fp32, recomputed only when the base weight's storage or version changes."""
        w = self.base_weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._weight_sq_cache is None or self._weight_sq_cache[0] != key:
            self._weight_sq_cache = (key, weight_row_norm_sq(self.weight2d(w.detach())))
        return self._weight_sq_cache[1]

    def invalidate_norm_cache(self) -> None:
        self._weight_sq_cache = None

    @torch.no_grad()
    def weight_norm(self, weight2d: torch.Tensor) -> torch.Tensor:
        """``‖W + s·B A‖_row`` ``[d_out]`` fp32 (no grad), factored; ``weight2d``: W in the compute dtype."""
        a, b = self.factors2d()
        return factored_row_norm_sq(weight2d, a, b, self.scaling, self.cached_weight_row_norm_sq()).sqrt_()

    # -- merge: W' = g·(W + s·B A); the norm of the unmerged weight is kept for unmerge -------------------------
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        v = self.weight2d(weight) + self.weight2d(self.delta_weight().to(weight.dtype))  # dense: merging only
        self._merged_norm = v.norm(dim=1)
        g = self.magnitude.detach().reshape(-1).to(weight.dtype) / self._merged_norm
        return self._from2d(g[:, None] * v, weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        g = self.magnitude.detach().reshape(-1).to(weight.dtype) / self._merged_norm.to(weight.dtype)
        w2 = self.weight2d(weight) / g[:, None] - self.weight2d(self.delta_weight().to(weight.dtype))
        return self._from2d(w2, weight)

    def merge(self) -> None:
        super().merge()
        self.invalidate_norm_cache()

    def unmerge(self) -> None:
        super().unmerge()
        self._merged_norm = None
        self.invalidate_norm_cache()

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().load_peft_tensors(name, tensors)
        self.invalidate_norm_cache()

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().peft_parameters(), "lora_magnitude_vector": self.magnitude}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoraLinear(DoraMixin, LoraLinear):
    """DoRA over a frozen ``nn.Linear`` (or transformers ``Conv1D``)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora, init, adapter_dtype)
        self._setup_dora((self.out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"DoraLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        dtype, context = compute_setting(x)
        weight, bias = self.weight2d(self.base_layer.weight).to(dtype), self.base_layer.bias
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        p = self.dropout_p if self.training else 0.0
        with context:
            norm = self.weight_norm(weight)
            args = (x, weight, bias, self.lora_A, self.lora_B, self.magnitude, norm, self.scaling, p)
            if self.recompute and torch.is_grad_enabled():
                # keeps only x (the same tensor) across the step; z = x Wᵀ + s·lora is rebuilt in backward
                return torch.utils.checkpoint.checkpoint(dora_linear, *args, use_reentrant=False)
            return dora_linear(*args)


class DoraConv(DoraMixin, LoraConv):
    """DoRA over a frozen ``nn.Conv1d`` / ``nn.Conv2d`` (groups 1): LoCon's factors, norm per output channel."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        if getattr(base_layer, "groups", 1) != 1:
            raise ConfigError(f"DoRA on a grouped convolution (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer, r, alpha, dropout, rslora, init, adapter_dtype)
        self._setup_dora((1, self.out_channels, *(1,) * (base_layer.weight.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        base = self.base_layer
        dtype, context = compute_setting(x)
        p = self.dropout_p if self.training else 0.0
        with context:
            x, weight = x.to(dtype), base.weight.to(dtype)
            bias = base.bias.to(dtype) if base.bias is not None else None
            xd = F.dropout(x, p, training=True) if p > 0 else x
            geometry = (base.stride, base.padding, base.dilation)
            h = self._conv(xd, self.lora_A.to(dtype), None, *geometry)
            z = base._conv_forward(xd, weight, None) + self._conv(h, (self.lora_B * self.scaling).to(dtype))
            norm = self.weight_norm(self.weight2d(weight))
            out = dora_scale(z, self.magnitude, norm, bias, dim=1)
            if p > 0:  # PEFT's x Wᵀ + (g−1)·drop(x) Wᵀ: the rest of the base term on the dropped part
                out = out + base._conv_forward(x - xd, weight, None)
            return out
