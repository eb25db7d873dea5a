"""The layers a rank allocation measures, each seen as one matrix ``W [d_out, d_in]`` and the operator it applies.

A Linear (also transformers' ``Conv1D`` and 4-bit layers) is ``y = x Wᵀ``: ``d_in`` input features. A convolution
is the same matrix over patches: ``W [c_out, c_in/groups · ∏kernel]`` (the weight flattened after its first axis),
applied by the convolution itself. The site a view hooks is the layer itself in a plain model, or the adapter that
holds it in an adapted one (then the matrix is the effective weight ``W + ΔW``).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.frozen import base_weight_operand, materialize, weight_shape
from ..core.inject import adapter_modules
from ..core.targeting import find_targets, is_hf_conv1d
from ..errors import ConfigError

_CONV = {1: F.conv1d, 2: F.conv2d}
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}


def _precise(x: torch.Tensor) -> torch.dtype:
    """The dtype the estimators reduce in: float32, or float64 for float64 activations."""
    return torch.promote_types(x.dtype, torch.float32)


@dataclasses.dataclass(frozen=True)
class LayerView:
    """One measured layer: ``name`` (qualified), ``site`` (the module whose forward is hooked) and ``base`` (the
    frozen layer that gives the geometry)."""

    name: str
    site: nn.Module
    base: nn.Module

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, (nn.Conv1d, nn.Conv2d))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of a perturbation of the weight: ``[d_out, d_in]`` for linear-like layers (Conv1D's stored
        ``[d_in, d_out]`` transposed), the convolution weight's own shape otherwise."""
        shape = tuple(weight_shape(self.base))
        return (shape[1], shape[0]) if is_hf_conv1d(self.base) else shape

    @property
    def d_out(self) -> int:
        return self.weight_shape[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def numel(self) -> int:
        """Parameters of a full fine-tune of this weight."""
        return self.d_out * self.d_in

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's linear map with ``weight`` (shape :attr:`weight_shape`) in place of its own, no bias."""
        weight = weight.to(x.dtype)
        if not self.is_conv:
            return F.linear(x, weight)
        b = self.base
        return _CONV[weight.dim() - 2](x, weight, None, b.stride, b.padding, b.dilation, b.groups)

    def weight_gradient(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """``∂L/∂W`` as a matrix ``[d_out, d_in]`` (float32, or float64 for float64 inputs) from the layer input ``x``
        and ``∂L/∂y``."""
        if not self.is_conv:
            g, xs = self.tokens(grad_out, x)
            return g.t() @ xs
        b = self.base
        dtype = _precise(x)
        grad = _CONV_WEIGHT_GRAD[len(self.weight_shape) - 2](x.to(dtype), self.weight_shape, grad_out.to(dtype),
                                                             b.stride, b.padding, b.dilation, b.groups)
        return grad.reshape(self.d_out, self.d_in)

    def tokens(self, grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g [N, d_out], X [N, d_in])`` (float32, or float64 for float64 inputs) with ``∂L/∂W = gᵀ X``: one row
        per token (a Linear) or per output position (a convolution: X holds the input patches). Convolutions with
        ``groups > 1`` have no such form (:class:`ValueError`)."""
        dtype = _precise(x)
        if not self.is_conv:
            return grad_out.reshape(-1, self.d_out).to(dtype), x.reshape(-1, x.shape[-1]).to(dtype)
        b = self.base
        if b.groups != 1:
            raise ValueError(f"{self.name}: a grouped convolution (groups={b.groups}) has no per-patch matrix form")
        if isinstance(b, nn.Conv1d):  # as a 2-d convolution of height 1
            x, grad_out = x.unsqueeze(-2), grad_out.unsqueeze(-2)
            kernel, dilation, padding, stride = ((1,) + tuple(v) for v in (b.kernel_size, b.dilation, b.padding,
                                                                          b.stride))
        else:
            kernel, dilation, padding, stride = b.kernel_size, b.dilation, b.padding, b.stride
        if x.dim() == 3:  # unbatched input, as nn.Conv2d accepts it
            x, grad_out = x.unsqueeze(0), grad_out.unsqueeze(0)
        patches = F.unfold(x.to(dtype), kernel, dilation=dilation, padding=padding, stride=stride)  # [B, d_in, P]
        return (grad_out.to(dtype).flatten(2).transpose(1, 2).reshape(-1, self.d_out),
                patches.transpose(1, 2).reshape(-1, self.d_in))

    def weight_norm(self) -> float:
        """``‖W‖_F`` of the base weight (a 4-bit weight dequantised for the moment)."""
        weight = materialize(base_weight_operand(self.base), torch.float32)
        return float(weight.detach().float().norm())


def find_layers(model: nn.Module, config: AdapterConfig | None = None) -> list[LayerView]:
    """The layers to measure: those ``config`` targets in a plain model (the same selection and errors as
    :func:`slimtune.adapt`), or every adapter's layer in an adapted model (``config`` then unused)."""
    adapted = adapter_modules(model)
    if adapted:
        return [LayerView(name, adapter, adapter.base_layer) for name, adapter in adapted]
    if config is None:
        raise ConfigError("a model without adapters needs an adapter config to say which layers to measure")
    return [LayerView(name, module, module) for name, module in find_targets(model, config)]
