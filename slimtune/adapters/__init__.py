"""Adapter methods: one file each, the math as plain functions, then the module."""
from .base import AdapterModule
from .locon import LoraConv
from .lora import LoraConfig, LoraLinear

__all__ = ["AdapterModule", "LoraConfig", "LoraConv", "LoraLinear"]
