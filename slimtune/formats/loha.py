"""LoHa <-> PEFT ``LoHaConfig`` fields (``hada_*`` tensors)."""
from __future__ import annotations

import math
from typing import Any

from ..adapters.base import AdapterModule
from ..adapters.loha import LohaConfig, LohaLayer
from ..config import AdapterConfig
from ..errors import CheckpointError
from .base import PeftFormat, is_set, number, register_peft_format, targets_to_peft

_LOHA_FIELDS: dict[str, Any] = {
    "alpha": 8,
    "alpha_pattern": {},
    "exclude_modules": None,
    "init_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "module_dropout": 0.0,
    "modules_to_save": None,
    "r": 8,
    "rank_dropout": 0.0,
    "rank_pattern": {},
    "target_modules": None,
    "use_effective_conv2d": False,
}

# Fields of LoHa and LoKr that slimtune does not implement (loading them would adapt other modules or leave
# tensors unloaded).
LYCORIS_UNSUPPORTED = {
    "layers_pattern": "layers_pattern (layer-index targeting)",
    "layers_to_transform": "layers_to_transform (layer-index targeting)",
    "modules_to_save": "extra fully trained modules (modules_to_save)",
}


def lycoris_common_to_peft(config: Any) -> dict[str, Any]:
    """The fields LoHa and LoKr share, from a slimtune config."""
    return {
        "r": config.r,
        "alpha": number(config.alpha),
        "rank_dropout": float(config.rank_dropout),
        "module_dropout": float(config.module_dropout),
        "use_effective_conv2d": bool(config.use_effective_conv2d),
        "target_modules": targets_to_peft(config.target_modules),
        "exclude_modules": targets_to_peft(config.exclude_modules),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": {key: number(value) for key, value in config.alpha_pattern.items()},
    }


def lycoris_common_from_peft(fields: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for LohaConfig / LokrConfig from PEFT's shared fields (refusing what cannot load)."""
    for field, what in LYCORIS_UNSUPPORTED.items():
        if is_set(fields.get(field)):
            raise CheckpointError(f"{field}={fields[field]!r}: {what} is not supported by slimtune")
    if fields.get("target_modules") is None:
        raise CheckpointError("target_modules is missing or null: the checkpoint does not say which modules it adapts")
    if not isinstance(fields.get("use_effective_conv2d"), bool):
        raise CheckpointError(f"use_effective_conv2d must be true or false, got {fields.get('use_effective_conv2d')!r}")
    return dict(target_modules=fields["target_modules"], exclude_modules=fields.get("exclude_modules"),
                r=fields["r"], alpha=fields["alpha"], rank_pattern=fields.get("rank_pattern") or {},
                alpha_pattern=fields.get("alpha_pattern") or {}, rank_dropout=fields["rank_dropout"],
                module_dropout=fields["module_dropout"], use_effective_conv2d=fields["use_effective_conv2d"])


def lycoris_mismatch(config: Any, name: str, adapter: Any) -> str | None:
    """A message when an adapter's rank or scaling differs from what the checkpoint's config gives it."""
    r, alpha = config.rank_for(name), config.alpha_for(name)
    if adapter.r != r or not math.isclose(adapter.scaling, alpha / r, rel_tol=1e-9, abs_tol=0.0):
        return (f"{name} has r={adapter.r}, alpha={adapter.alpha}, but the checkpoint's config gives "
                f"r={r}, alpha={alpha}")
    return None


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


register_peft_format(PeftFormat(LohaConfig, _LOHA_FIELDS, loha_to_peft, loha_from_peft, loha_check_adapter))
