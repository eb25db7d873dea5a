"""LoHa (low-rank Hadamard product, as LyCORIS / PEFT): structured or folded per layer; PEFT's ``LOHA`` format."""
from ...core.registry import Method, register_method
from .config import LohaConfig, build_loha
from .format import LOHA_FORMAT
from .math import loha_delta_weight
from .module import LohaLayer

register_method(Method("loha", LohaConfig, build_loha, LOHA_FORMAT))

__all__ = ["LOHA_FORMAT", "LohaConfig", "LohaLayer", "build_loha", "loha_delta_weight"]
