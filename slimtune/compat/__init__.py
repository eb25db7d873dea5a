"""PEFT's API spelled by slimtune: ``get_peft_model``, ``PeftModel`` (with Trainer checkpoints and merged export),
PEFT's config class names, and peft config objects translated. ``from peft import LoraConfig, get_peft_model`` becomes
``from slimtune import LoraConfig, get_peft_model``."""
from .configs import HRAConfig, LoHaConfig, LoKrConfig, as_slimtune_config
from .model import AdaptedModel, PeftModel, get_peft_model

__all__ = ["AdaptedModel", "HRAConfig", "LoHaConfig", "LoKrConfig", "PeftModel", "as_slimtune_config",
           "get_peft_model"]
