"""Adapter methods: one file each, the math as plain functions, then the module."""
from .base import AdapterModule
from .dora import DoraConv, DoraLinear
from .hra import HraConfig, HraLayer
from .locon import LoraConv
from .loha import LohaConfig, LohaLayer
from .lokr import LokrConfig, LokrLayer
from .lora import LoraConfig, LoraLinear

__all__ = ["AdapterModule", "DoraConv", "DoraLinear", "HraConfig", "HraLayer", "LoraConfig", "LoraConv", "LoraLinear"]
__all__ += ["LohaConfig", "LohaLayer", "LokrConfig", "LokrLayer"]
