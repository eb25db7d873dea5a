"""LoRA (Hu et al.) and rsLoRA on Linear-like layers, LoCon (LoRA on Conv1d / Conv2d); PEFT's ``LORA`` format."""
from ...core import siblings
from ...core.registry import Method, register_method
from .config import LoraConfig, build_lora
from .conv import LoraConv
from .format import LORA_FORMAT
from .linear import LoraLinear, LoraMixin
from .math import (init_lora_, locon_delta_weight, locon_reference, lora_delta_weight, lora_linear_reference,
                   lora_scaling)

register_method(Method("lora", LoraConfig, build_lora, LORA_FORMAT,
                       finalize=lambda config, model, adapters: siblings.install(model, adapters, (LoraLinear,))))

__all__ = ["LORA_FORMAT", "LoraConfig", "LoraConv", "LoraLinear", "LoraMixin", "build_lora", "init_lora_",
           "locon_delta_weight", "locon_reference", "lora_delta_weight", "lora_linear_reference", "lora_scaling"]
