"""LoHa <-> PEFT ``LoHaConfig`` fields (``hada_*`` tensors)."""
from __future__ import annotations

from typing import Any

from ...core.config import AdapterConfig
from ...core.module import AdapterModule
from ...core.peft_format import (LYCORIS_FIELDS, PeftFormat, lycoris_checker, lycoris_common_from_peft,
                                 lycoris_common_to_peft, require_bools)
from .config import LohaConfig
from .module import LohaLayer


def loha_to_peft(config: AdapterConfig, adapters: list[tuple[str, AdapterModule]]) -> dict[str, Any]:
    assert isinstance(config, LohaConfig)
    return {**lycoris_common_to_peft(config), "init_weights": bool(config.init_weights)}


def loha_from_peft(fields: dict[str, Any]) -> LohaConfig:
    require_bools(fields, "init_weights")
    return LohaConfig(**lycoris_common_from_peft(fields), init_weights=fields["init_weights"])


LOHA_FORMAT = PeftFormat(LohaConfig, LYCORIS_FIELDS, loha_to_peft, loha_from_peft, lycoris_checker(LohaLayer, "LoHa"))
