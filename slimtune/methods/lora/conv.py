"""LoCon: LoRA on ``nn.Conv1d`` / ``nn.Conv2d``.

``y = base(x) + s · up(down(drop(x)))``: ``down`` is a convolution to r channels with the base's kernel,
stride, padding and dilation (weight ``[r, c_in, *k]``, PEFT's ``lora_A.weight``); ``up`` a 1x1 convolution
to the base's output channels with the base's groups (weight ``[c_out, r / groups, 1(, 1)]``,
``lora_B.weight``) — PEFT's layout, so checkpoints move both ways. The scaling multiplies the tiny up weight,
not the activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.lowrank import conv_low_rank_forward
from ...core.module import AdapterModule
from ...errors import ConfigError, SlimtuneError
from .linear import LoraMixin
from .math import _CONV, init_lora_, locon_delta_weight


class LoraConv(LoraMixin, AdapterModule):
    """LoRA over a frozen ``nn.Conv1d`` / ``nn.Conv2d``."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, (nn.Conv1d, nn.Conv2d)):
            raise ConfigError(f"LoraConv needs nn.Conv1d or nn.Conv2d, got {type(base_layer).__name__}")
        groups = base_layer.groups
        if r % groups:
            raise ConfigError(f"rank {r} must be divisible by the conv's groups={groups} (PEFT's layout)")
        self._setup(r, alpha, dropout, rslora)
        weight = base_layer.weight
        kw = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        kernel = tuple(weight.shape[2:])
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.Parameter(torch.empty(r, self.in_channels, *kernel, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_channels, r // groups, *(1,) * len(kernel), **kw))
        init_lora_(self.lora_A, self.lora_B, init)
        self._conv = _CONV[len(kernel)]

    def delta_weight(self) -> torch.Tensor:
        if self.base_layer.groups != 1:
            raise SlimtuneError("merging LoRA into a grouped convolution (groups > 1) is not possible: "
                                "the update is not block-diagonal")
        return locon_delta_weight(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        xd = F.dropout(x, self.dropout_p, training=True) if self.training and self.dropout_p > 0 else x
        return conv_low_rank_forward(x, xd, self.base_layer, self.lora_A, self.lora_B * self.scaling)
