"""PEFT's module-level helpers that training scripts import beside ``get_peft_model``:
``prepare_model_for_kbit_training``, ``get_peft_model_state_dict``, ``set_peft_model_state_dict``.

They take a :class:`~.model.PeftModel` or a model adapted by :func:`slimtune.adapt`; state dicts are keyed as PEFT's
checkpoint files are (``base_model.model.<path>.lora_A.weight``: no adapter name), which is what PEFT's helpers
return and take.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from ..core.checkpoint import load_adapter_state, peft_state_dict
from ..core.config import AdapterConfig
from ..core.frozen import quantized_handle
from ..core.inject import CONFIG_ATTR
from ..errors import CheckpointError, ConfigError
from .model import DEFAULT, PeftModel

#: the attributes transformers and PEFT mark a k-bit (quantised) model with
KBIT_FLAGS = ("is_loaded_in_8bit", "is_loaded_in_4bit")
KBIT_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


class LoadResult(NamedTuple):
    """What :func:`set_peft_model_state_dict` did not match (always empty: a mismatch is refused instead)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def is_kbit_model(model: nn.Module) -> bool:
    """Whether ``model`` is quantised: loaded in 8 / 4 bits by transformers (bitsandbytes, or a k-bit method PEFT
    knows), or holding slimtune's / bitsandbytes' 4-bit layers."""
    if any(getattr(model, flag, False) for flag in KBIT_FLAGS) or _other_kbit_method(model):
        return True
    return any(quantized_handle(module) is not None for module in model.modules())


def _other_kbit_method(model: nn.Module) -> bool:
    """Whether transformers quantised ``model`` by a k-bit method other than bitsandbytes (GPTQ, AQLM, ...)."""
    return getattr(model, "quantization_method", None) in KBIT_METHODS or bool(getattr(model, "hqq_quantized", False))


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True, upcast: bool = True) -> nn.Module:
    """PEFT's preparation of a (quantised) transformers model for adapter training, in place; returns ``model``.

    Every parameter is frozen. With ``upcast`` (PEFT's behaviour, the default) the float16 / bfloat16 parameters
    that are not 4-bit storage — norms, embeddings, the output head, biases — become float32 (on a model loaded by
    transformers' other quantisation methods PEFT leaves them, and so does this); ``upcast=False`` keeps them as
    loaded (2 bytes a parameter less; slimtune's adapters accumulate in float32 either way). On a quantised model
    (:func:`is_kbit_model`) with ``use_gradient_checkpointing``, transformers' gradient checkpointing is turned on
    with ``gradient_checkpointing_kwargs``, and, for the reentrant kind (the default unless
    ``use_reentrant=False``), the input embeddings' output made to require grad, as PEFT does.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    if upcast and not _other_kbit_method(model):
        with torch.no_grad():
            for param in model.parameters():
                if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                    param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if use_gradient_checkpointing and is_kbit_model(model):
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers "
                              "model): pass use_gradient_checkpointing=False, or use slimtune.apply_memory_setting")
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        enable(gradient_checkpointing_kwargs=kwargs)
    return model


@contextlib.contextmanager
def _adapted(model: nn.Module, adapter_name: str) -> Iterator[tuple[nn.Module, AdapterConfig]]:
    """The model holding adapter ``adapter_name`` (swapped in for the block on a PeftModel) and its config."""
    if isinstance(model, PeftModel):
        with model._in_model(adapter_name):
            yield model.get_base_model(), model.peft_config[adapter_name]
        return
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no slimtune adapters: use slimtune.get_peft_model or "
                          "slimtune.adapt first")
    if adapter_name != DEFAULT:
        raise ConfigError(f"adapter_name={adapter_name!r}: a model adapted by slimtune.adapt holds one adapter "
                          f"({DEFAULT!r}); named adapters live on a PeftModel")
    yield model, config


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = DEFAULT, unwrap_compiled: bool = False,
                              save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors (modules to save included) under PEFT's checkpoint keys; from
    ``state_dict`` when given (a gathered copy, e.g. from DeepSpeed; it must hold every one of those keys), else
    from the model. Embedding layers are never adapted by slimtune, so ``save_embedding_layers`` adds nothing."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule keeps the module there
    with _adapted(model, adapter_name) as (inner, _):
        own = peft_state_dict(inner)
    if state_dict is None:
        return own
    missing = [key for key in own if key not in state_dict]
    if missing:
        raise CheckpointError(f"state_dict lacks {len(missing)} adapter tensor(s), e.g. {missing[0]!r}")
    return {key: state_dict[key] for key in own}


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = DEFAULT, ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> LoadResult:
    """Copy PEFT-keyed adapter tensors (as :func:`get_peft_model_state_dict` returns them, or a checkpoint file
    holds them) into adapter ``adapter_name``; every key and shape must match (checked before anything is
    copied, the model left unchanged on a mismatch)."""
    if ignore_mismatched_sizes:
        raise ConfigError("ignore_mismatched_sizes=True is not supported: a tensor of another shape is refused")
    with _adapted(model, adapter_name) as (inner, config):
        load_adapter_state(inner, config, dict(peft_model_state_dict), "the given config", "the given state dict")
    return LoadResult([], [])
