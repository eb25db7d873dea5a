"""LoRA's config (DoRA's too: ``use_dora=True``), and the builder the registry calls for plain LoRA."""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch
from torch import nn

from ...core.config import AdapterConfig, check_bool, check_probability, name_matches, resolve_adapter_dtype
from ...core.module import AdapterModule
from ...errors import ConfigError
from .conv import LoraConv
from .linear import LoraLinear
from .math import INITS


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA settings. ``alpha``/``dropout``/``rslora``/``init`` are PEFT's ``lora_alpha``/``lora_dropout``/
    ``use_rslora``/``init_lora_weights``, and take either name (``init``: ``"default"`` = PEFT's True, ``"random"`` =
    PEFT's False: B random too, so the adapter changes the output from the start, ``"gaussian"``, ``"nora"`` (NoRA,
    A's columns at unit norm) and ``"orthogonal"`` (even r; B A = 0 with neither zero), the last two for Linear layers
    only).

    ``adapter_dtype``: dtype of the trainable A/B; ``None`` keeps the base weight's dtype (bf16 bases give
    bf16 adapters and optimizer state, as PEFT with ``autocast_adapter_dtype=False``); ``torch.float32``
    keeps fp32 master weights, cast to the activation dtype for each GEMM. ``use_dora``: DoRA (PEFT's
    ``use_dora``; see ``slimtune/methods/dora/``), the magnitude vector taking the adapter dtype too.

    ``dora_recompute`` — what a DoRA Linear keeps for its magnitude gradient (``Σ dy ⊙ z``, z ``[tokens, d_out]``):
    ``"auto"`` (default): a bias-free bf16/fp32 layer keeps its own output where that output outlives the forward
    pass anyway (the next op saves it: SiLU its gate, the product its up, attention its v — then it costs
    nothing), and otherwise keeps nothing and recomputes z in backward (one more base GEMM). Which case applies
    is measured once, on the first training forward (it recomputes everywhere; see
    :class:`slimtune.methods.dora.probe.OutputProbe`), so activation memory stays LoRA's. True / False: recompute in
    every DoRA layer / never (False keeps the output, or z, everywhere: fastest, more memory); or — matched as
    ``target_modules`` is (:func:`slimtune.core.config.name_matches`) — a list of module-name suffixes or a regex
    string (full match; ``"auto"`` is reserved) selecting the layers that recompute. Layers with a bias, fp16
    outputs or dropout keep z unless told to recompute. slimtune-only, not written to PEFT's config.

    ``fan_in_fan_out`` (PEFT's) is accepted and not needed: each layer's weight layout is read from the layer
    (transformers ``Conv1D`` stores ``[d_in, d_out]``), as PEFT corrects a wrong flag.
    """

    dropout: float = 0.0
    rslora: bool = False
    init: str | bool = "default"
    adapter_dtype: torch.dtype | None = None
    use_dora: bool = False
    dora_recompute: bool | str | list[str] = "auto"
    fan_in_fan_out: bool = False

    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    peft_aliases: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout",
                                              "use_rslora": "rslora", "init_lora_weights": "init"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dropout = check_probability(self.spelled("dropout"), self.dropout)
        check_bool(self.spelled("rslora"), self.rslora)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        if isinstance(self.init, bool):  # PEFT's init_lora_weights: True (B = 0), False (B random too)
            self.init = "default" if self.init else "random"
        if self.init not in INITS:
            raise ConfigError(f"unknown LoRA init {self.init!r}; choose from {INITS} (or PEFT's True / False)")
        self.adapter_dtype = resolve_adapter_dtype(self.adapter_dtype)
        check_bool("use_dora", self.use_dora)
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

    def method_name(self) -> str:
        return "dora" if self.use_dora else "lora"

    def layer_kwargs(self, name: str) -> dict:
        """The keyword arguments of the LoRA/DoRA layer at qualified name ``name`` (patterns applied, rank checked)."""
        r, alpha = self.rank_for(name), self.alpha_for(name)
        self.check_rank(f"rank for {name}", r)
        return dict(r=r, alpha=alpha, dropout=self.dropout, rslora=self.rslora, init=self.init,
                    adapter_dtype=self.adapter_dtype)


def build_lora(config: LoraConfig, name: str, base: nn.Module) -> AdapterModule:
    """The LoRA adapter for ``base``: LoCon on a Conv1d / Conv2d, else LoRA on a Linear-like layer."""
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return LoraConv(base, **config.layer_kwargs(name))
    return LoraLinear(base, **config.layer_kwargs(name))
