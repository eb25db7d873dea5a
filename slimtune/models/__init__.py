"""Model presets: named architectures built with random weights (transformers / diffusers imported only to build).

:mod:`.presets` has the language models and :func:`build_model`; :mod:`.diffusion` the UNet / DiT presets;
:mod:`.workload` what one training step feeds any preset (inputs, loss, adapter targets).
"""
from ..errors import MissingDependencyError
from .diffusion import DIFFUSION_PRESETS, DiffusionModel, DiffusionPreset
from .presets import (LLAMA_TARGETS, LLM_PRESETS, PRESETS, ModelPreset, Preset, PresetError, build_model, dtype_name,
                      get_preset, is_diffusion, preset_names, resolve_dtype)

__all__ = ["DIFFUSION_PRESETS", "DiffusionModel", "DiffusionPreset", "LLAMA_TARGETS", "LLM_PRESETS",
           "MissingDependencyError", "ModelPreset", "PRESETS", "Preset", "PresetError", "build_model", "dtype_name",
           "get_preset", "is_diffusion", "preset_names", "resolve_dtype"]
