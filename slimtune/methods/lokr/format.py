"""LoKr <-> PEFT ``LoKrConfig`` fields (``lokr_*`` tensors)."""
from __future__ import annotations

from typing import Any

from ...core.config import AdapterConfig
from ...core.module import AdapterModule
from ...core.peft_format import (LYCORIS_FIELDS, PeftFormat, lycoris_checker, lycoris_common_from_peft,
                                 lycoris_common_to_peft, require_bools)
from ...errors import CheckpointError
from .config import LokrConfig
from .math import is_lokr_init
from .module import LokrLayer

_LOKR_FIELDS: dict[str, Any] = {
    **LYCORIS_FIELDS,
    "decompose_both": False,
    "decompose_factor": -1,
    "rank_dropout_scale": False,
}


def lokr_to_peft(config: AdapterConfig, adapters: list[tuple[str, AdapterModule]]) -> dict[str, Any]:
    assert isinstance(config, LokrConfig)
    return {**lycoris_common_to_peft(config), "init_weights": config.init_weights,
            "decompose_both": bool(config.decompose_both), "decompose_factor": int(config.decompose_factor),
            "rank_dropout_scale": bool(config.rank_dropout_scale)}


def lokr_from_peft(fields: dict[str, Any]) -> LokrConfig:
    init = fields.get("init_weights")
    if not is_lokr_init(init):
        raise CheckpointError(f"init_weights must be true, false or 'lycoris', got {init!r}")
    require_bools(fields, "decompose_both", "rank_dropout_scale")
    factor = fields.get("decompose_factor")
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise CheckpointError(f"decompose_factor must be an integer, got {factor!r}")
    return LokrConfig(**lycoris_common_from_peft(fields), init_weights=init,
                      decompose_both=fields["decompose_both"], decompose_factor=factor,
                      rank_dropout_scale=fields["rank_dropout_scale"])


LOKR_FORMAT = PeftFormat(LokrConfig, _LOKR_FIELDS, lokr_to_peft, lokr_from_peft, lycoris_checker(LokrLayer, "LoKr"))
