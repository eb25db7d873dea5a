"""Model presets: named architectures built with random weights (transformers is imported only to build)."""
from .presets import (LLAMA_TARGETS, PRESETS, MissingDependencyError, ModelPreset, PresetError, build_model,
                      dtype_name, get_preset, preset_names, resolve_dtype)

__all__ = ["LLAMA_TARGETS", "PRESETS", "MissingDependencyError", "ModelPreset", "PresetError", "build_model",
           "dtype_name", "get_preset", "preset_names", "resolve_dtype"]
