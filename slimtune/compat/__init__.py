"""PEFT's API spelled by slimtune: ``get_peft_model``, ``PeftModel`` (with Trainer checkpoints and merged export),
PEFT's config class names, peft config objects translated, the ``AutoPeftModel*`` loaders and ``PeftConfig``, and
the module-level helpers scripts import (``prepare_model_for_kbit_training``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict``). ``from peft import LoraConfig, get_peft_model`` becomes
``from slimtune import LoraConfig, get_peft_model``."""
from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                   AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                   AutoPeftModelForTokenClassification, PeftConfig)
from .configs import HRAConfig, LoHaConfig, LoKrConfig, as_slimtune_config
from .model import AdaptedModel, PeftModel, get_peft_model
from .utilities import get_peft_model_state_dict, prepare_model_for_kbit_training, set_peft_model_state_dict

__all__ = ["AdaptedModel", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification", "HRAConfig", "LoHaConfig", "LoKrConfig", "PeftConfig", "PeftModel",
           "as_slimtune_config", "get_peft_model", "get_peft_model_state_dict", "prepare_model_for_kbit_training",
           "set_peft_model_state_dict"]
