"""DoRA (Liu et al.): LoRA with a learned per-row magnitude — ``LoraConfig(use_dora=True)``, PEFT's ``LORA`` format
with ``lora_magnitude_vector``. Builds on :mod:`slimtune.methods.lora` (the one allowed import between methods)."""
from ...core.registry import Method, register_method
from ..lora.config import LoraConfig
from ..lora.format import LORA_FORMAT
from .function import DoraLinearFunction, DoraProductFunction, DoraTailFunction, dora_linear
from .module import DoraConv, DoraLinear, DoraMixin, build_dora, finalize_dora
from .probe import OutputProbe

register_method(Method("dora", LoraConfig, build_dora, LORA_FORMAT, finalize_dora))

__all__ = ["DoraConv", "DoraLinear", "DoraLinearFunction", "DoraMixin", "DoraProductFunction", "DoraTailFunction",
           "OutputProbe",
           "build_dora", "dora_linear", "finalize_dora"]
