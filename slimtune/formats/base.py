"""How an adapter method maps to PEFT's config: one :class:`PeftFormat` per method, registered by peft_type."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ..adapters.base import AdapterModule
from ..config import AdapterConfig

# The PEFT release whose config schema the templates follow; written as "peft_version" like PEFT does.
PEFT_SCHEMA_VERSION = "0.21.2"

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
    :class:`CheckpointError` for anything slimtune cannot represent. ``check_adapter(config, name, adapter)`` returns a message when an adapter
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


_FORMATS: dict[str, PeftFormat] = {}


def register_peft_format(fmt: PeftFormat) -> None:
    """Make ``fmt.config_class`` savable and loadable (keyed by its ``peft_type``)."""
    _FORMATS[fmt.peft_type] = fmt


def number(value: float) -> float | int:
    """``16.0`` -> ``16`` (PEFT's ``lora_alpha`` is an int field; keep floats that are not whole)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def targets_to_peft(value: str | list[str] | None) -> str | list[str] | None:
    # PEFT keeps list targets as a set and writes it back as a list; sorted here so files are reproducible.
    return sorted(set(value)) if isinstance(value, list) else value




def supported_peft_types() -> list[str]:
    return sorted(_FORMATS)


def format_for_type(peft_type: Any) -> PeftFormat | None:
    return _FORMATS.get(peft_type) if isinstance(peft_type, str) else None


def is_set(value: Any) -> bool:
    """Whether a PEFT field holds something other than its 'off' values (None, False, {}, [])."""
    return value is not None and value is not False and value != {} and value != []
