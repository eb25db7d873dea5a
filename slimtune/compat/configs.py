"""PEFT's config names and config objects, as slimtune configs.

``HRAConfig``, ``LoHaConfig``, ``LoKrConfig`` are PEFT's spellings of :class:`~slimtune.HraConfig`,
:class:`~slimtune.LohaConfig`, :class:`~slimtune.LokrConfig` (the very classes; ``LoraConfig`` is spelled alike).
Their fields take PEFT's names too (``LoraConfig(lora_alpha=16, lora_dropout=0.05)``: see
:class:`slimtune.core.config.PeftSpellings`).

:func:`as_slimtune_config` turns a ``peft`` config object into the slimtune config it describes, through the same
field mapping that reads ``adapter_config.json`` (:func:`slimtune.core.checkpoint.config_from_peft_fields`): a field
slimtune does not implement, set to anything but its "off" value, is refused by name. peft is never imported here:
the object is read through its ``to_dict()``.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ..core.checkpoint import config_from_peft_fields
from ..core.config import AdapterConfig
from ..errors import CheckpointError, ConfigError
from ..methods.hra import HraConfig
from ..methods.loha import LohaConfig
from ..methods.lokr import LokrConfig

HRAConfig = HraConfig
LoHaConfig = LohaConfig
LoKrConfig = LokrConfig


def _plain(value: Any) -> Any:
    """A peft ``to_dict()`` value as ``adapter_config.json`` holds it (sets as sorted lists, enums as values)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def as_slimtune_config(config: Any) -> AdapterConfig:
    """``config`` itself when it is a slimtune config; a ``peft`` config object (``peft.LoraConfig`` etc.)
    translated; a :class:`~slimtune.ConfigError` naming the field for anything slimtune cannot do as PEFT would."""
    if isinstance(config, AdapterConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict) or getattr(config, "peft_type", None) is None:
        raise ConfigError(f"expected a slimtune config (e.g. slimtune.LoraConfig) or a peft config object, "
                          f"got {type(config).__name__}")
    fields = {key: _plain(value) for key, value in to_dict().items()}
    if fields.get("target_modules") is None:
        raise ConfigError(f"{type(config).__name__}: target_modules is None; slimtune does not guess targets per "
                          "architecture as PEFT does: name them (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
    try:
        translated = config_from_peft_fields(fields, f"peft {type(config).__name__}")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    # the file always says inference_mode=true (PEFT sets it on save); an object says what the user wants
    return dataclasses.replace(translated, inference_mode=bool(fields.get("inference_mode", False)))
