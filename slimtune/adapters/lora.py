"""LoRA (Hu et al.) and rsLoRA: ``y = base(x) + s · B A drop(x)``, ``s = alpha / r`` (rsLoRA: ``alpha / √r``).

Shapes: A ``[r, d_in]``, B ``[d_out, r]`` — PEFT's ``lora_A.weight`` / ``lora_B.weight``. The training
path for dense Linear bases is :class:`slimtune.kernels.lora.LoraLinearFunction`; the plain composition
:func:`lora_linear_reference` below is its reference. LoRA on convolutions lives in ``locon.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, name_matches, resolve_adapter_dtype
from ..errors import ConfigError
from ..kernels.lora import lora_linear
from ..quant.frozen import base_weight_operand, is_quantized, weight_dtype, weight_shape
from ..targeting import is_hf_conv1d
from .base import AdapterModule

INITS = ("default", "gaussian")


# -- the math ---------------------------------------------------------------------------------------
def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def init_lora_(lora_a: torch.Tensor, lora_b: torch.Tensor, init: str) -> None:
    """``default``: A kaiming-uniform (a=√5, as nn.Linear), B zero; ``gaussian``: A ~ N(0, 1/r²), B zero."""
    with torch.no_grad():
        if init == "default":
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(lora_a, std=1.0 / lora_a.shape[0])
        else:
            raise ConfigError(f"unknown LoRA init {init!r}; choose from {INITS}")
        nn.init.zeros_(lora_b)


def lora_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s · B A``, ``[d_out, d_in]``, in float32 or wider. Used to merge, never to train."""
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    return (lora_b.to(dtype) @ lora_a.to(dtype)) * scaling


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                          dropout: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """The plain composition ``x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` through PyTorch's own autograd."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropout(x), lora_a), lora_b)


# -- config -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA settings. ``alpha``/``dropout``/``rslora`` are PEFT's ``lora_alpha``/``lora_dropout``/``use_rslora``.

    ``adapter_dtype``: dtype of the trainable A/B; ``None`` keeps the base weight's dtype (bf16 bases give
    bf16 adapters and optimizer state, as PEFT with ``autocast_adapter_dtype=False``); ``torch.float32``
    keeps fp32 master weights, cast to the activation dtype for each GEMM. ``use_dora``: DoRA (PEFT's
    ``use_dora``; see ``dora.py``), the magnitude vector taking the adapter dtype too.

    ``dora_recompute`` — what a DoRA Linear keeps for its magnitude gradient (``Σ dy ⊙ z``, z ``[tokens, d_out]``):
    ``"auto"`` (default): a bias-free bf16/fp32 layer keeps its own output where that output outlives the forward
    pass anyway (the next op saves it: SiLU its gate, the product its up, attention its v — then it costs
    nothing), and otherwise keeps nothing and recomputes z in backward (one more base GEMM). Which case applies
    is measured once, on the first training forward (it recomputes everywhere; see
    :class:`slimtune.adapters.dora.OutputProbe`), so activation memory stays LoRA's. True / False: recompute in
    every DoRA layer / never (False keeps the output, or z, everywhere: fastest, more memory); or — matched as
    ``target_modules`` is (:func:`slimtune.config.name_matches`) — a list of module-name suffixes or a regex
    string (full match; ``"auto"`` is reserved) selecting the layers that recompute. Layers with a bias, fp16
    outputs or dropout keep z unless told to recompute. slimtune-only, not written to PEFT's config.
    """

    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    adapter_dtype: torch.dtype | None = None
    use_dora: bool = False
    dora_recompute: bool | str | list[str] = "auto"

    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"unknown LoRA init {self.init!r}; choose from {INITS}")
        self.adapter_dtype = resolve_adapter_dtype(self.adapter_dtype)
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got {self.use_dora!r}")
        spec = self.dora_recompute
        if isinstance(spec, tuple):
            spec = self.dora_recompute = list(spec)
        if spec == "auto":
            pass
        elif isinstance(spec, str):
            try:
                re.compile(spec)
            except re.error as exc:
                raise ConfigError(f"dora_recompute is not a valid regex ({exc}): {spec!r}") from None
        elif isinstance(spec, list):
            if not all(isinstance(entry, str) and entry for entry in spec):
                raise ConfigError(f"dora_recompute must list module-name suffixes (non-empty strings), got {spec!r}")
        elif not isinstance(spec, bool):
            raise ConfigError("dora_recompute must be 'auto', True, False, a list of module-name suffixes or a "
                              f"regex string, got {spec!r}")

    def recompute_for(self, name: str) -> bool | None:
        """Whether the DoRA layer at qualified module ``name`` recomputes z (``dora_recompute``); None: decided
        by measurement (``"auto"``)."""
        spec = self.dora_recompute
        if spec == "auto":
            return None
        return spec if isinstance(spec, bool) else name_matches(spec, name)

    def finalize(self, model: nn.Module, adapters: list) -> None:
        """``dora_recompute="auto"``: one :class:`~slimtune.adapters.dora.OutputProbe` for the model's DoRA layers,
        resolved when the model's forward returns."""
        if self.use_dora and self.dora_recompute == "auto":
            from .dora import attach_output_probe  # local: dora imports this file

            attach_output_probe(model, adapters)

    def create_adapter(self, name: str, base: nn.Module) -> AdapterModule:
        from .locon import LoraConv  # local: locon imports this file

        r, alpha = self.rank_for(name), self.alpha_for(name)
        self._check_rank(f"rank for {name}", r)
        kwargs = dict(r=r, alpha=alpha, dropout=self.dropout, rslora=self.rslora, init=self.init,
                      adapter_dtype=self.adapter_dtype)
        if self.use_dora:
            from .dora import DoraConv, DoraLinear  # local: dora imports this file

            layer = (DoraConv if isinstance(base, (nn.Conv1d, nn.Conv2d)) else DoraLinear)(base, **kwargs)
            layer.recompute = self.recompute_for(name)
            return layer
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            return LoraConv(base, **kwargs)
        return LoraLinear(base, **kwargs)


# -- module -----------------------------------------------------------------------------------------
_NO_CONTEXT = contextlib.nullcontext()


def compute_setting(x: torch.Tensor) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """The dtype adapter GEMMs run in (autocast's when it is on, else x's), and a context that turns autocast
    off around our own kernels (a no-op context when autocast is off: the common, cheap path)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device), torch.autocast(device, enabled=False)
    return x.dtype, _NO_CONTEXT


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
    NF4 Linear: slimtune's ``NF4Linear`` or bitsandbytes' ``Linear4bit``)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoraLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        dtype, context = compute_setting(x)
        base = self.base_layer
        weight, bias = base_weight_operand(base), base.bias
        if self.fan_in_fan_out:
            weight = weight.t()
        if x.dtype != dtype:
            x = x.to(dtype)
        if not is_quantized(weight) and weight.dtype != dtype:
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        p = self.dropout_p if self.training else 0.0
        with context:
            return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling, p)
