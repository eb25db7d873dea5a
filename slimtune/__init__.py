"""slimtune: parameter-efficient fine-tuning that fits and runs fast on one GPU.

Layout: :mod:`slimtune.core` holds what every method shares (config, targeting, injection, the adapter-module
protocol, the frozen-weight operand, the low-rank product, checkpoints, the method registry);
:mod:`slimtune.methods` one package per adapter method; :mod:`slimtune.quant` 4-bit NF4 storage;
:mod:`slimtune.memory` the profiler and planner; :mod:`slimtune.models` presets; :mod:`slimtune.cli` the command line.
"""
from . import methods  # noqa: F401  (registers every adapter method)
from .core.checkpoint import load_adapter, save_adapter
from .core.inject import adapt, adapter_modules, disable_adapters, merge, summary, trainable_parameters, unmerge
from .errors import CheckpointError, ConfigError, SlimtuneError, TargetError
from .methods.hra import HraConfig, orthogonality_loss
from .methods.loha import LohaConfig
from .methods.lokr import LokrConfig
from .methods.lora import LoraConfig
from .quant import dequantize, quantize
from .version import __version__

__all__ = [
    "CheckpointError", "ConfigError", "HraConfig", "LohaConfig", "LokrConfig", "LoraConfig", "SlimtuneError",
    "TargetError", "__version__", "adapt", "adapter_modules", "dequantize", "disable_adapters", "load_adapter",
    "merge", "orthogonality_loss", "quantize", "save_adapter", "summary", "trainable_parameters", "unmerge",
]
