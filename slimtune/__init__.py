"""slimtune: parameter-efficient fine-tuning that fits and runs fast on one GPU."""
from .adapters import LoraConfig
from .errors import CheckpointError, ConfigError, SlimtuneError, TargetError
from .inject import adapt, adapter_modules, disable_adapters, merge, summary, trainable_parameters, unmerge

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "LoraConfig", "SlimtuneError", "TargetError", "adapt", "adapter_modules",
    "disable_adapters", "merge", "summary", "trainable_parameters", "unmerge", "__version__",
]
