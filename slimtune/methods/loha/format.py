"""LoHa <-> PEFT ``LoHaConfig`` fields (``hada_*`` tensors)."""
from __future__ import annotations

from typing import Any

from ...core.config import AdapterConfig
from ...core.module import AdapterModule
from ...core.peft_format import (LYCORIS_FIELDS, PeftFormat, lycoris_common_from_peft, lycoris_common_to_peft,
                                 lycoris_mismatch)
from ...errors import CheckpointError
from .config import LohaConfig
from .module import LohaLayer


def loha_to_peft(config: AdapterConfig, adapters: list[tuple[str, AdapterModule]]) -> dict[str, Any]:
    assert isinstance(config, LohaConfig)
    return {**lycoris_common_to_peft(config), "init_weights": bool(config.init_weights)}


def loha_from_peft(fields: dict[str, Any]) -> LohaConfig:
    if not isinstance(fields.get("init_weights"), bool):
        raise CheckpointError(f"init_weights must be true or false, got {fields.get('init_weights')!r}")
    return LohaConfig(**lycoris_common_from_peft(fields), init_weights=fields["init_weights"])


def loha_check_adapter(config: AdapterConfig, name: str, adapter: AdapterModule) -> str | None:
    if not isinstance(adapter, LohaLayer):
        return f"{name} holds a {type(adapter).__name__}, not a LoHa adapter"
    assert isinstance(config, LohaConfig)
    return lycoris_mismatch(config, name, adapter)


LOHA_FORMAT = PeftFormat(LohaConfig, LYCORIS_FIELDS, loha_to_peft, loha_from_peft, loha_check_adapter)
