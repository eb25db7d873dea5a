"""PEFT config formats, one file per adapter method; importing this package registers them all."""
from . import hra, lora  # noqa: F401  (registration)
from . import loha, lokr  # noqa: F401  (registration)
from .base import (PEFT_COMMON_FIELDS, PEFT_SCHEMA_VERSION, PeftFormat, format_for_type, is_set,
                   register_peft_format, supported_peft_types)

__all__ = ["PEFT_COMMON_FIELDS", "PEFT_SCHEMA_VERSION", "PeftFormat", "format_for_type", "is_set",
           "register_peft_format", "supported_peft_types"]
