"""HRA <-> PEFT ``HRAConfig`` fields (``hra_u`` tensors; PEFT's HRA has no rank_pattern)."""
from __future__ import annotations

from typing import Any

from ...core.config import AdapterConfig
from ...core.module import AdapterModule
from ...core.peft_format import PeftFormat, require_bools, require_targets, targets_to_peft
from ...errors import CheckpointError
from .config import HraConfig
from .module import HraLayer

_HRA_FIELDS: dict[str, Any] = {
    "apply_GS": False,
    "bias": "none",
    "exclude_modules": None,
    "init_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "modules_to_save": None,
    "r": 8,
    "target_modules": None,
}

def hra_to_peft(config: AdapterConfig, adapters: list[tuple[str, AdapterModule]]) -> dict[str, Any]:
    assert isinstance(config, HraConfig)
    if config.rank_pattern:
        raise CheckpointError("PEFT's HRA format has no rank_pattern: an HRA adapter with per-layer ranks "
                              "cannot be saved in it")
    return {"r": config.r, "apply_GS": bool(config.apply_GS), "init_weights": bool(config.init_weights),
            "target_modules": targets_to_peft(config.target_modules),
            "exclude_modules": targets_to_peft(config.exclude_modules), "bias": "none"}


def hra_from_peft(fields: dict[str, Any]) -> HraConfig:
    if fields.get("bias", "none") != "none":
        raise CheckpointError(f"bias={fields['bias']!r}: training base-layer biases is not supported")
    require_targets(fields)
    require_bools(fields, "apply_GS")
    return HraConfig(target_modules=fields["target_modules"], exclude_modules=fields.get("exclude_modules"),
                     r=fields["r"], apply_GS=fields["apply_GS"], init_weights=bool(fields.get("init_weights", True)))


def hra_check_adapter(config: AdapterConfig, name: str, adapter: AdapterModule) -> str | None:
    if not isinstance(adapter, HraLayer):
        return f"{name} holds a {type(adapter).__name__}, not an HRA adapter"
    assert isinstance(config, HraConfig)
    if adapter.r != config.rank_for(name) or adapter.apply_GS != config.apply_GS:
        return (f"{name} has r={adapter.r}, apply_GS={adapter.apply_GS}, but the checkpoint's config gives "
                f"r={config.rank_for(name)}, apply_GS={config.apply_GS}")
    return None


HRA_FORMAT = PeftFormat(HraConfig, _HRA_FIELDS, hra_to_peft, hra_from_peft, hra_check_adapter)
