"""slimtune: parameter-efficient fine-tuning that fits and runs fast on one GPU.

Layout: :mod:`slimtune.core` holds what every method shares (config, targeting, injection, the adapter-module
protocol, the frozen-weight operand, the low-rank product, checkpoints, the method registry);
:mod:`slimtune.methods` one package per adapter method; :mod:`slimtune.quant` 4-bit NF4 storage;
:mod:`slimtune.compat` PEFT's API (``get_peft_model``, ``PeftModel``, PEFT's config names, loaders and helpers);
:mod:`slimtune.memory` the profiler and planner; :mod:`slimtune.models` presets; :mod:`slimtune.cli` the command line.
"""
from . import methods  # noqa: F401  (registers every adapter method)
from .compat import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                     AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                     AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification, HRAConfig,
                     LoHaConfig, LoKrConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict,
                     prepare_model_for_kbit_training, set_peft_model_state_dict)
from .core.capture import capture_step
from .core.checkpoint import load_adapter, save_adapter
from .core.siblings import set_sibling_fusion
from .core.timed import load_timings, save_timings, set_variant_criterion
from .core.config import TaskType
from .core.inject import (adapt, adapter_modules, disable_adapters, merge, summary, trainable_parameters, unload,
                          unmerge)
from .errors import CheckpointError, ConfigError, SlimtuneError, TargetError
from .memory.chunked_loss import chunked_causal_lm_loss
from .memory.setting import MEMORY_SETTINGS, apply_memory_setting
from .methods.hra import HraConfig, orthogonality_loss
from .methods.loha import LohaConfig
from .methods.dora.prepass import set_dora_prepass
from .methods.lokr import LokrConfig
from .methods.lora import LoraConfig
from .quant import dequantize, quantize
from .ranks import allocate_ranks
from .version import __version__

__all__ = [
    "CheckpointError", "ConfigError", "HRAConfig", "HraConfig", "LoHaConfig", "LoKrConfig", "LohaConfig",
    "LokrConfig", "LoraConfig", "PeftModel", "SlimtuneError", "TargetError", "TaskType", "__version__", "adapt",
    "adapter_modules", "allocate_ranks", "capture_step", "dequantize", "disable_adapters", "get_peft_model",
    "load_adapter", "merge", "orthogonality_loss", "quantize", "save_adapter", "summary", "trainable_parameters",
    "unload", "unmerge", "set_variant_criterion", "set_sibling_fusion", "set_dora_prepass", "save_timings",
    "load_timings", "MEMORY_SETTINGS", "apply_memory_setting", "chunked_causal_lm_loss",  # the memory switch, the chunked loss
    # PEFT's loaders and helpers, by the names PEFT exports them under
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "PeftConfig", "get_peft_model_state_dict",
    "prepare_model_for_kbit_training", "set_peft_model_state_dict",
]
