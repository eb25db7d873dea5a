"""slimtune: parameter-efficient fine-tuning that fits and runs fast on one GPU."""
from .adapters import HraConfig, LoraConfig
from .adapters import LohaConfig, LokrConfig
from .adapters.hra import orthogonality_loss
from .checkpoint import load_adapter, save_adapter
from .errors import CheckpointError, ConfigError, SlimtuneError, TargetError
from .quant import dequantize, quantize
from .inject import adapt, adapter_modules, disable_adapters, merge, summary, trainable_parameters, unmerge

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "HraConfig", "LoraConfig", "SlimtuneError", "TargetError", "adapt", "adapter_modules",
    "disable_adapters", "load_adapter", "merge", "orthogonality_loss", "save_adapter", "summary", "trainable_parameters", "unmerge",
    "__version__",
]
__all__ += ["LohaConfig", "LokrConfig", "dequantize", "quantize"]
