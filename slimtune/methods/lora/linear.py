"""LoRA (Hu et al.) and rsLoRA: ``y = base(x) + s · B A drop(x)``, ``s = alpha / r`` (rsLoRA: ``alpha / √r``).

Shapes: A ``[r, d_in]``, B ``[d_out, r]`` — PEFT's ``lora_A.weight`` / ``lora_B.weight``. The training
path is :class:`slimtune.core.lowrank.LowRankLinearFunction` (the low-rank product LoRA shares with HRA, DoRA and
LoHa); :func:`~.math.lora_linear_reference` is its reference. LoRA on convolutions (LoCon) is in ``conv.py``.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Sequence

import torch
from torch import nn

from ...core.compute import cast, cast_optional, compute_setting
from ...core.explain import Choice, lowrank_backward_choice
from ...core.frozen import WeightOperand, base_weight_operand, is_quantized, weight_dtype, weight_shape
from ...core.lowrank import lowrank_linear
from ...core.lowrank_group import grouped_lowrank_linear
from ...core.module import AdapterModule
from ...core.siblings import SiblingGroup
from ...core.stacked_rows import runs_stacked, stacked_lowrank_linear, stacked_rows
from ...core.targeting import is_hf_conv1d
from .math import init_lora_, lora_delta_weight, lora_scaling


class LoraMixin:
    """Fields and helpers shared by LoRA on Linear and on convolutions."""

    def _setup(self, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.dropout_p = float(dropout)
        self.scaling = lora_scaling(alpha, r, rslora)

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout_p}"


class LoraLinear(LoraMixin, AdapterModule):
    """LoRA over a frozen ``nn.Linear`` (or transformers ``Conv1D``, weight stored ``[d_in, d_out]``, or a 4-bit
    NF4 Linear: slimtune's ``NF4Linear`` or bitsandbytes' ``Linear4bit``). ``siblings``: the
    :class:`~slimtune.core.siblings.SiblingGroup` of the LoRA layers beside it in its parent (set by ``adapt``),
    through which layers that read the same input run as one Function."""

    siblings: SiblingGroup | None = None
    #: a chain of these layers may hold its frozen weights and A's in one buffer (:mod:`slimtune.core.stacked_rows`)
    stacks_rows = True
    #: a chain of two may be stacked wide instead (:mod:`slimtune.core.wide_rows`)
    stacks_wide = True
    #: its Functions (:func:`~slimtune.core.lowrank.lowrank_linear`, the grouped one) keep a recipe for an offered
    #: input themselves (:func:`~slimtune.core.rebuild.keep_input`): no saved-tensor hooks around the call, and none
    #: for a member that takes its output from its sibling group
    keeps_recipes_itself = True
    #: under ``torch.compile`` a learnt chain of these layers runs as one Function too (:mod:`slimtune.core.siblings`)
    fuses_when_compiled = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer)
        self._setup(r, alpha, dropout, rslora)
        self.fan_in_fan_out = is_hf_conv1d(base_layer)
        shape = weight_shape(base_layer)
        d_out, d_in = (shape[1], shape[0]) if self.fan_in_fan_out else shape
        kw = dict(device=base_layer.weight.device, dtype=adapter_dtype or weight_dtype(base_layer))
        self.in_features, self.out_features = d_in, d_out
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **kw))
        init_lora_(self.lora_A, self.lora_B, init)

    def delta_weight(self) -> torch.Tensor:
        delta = lora_delta_weight(self.lora_A, self.lora_B, self.scaling)
        return delta.t() if self.fan_in_fan_out else delta

    def explain(self, x: torch.Tensor) -> list[Choice]:
        """The backward order of dA / dB for x's token count (:func:`~slimtune.core.lowrank.choose_backward`)."""
        tokens = x.numel() // x.shape[-1]
        return [lowrank_backward_choice(tokens, self.in_features, self.out_features, self.r, x.dtype)]

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float, AbstractContextManager]:
        """``(x, bias, p, context)``: x and the base's bias in the compute dtype, this call's dropout probability, and
        the context that turns autocast off around the Function; a clear error for an input of the wrong width."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        dtype, context = compute_setting(x)
        bias = cast_optional(self.base_layer.bias, dtype)
        return cast(x, dtype), bias, (self.dropout_p if self.training else 0.0), context

    def weight_operand(self, dtype: torch.dtype) -> WeightOperand:
        """The base weight as the Functions take it: ``[d_out, d_in]`` in ``dtype`` (a view for transformers'
        ``Conv1D``), or a 4-bit handle."""
        weight = base_weight_operand(self.base_layer)
        if self.fan_in_fan_out:
            weight = weight.t()
        return weight if is_quantized(weight) else cast(weight, dtype)

    # -- siblings: the layers of one parent that read the same x, as one Function (core.siblings) ----------------
    @staticmethod
    def runs_on_rows(chain: Sequence[LoraLinear], x: torch.Tensor) -> bool:
        """Whether ``chain``, stacked on rows in x's dtype (:mod:`~slimtune.core.stacked_rows`), runs on them for x in
        the compute dtype: no member has a bias or dropout in training."""
        return all(m.base_layer.bias is None and not (m.training and m.dropout_p > 0) for m in chain)

    @staticmethod
    def run_together(chain: Sequence[LoraLinear], x: torch.Tensor,
                     on_backward: Callable[[], None] | None) -> tuple[torch.Tensor, ...] | None:
        """Every member's output on x through :func:`~slimtune.core.lowrank_group.grouped_lowrank_linear` (LoRA
        never declines a chain that :mod:`~slimtune.core.siblings` found runnable)."""
        first = chain[0]
        xc, _, _, context = first._inputs(x)
        dtype = xc.dtype
        rows = stacked_rows(first, len(chain))  # stacked by compile_layers (core.stacked_rows)
        if runs_stacked(xc, rows, chain):
            with context:
                return stacked_lowrank_linear(xc, chain, rows, on_backward)
        weights = [m.weight_operand(dtype) for m in chain]
        biases = [cast_optional(m.base_layer.bias, dtype) for m in chain]
        with context:
            return grouped_lowrank_linear(xc, weights, biases, [m.lora_A for m in chain], [m.lora_B for m in chain],
                                          first.scaling, on_backward)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output when this call runs no adapter code of its own: the base layer's (disabled or merged), or the
        one its sibling group computed (:meth:`~slimtune.core.siblings.SiblingGroup.take`); else None."""
        if self.disabled or self.merged:
            return self.base_layer(x)
        siblings = self.siblings
        return siblings.take(self, x) if siblings is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._shortcut(x)
        if y is not None:
            return y
        xc, bias, p, context = self._inputs(x)
        rows = stacked_rows(self, 1)  # a layer in no chain (o, down) stacked by compile_layers (core.stacked_rows)
        with context:
            if runs_stacked(xc, rows, (self,)):
                y = stacked_lowrank_linear(xc, (self,), rows)[0]
            else:
                y = lowrank_linear(xc, self.weight_operand(xc.dtype), bias, self.lora_A, self.lora_B, self.scaling, p)
        if self.siblings is not None:
            self.siblings.note(self, x, y)
        return y
