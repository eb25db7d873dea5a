"""LoKr's config: PEFT's ``LoKrConfig`` fields, and the builder the registry calls."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ...core.config import check_bool
from ...core.structured_adapter import StructuredConfig, check_structured_target
from ...errors import ConfigError
from .math import is_lokr_init
from .module import LokrLayer


@dataclasses.dataclass
class LokrConfig(StructuredConfig):
    """LoKr settings: PEFT's ``LoKrConfig`` (r, alpha, rank_dropout, module_dropout, use_effective_conv2d,
    decompose_both, decompose_factor, rank_dropout_scale, init_weights, rank_pattern, alpha_pattern), plus ``path``
    and ``adapter_dtype`` (:class:`~slimtune.core.structured_adapter.StructuredConfig`)."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    method: ClassVar[str] = "lokr"
    peft_type: ClassVar[str] = "LOKR"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_lokr_init(self.init_weights):
            raise ConfigError(f"init_weights must be true, false or 'lycoris', got {self.init_weights!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor >= 1):
            raise ConfigError(f"decompose_factor must be -1 (automatic) or an integer >= 1, got {factor!r}")
        check_bool("decompose_both", self.decompose_both)
        check_bool("rank_dropout_scale", self.rank_dropout_scale)


def build_lokr(config: LokrConfig, name: str, base: nn.Module) -> LokrLayer:
    """The LoKr adapter for the layer ``base`` at qualified name ``name``."""
    check_structured_target("LoKr", name, base)
    return LokrLayer(base, **config.layer_kwargs(name), decompose_both=config.decompose_both,
                     decompose_factor=config.decompose_factor, rank_dropout_scale=config.rank_dropout_scale,
                     init_weights=config.init_weights)
