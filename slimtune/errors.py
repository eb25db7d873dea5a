"""Errors raised by slimtune. Each names the module, file or value at fault."""


class SlimtuneError(Exception):
    """Base class of every error slimtune raises on purpose."""


class ConfigError(SlimtuneError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class DataError(ConfigError):
    """Data (a JSONL file) is missing, empty or malformed; the message names the file and line."""


class TargetError(SlimtuneError, ValueError):
    """Target selection failed: nothing matched, a match is not adaptable, or the model is already adapted."""


class CheckpointError(SlimtuneError, ValueError):
    """An adapter checkpoint is missing, corrupt, or does not fit the model."""


class MergeError(SlimtuneError, ValueError):
    """Merging an adapter would write NaN or inf into a base weight (``merge_and_unload(safe_merge=True)``)."""


class MissingDependencyError(SlimtuneError, ImportError):
    """An optional dependency (transformers, peft, diffusers, bitsandbytes, matplotlib) is needed for what was asked."""
