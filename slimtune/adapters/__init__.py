"""Adapter methods: one file each, the math as plain functions, then the module."""
from .base import AdapterModule
from .hra import HraConfig, HraLayer
from .locon import LoraConv
from .lora import LoraConfig, LoraLinear

__all__ = ["AdapterModule", "HraConfig", "HraLayer", "LoraConfig", "LoraConv", "LoraLinear"]
