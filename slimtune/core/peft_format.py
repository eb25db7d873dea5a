"""How an adapter method maps to PEFT's config: one :class:`PeftFormat` per PEFT type (each method's
``format.py`` builds its own and hands it to :mod:`slimtune.core.registry`), and the field helpers they share."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from ..errors import CheckpointError
from .config import AdapterConfig
from .module import AdapterModule

# The PEFT release whose config schema the templates follow; written as "peft_version" like PEFT does.
PEFT_SCHEMA_VERSION = "0.22.0"

# Fields of PEFT's ``PeftConfig`` base class, as ``save_pretrained`` writes them.
PEFT_COMMON_FIELDS: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "peft_type": None,
    "peft_version": PEFT_SCHEMA_VERSION,
    "revision": None,
    "task_type": None,
}


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How one adapter method maps to PEFT's config.

    ``fields``: every method-specific field PEFT writes, with PEFT's defaults. ``to_peft(config, adapters)``
    returns the fields that the slimtune config (and the adapted layers) determine; ``from_peft(fields)``
    builds the slimtune config from a complete field dict (the file's values over ``fields``), raising
    :class:`CheckpointError` for anything slimtune cannot represent. ``check_adapter(config, name, adapter)``
    returns a message when an adapter
    already in the model does not compute what the checkpoint's config says (else ``None``).
    """

    config_class: type[AdapterConfig]
    fields: Mapping[str, Any]
    to_peft: Callable[[AdapterConfig, list[tuple[str, AdapterModule]]], dict[str, Any]]
    from_peft: Callable[[dict[str, Any]], AdapterConfig]
    check_adapter: Callable[[AdapterConfig, str, AdapterModule], str | None]

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type


def number(value: float) -> float | int:
    """``16.0`` -> ``16`` (PEFT's ``lora_alpha`` is an int field; keep floats that are not whole)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def targets_to_peft(value: str | list[str] | None) -> str | list[str] | None:
    # PEFT keeps list targets as a set and writes it back as a list; sorted here so files are reproducible.
    return sorted(set(value)) if isinstance(value, list) else value



def shared_to_peft(config: AdapterConfig) -> dict[str, Any]:
    """The fields every method writes alike: ``modules_to_save`` (with the heads ``task_type="SEQ_CLS"`` adds, as
    PEFT writes them), the layer filter, ``task_type`` (PEFT records ``auto_mapping`` only without one) and the base
    model's name."""
    out = {"modules_to_save": config.saved_modules() or None, "layers_to_transform": config.layers_to_transform,
           "layers_pattern": config.layers_pattern, "task_type": config.task_type,
           "base_model_name_or_path": config.base_model_name_or_path, "revision": config.revision}
    if config.task_type is not None:
        out["auto_mapping"] = None
    return out


def shared_from_peft(fields: dict[str, Any]) -> dict[str, Any]:
    """The config keywords of :func:`shared_to_peft`'s fields (what ``dataclasses.replace`` adds to a method's
    config); PEFT's ``null`` and ``[]`` both mean none."""
    return {"modules_to_save": fields.get("modules_to_save") or None,
            "layers_to_transform": fields.get("layers_to_transform") if fields.get("layers_to_transform") != []
            else None,
            "layers_pattern": fields.get("layers_pattern") or None, "task_type": fields.get("task_type"),
            "base_model_name_or_path": fields.get("base_model_name_or_path"), "revision": fields.get("revision")}


def is_set(value: Any) -> bool:
    """Whether a PEFT field holds something other than its 'off' values (None, False, {}, [])."""
    return value is not None and value is not False and value != {} and value != []


def refuse_unsupported(fields: dict[str, Any], unsupported: Mapping[str, str]) -> None:
    """A :class:`CheckpointError` naming the first field of ``unsupported`` (field -> what it is) that is set."""
    for field, what in unsupported.items():
        if is_set(fields.get(field)):
            raise CheckpointError(f"{field}={fields[field]!r}: {what} is not supported by slimtune")


def require_targets(fields: dict[str, Any]) -> None:
    if fields.get("target_modules") is None:
        raise CheckpointError("target_modules is missing or null: the checkpoint does not say which modules it adapts")


def require_bools(fields: dict[str, Any], *names: str) -> None:
    for name in names:
        if not isinstance(fields.get(name), bool):
            raise CheckpointError(f"{name} must be true or false, got {fields.get(name)!r}")


# -- the LyCORIS family (LoHa, LoKr): the fields they share ---------------------------------------------------
LYCORIS_FIELDS: dict[str, Any] = {
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
    require_targets(fields)
    require_bools(fields, "use_effective_conv2d")
    return dict(target_modules=fields["target_modules"], exclude_modules=fields.get("exclude_modules"),
                r=fields["r"], alpha=fields["alpha"], rank_pattern=fields.get("rank_pattern") or {},
                alpha_pattern=fields.get("alpha_pattern") or {}, rank_dropout=fields["rank_dropout"],
                module_dropout=fields["module_dropout"], use_effective_conv2d=fields["use_effective_conv2d"])


def lycoris_checker(layer_class: type, label: str) -> Callable[[AdapterConfig, str, AdapterModule], str | None]:
    """A :attr:`PeftFormat.check_adapter` for LoHa / LoKr: a message when the adapter already in the model is not a
    ``layer_class``, or its rank or scaling differs from what the checkpoint's config gives it."""

    def check(config: AdapterConfig, name: str, adapter: AdapterModule) -> str | None:
        if not isinstance(adapter, layer_class):
            return f"{name} holds a {type(adapter).__name__}, not a {label} adapter"
        r, alpha = config.rank_for(name), config.alpha_for(name)
        if adapter.r != r or not math.isclose(adapter.scaling, alpha / r, rel_tol=1e-9, abs_tol=0.0):
            return (f"{name} has r={adapter.r}, alpha={adapter.alpha}, but the checkpoint's config gives "
                    f"r={r}, alpha={alpha}")
        return None

    return check
