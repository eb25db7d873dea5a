"""Named model presets: configurations only, built with random weights (nothing is downloaded).

Language models (:class:`ModelPreset`: Llama and OPT shapes, built with transformers) live here; diffusion
models (:class:`~slimtune.models.diffusion.DiffusionPreset`: UNets and DiTs, built with diffusers) in
:mod:`.diffusion`. :data:`PRESETS` holds both; :func:`build_model` builds either. What a training step feeds a
preset and how its loss is taken is in :mod:`.workload`.

``llama-3.2-3b`` is exactly the model of the PEFT baseline protocol (``shared/bench/peft_baseline.py``):
the same ``LlamaConfig`` arguments, ``torch.manual_seed(seed)``, built directly on the device with
``with torch.device(device)`` and then cast to the dtype, so slimtune and PEFT runs see the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .deps import require_transformers
from .diffusion import DIFFUSION_PRESETS, DiffusionPreset, build_diffusion_model

#: The seven projections of a Llama decoder layer (attention and MLP), the protocol's LoRA targets.
LLAMA_TARGETS: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class PresetError(ConfigError):
    """An unknown preset name."""


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """The shape of a Llama model; :meth:`config_kwargs` gives the ``LlamaConfig`` arguments."""

    name: str
    description: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 4096
    family: str = "llama"  # "llama" (LlamaForCausalLM), "opt" (OPTForCausalLM), "hf" (a directory's config.json)
    targets: tuple[str, ...] = tuple(LLAMA_TARGETS)
    hf_config: str = ""  # family "hf": the directory's config.json text (transformers' auto classes build it)

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the family's config class (for Llama, exactly the protocol's)."""
        if self.family == "opt":
            return dict(hidden_size=self.hidden_size, ffn_dim=self.intermediate_size,
                        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                        vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
                        word_embed_proj_dim=self.hidden_size, tie_word_embeddings=self.tie_word_embeddings)
        return dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
                    max_position_embeddings=self.max_position_embeddings,
                    tie_word_embeddings=self.tie_word_embeddings)

    def num_parameters(self) -> int:
        """Parameter count of the built model (tied embeddings counted once), without building it (a directory's
        model: built on the meta device)."""
        if self.family == "hf":
            model = build_model(self, "meta")
            return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        if self.family == "opt":  # biased q/k/v/out and fc1/fc2, two LayerNorms per layer, learned positions
            layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
            return self.num_hidden_layers * layer + v * h + (self.max_position_embeddings + 2) * h + 2 * h
        head_dim = h // self.num_attention_heads
        kv = self.num_key_value_heads * head_dim
        attention = h * h * 2 + h * kv * 2  # q, o and k, v (no biases)
        mlp = 3 * h * i
        layer = attention + mlp + 2 * h  # two RMSNorm weights
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + h  # final norm


LLM_PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    ModelPreset("tiny-llama", "a few-million-parameter Llama for CPU smoke runs",
                hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=False,
                max_position_embeddings=2048),
    ModelPreset("llama-3.2-1b", "Llama-3.2-1B shape", hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                tie_word_embeddings=True),
    ModelPreset("llama-3.2-3b", "Llama-3.2-3B shape, the PEFT baseline protocol's model", hidden_size=3072,
                intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                vocab_size=128256, tie_word_embeddings=True),
    ModelPreset("llama-3.1-8b", "Llama-3.1-8B shape", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                tie_word_embeddings=False, max_position_embeddings=131072),
    ModelPreset("opt-125m", "OPT-125M shape (the HRA seed's small model); adapts q_proj and v_proj",
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=12, vocab_size=50272, tie_word_embeddings=True, max_position_embeddings=2048,
                family="opt", targets=("q_proj", "v_proj")),
    ModelPreset("llama-7b", "Llama-1/2-7B shape (the LoRA/QLoRA seed study's model)", hidden_size=4096,
                intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, tie_word_embeddings=False),
)}

#: A language-model or a diffusion preset.
Preset = ModelPreset | DiffusionPreset

#: Every preset by name: the language models above, then the diffusion models of :mod:`.diffusion`.
PRESETS: dict[str, Preset] = {**LLM_PRESETS, **DIFFUSION_PRESETS}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(preset: str | Preset) -> Preset:
    """The preset called ``preset`` (a preset object is returned as is); :class:`PresetError` if unknown."""
    if isinstance(preset, (ModelPreset, DiffusionPreset)):
        return preset
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise PresetError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}") from None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` for ``"bfloat16"``/``"bf16"``/``torch.bfloat16`` (likewise float32, float16)."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"unsupported dtype {dtype!r}; choose from float32, bfloat16, float16")


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def is_diffusion(preset: str | Preset) -> bool:
    """Whether ``preset`` is a diffusion model (UNet or DiT) rather than a language model."""
    return isinstance(get_preset(preset), DiffusionPreset)


def build_model(preset: str | Preset, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A randomly initialised model of the preset's shape.

    Language models: ``transformers.LlamaForCausalLM`` / ``OPTForCausalLM``. Diffusion models: a
    :class:`~slimtune.models.diffusion.DiffusionModel` (denoiser + frozen text encoders). Seeded with
    ``torch.manual_seed(seed)``, created directly on ``device`` and then cast to ``dtype``, exactly as the PEFT
    baseline protocol builds its model.
    """
    spec = get_preset(preset)
    torch_dtype = resolve_dtype(dtype)
    if isinstance(spec, DiffusionPreset):
        return build_diffusion_model(spec, device, torch_dtype, seed)
    transformers = require_transformers()
    torch.manual_seed(seed)
    if spec.family == "hf":
        config = hf_config(spec.hf_config, str(spec.name))
        config.num_hidden_layers = spec.num_hidden_layers  # a simulation's reduced depth (attribute_map aware)
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config).to(torch_dtype)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "opt": (transformers.OPTConfig, transformers.OPTForCausalLM)}[spec.family]
    config = config_class(**spec.config_kwargs())
    with torch.device(device):
        model = model_class(config).to(torch_dtype)
    return model


#: how transformers names a causal language model's class (``LlamaForCausalLM``, ``GPT2LMHeadModel``)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def hf_config(text: str, where: str) -> Any:
    """A transformers config from ``config.json`` text (its ``model_type`` picks the class)."""
    transformers = require_transformers()
    try:
        raw = json.loads(text)
        return transformers.AutoConfig.for_model(**raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{where}: not a transformers config.json with a known model_type "
                          f"({str(exc).splitlines()[0]})") from None


def preset_from_dir(path: str | os.PathLike) -> ModelPreset:
    """A causal language model's local directory as a preset (only its ``config.json`` is read: no weights, nothing
    downloaded): its shape for the memory estimator and planner, built by transformers' auto classes; every
    Linear but the output head is a default target (``all-linear``)."""
    config_path = Path(path) / "config.json"
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: no readable config.json ({exc.strerror or exc})") from None
    config = hf_config(text, str(config_path))
    architectures = [str(a) for a in getattr(config, "architectures", None) or []]
    if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        raise ConfigError(f"{path} is a {', '.join(architectures)}, not a causal language model (the planner "
                          "predicts causal-LM training)")
    heads = config.num_attention_heads
    return ModelPreset(
        str(path), f"{config.model_type} from {path}", hidden_size=config.hidden_size,
        intermediate_size=int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size),
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads), vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", None) or 4096), family="hf",
        targets=("all-linear",), hf_config=text)
