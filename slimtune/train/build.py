"""The model a run trains: built from a preset or a model directory, 4-bit where asked, adapted, checkpointed.

Order (QLoRA's): base model (seeded; a directory's weights when it has them) -> ``quantize`` (``--quant nf4``,
the trained part only, a classification head kept dense) -> ``adapt`` (seeded again, so every process of a
distributed run builds the same adapter; a classification head becomes a trainable copy, PEFT's
``modules_to_save``) -> gradient checkpointing.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import CLASSIFIER_HEADS, AdapterConfig
from ..core.inject import adapt
from ..errors import ConfigError
from ..memory.profile import build_from_dir, enable_gradient_checkpointing
from ..memory.setting import apply_memory_setting
from ..models.deps import require_diffusers, require_transformers
from ..models.diffusion import DiffusionModel, DiffusionPreset
from ..models.layers import compile_layers
from ..models.presets import CAUSAL_LM_SUFFIXES, ModelPreset, build_model, get_preset, resolve_dtype
from ..models.workload import default_targets, make_adapter_config
from ..quant import quantize
from .config import TrainConfig

def read_model_config(model_dir: str) -> dict[str, Any]:
    """A model directory's ``config.json`` as a dict."""
    path = Path(model_dir) / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return value


def model_context(cfg: TrainConfig) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``), or ``None`` when it does not say."""
    if cfg.preset is not None:
        return getattr(get_preset(cfg.preset), "max_position_embeddings", None)
    config = read_model_config(str(cfg.model_dir))
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_model_task(cfg: TrainConfig) -> None:
    """The model fits the task: a language-model preset for causal-lm, a diffusion preset for diffusion; a model
    directory whose ``architectures`` are all something else than a causal LM (an encoder such as ``BertModel``,
    whose attention sees the tokens it would predict) is refused for causal-lm."""
    if cfg.preset is not None:
        spec = get_preset(cfg.preset)
        if cfg.task == "diffusion" and not isinstance(spec, DiffusionPreset):
            raise ConfigError(f"preset {cfg.preset!r} is a language model: use --task causal-lm")
        if cfg.task == "causal-lm" and not isinstance(spec, ModelPreset):
            raise ConfigError(f"preset {cfg.preset!r} is a diffusion model: use --task diffusion")
        return
    if cfg.task != "causal-lm":
        return
    config = read_model_config(str(cfg.model_dir))
    architectures = [str(a) for a in config.get("architectures") or []]
    if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures) \
            and not config.get("is_decoder", False):
        raise ConfigError(f"--model {cfg.model_dir} is a {', '.join(architectures)}, not a causal language model: "
                          "as one it would learn to predict tokens its attention already sees; train it as a "
                          "classifier (--task classification, {\"text\", \"label\"} records) or use a causal LM")


def diffusion_spec(model_dir: str) -> DiffusionPreset:
    """A :class:`DiffusionPreset` describing a diffusers denoiser directory (UNet2DConditionModel or
    FluxTransformer2DModel), so that :mod:`slimtune.models.workload` can shape its random inputs."""
    config = read_model_config(model_dir)
    kind = config.get("_class_name")
    families = {"UNet2DConditionModel": "unet", "FluxTransformer2DModel": "dit"}
    if kind not in families:
        raise ConfigError(f"--model {model_dir}: --task diffusion needs a diffusers UNet2DConditionModel or "
                          f"FluxTransformer2DModel directory (config.json _class_name), got {kind!r}")
    args = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items() if not k.startswith("_"))
    family = families[kind]
    return DiffusionPreset(model_dir, kind, family, args, text_len=512 if family == "dit" else 77)


def _diffusion_from_dir(model_dir: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    diffusers = require_diffusers()
    spec = diffusion_spec(model_dir)
    cls = getattr(diffusers, str(read_model_config(model_dir)["_class_name"]))
    if any(Path(model_dir).glob("*.safetensors")) or any(Path(model_dir).glob("*.bin")):
        denoiser = cls.from_pretrained(model_dir)
    else:
        denoiser = cls.from_config(cls.load_config(model_dir))
    return DiffusionModel(spec.family, denoiser, []).to(device=device, dtype=dtype)


def build_base(cfg: TrainConfig, device: torch.device, num_labels: int | None = None) -> nn.Module:
    """The unadapted model on ``device`` in ``cfg.dtype``, seeded with ``cfg.seed``."""
    dtype = resolve_dtype(str(cfg.dtype))
    if cfg.preset is not None:
        return build_model(cfg.preset, device, dtype, seed=cfg.seed)
    model_dir = str(cfg.model_dir)
    torch.manual_seed(cfg.seed)
    if cfg.task == "diffusion":
        return _diffusion_from_dir(model_dir, device, dtype)
    if cfg.task == "classification":
        transformers = require_transformers()
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--model {model_dir}: cannot load a sequence-classification model "
                              f"({str(exc).splitlines()[0]})") from None
        return model.to(device=device, dtype=dtype)
    try:
        return build_from_dir(model_dir, device, dtype, cfg.seed)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {model_dir}: cannot load a causal language model "
                          f"({str(exc).splitlines()[0]})") from None


def trained_part(model: nn.Module) -> nn.Module:
    """What is adapted: a diffusion model's denoiser, else the model."""
    return model.denoiser if isinstance(model, DiffusionModel) else model


