"""LoHa's config: PEFT's ``LoHaConfig`` fields, and the builder the registry calls."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ...core.config import check_bool
from ...core.structured_adapter import StructuredConfig, check_structured_target
from .module import LohaLayer


@dataclasses.dataclass
class LohaConfig(StructuredConfig):
    """LoHa settings: PEFT's ``LoHaConfig`` (r, alpha, rank_dropout, module_dropout, use_effective_conv2d,
    init_weights, rank_pattern, alpha_pattern), plus ``path`` and ``adapter_dtype``
    (:class:`~slimtune.core.structured_adapter.StructuredConfig`)."""

    init_weights: bool = True

    method: ClassVar[str] = "loha"
    peft_type: ClassVar[str] = "LOHA"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("init_weights", self.init_weights)


def build_loha(config: LohaConfig, name: str, base: nn.Module) -> LohaLayer:
    """The LoHa adapter for the layer ``base`` at qualified name ``name``."""
    check_structured_target("LoHa", name, base)
    return LohaLayer(base, **config.layer_kwargs(name), init_weights=config.init_weights)