def head_name(model: nn.Module) -> str:
    """The attribute holding a sequence-classification model's head (``classifier`` / ``score``)."""
    for name in CLASSIFIER_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"{type(model).__name__} has no classification head ({' or '.join(CLASSIFIER_HEADS)})")


def read_rank_pattern(path: str) -> dict[str, int]:
    """A ``--ranks`` file: a JSON object ``{module-name pattern: rank}`` (PEFT's ``rank_pattern``)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--ranks {path}: not a readable JSON file ({exc})") from None
    if isinstance(value, dict) and isinstance(value.get("rank_pattern"), dict):
        value = value["rank_pattern"]  # an adapter_config.json
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"--ranks {path}: expected a JSON object of module-name pattern -> rank")
    return value


def adapter_config(cfg: TrainConfig, model: nn.Module) -> AdapterConfig:
    """The adapter's config: ``cfg.targets``, else the preset's (or a diffusion denoiser's) targets for the method,
    else ``all-linear``; for
    classification PEFT's ``task_type="SEQ_CLS"`` (the head is a module to save: a trainable copy, saved with the
    adapter); ``--ranks FILE`` sets the rank pattern."""
    if cfg.targets is not None:
        targets: list[str] | str = list(cfg.targets)
    elif cfg.preset is not None or cfg.task == "diffusion":
        spec = cfg.preset if cfg.preset is not None else diffusion_spec(str(cfg.model_dir))
        targets = default_targets(spec, "dora" if cfg.method.startswith("dora") else cfg.method)
    else:
        targets = "all-linear"
    dtype = resolve_dtype(cfg.adapter_dtype) if cfg.adapter_dtype else None
    config = make_adapter_config(cfg.method, cfg.rank, cfg.alpha, targets, adapter_dtype=dtype)
    changes: dict[str, Any] = {}
    if cfg.task == "classification":
        head_name(model)
        changes["task_type"] = "SEQ_CLS"  # the head becomes a module to save: trained whole, saved in PEFT's file
    if cfg.ranks not in (None, "auto"):
        changes["rank_pattern"] = read_rank_pattern(str(cfg.ranks))
    return dataclasses.replace(config, **changes) if changes else config


def prepare_model(cfg: TrainConfig, model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Quantise (``--quant nf4``; a classification head stays dense), adapt with ``config`` (seeded), and turn on
    gradient checkpointing (``--grad-checkpointing``, or ``--memory``'s); in place, returns ``model``."""
    part = trained_part(model)
    if cfg.quant == "nf4":
        head = [head_name(model)] if cfg.task == "classification" else None
        quantize(part, "nf4", compute_dtype=resolve_dtype(str(cfg.dtype)), exclude=head)
    torch.manual_seed(cfg.seed)
    adapt(part, config)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model, adapted=True)
    if cfg.compile:
        compile_layers(model)
    apply_memory_setting(model, cfg.memory, plain_layers=cfg.plain_layers)  # checkpoints the compiled layers
    return model
