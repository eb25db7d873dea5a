"""Putting adapters into a model and taking them out: written once for every adapter method."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import SlimtuneError
from . import registry
from .config import AdapterConfig
from .module import AdapterModule
from .targeting import find_targets

CONFIG_ATTR = "slimtune_config"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace every module ``config`` targets by an adapter holding it; freeze everything else.

    Returns ``model`` (changed in place). All adapters are built before the model is touched, so a
    failing target leaves the model as it was.
    """
    if not isinstance(config, AdapterConfig):
        raise SlimtuneError(f"config must be an adapter config (e.g. LoraConfig), got {type(config).__name__}")
    targets = find_targets(model, config)
    adapters = [(name, registry.build_adapter(config, name, module).train(module.training))
                for name, module in targets]
    for param in model.parameters():
        param.requires_grad_(False)
    for name, adapter in adapters:
        _set_submodule(model, name, adapter)
    registry.finalize(config, model, [adapter for _, adapter in adapters])
    setattr(model, CONFIG_ATTR, config)
    return model


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """``(qualified name of the adapted layer, adapter)`` for every adapter in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterModule)]


def _require_adapted(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    found = adapter_modules(model)
    if not found:
        raise SlimtuneError(f"{type(model).__name__} has no slimtune adapters: call slimtune.adapt first")
    return found


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then runs the bases alone)."""
    for name, adapter in _require_adapted(model):
        if not adapter.merged:
            adapter.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring each base weight bit for bit."""
    for name, adapter in _require_adapted(model):
        if adapter.merged:
            adapter.unmerge()
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; merged adapters are unmerged for it and merged again after."""
    found = _require_adapted(model)
    remerge = [a for _, a in found if a.merged]
    for adapter in remerge:
        adapter.unmerge()
    previous = [(a, a.disabled) for _, a in found]
    for _, adapter in found:
        adapter.disabled = True
    try:
        yield model
    finally:
        for adapter, was in previous:
            adapter.disabled = was
        for adapter in remerge:
            adapter.merge()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after :func:`adapt`: the adapters')."""
    return [p for p in model.parameters() if p.requires_grad]


def summary(model: nn.Module) -> str:
    """One line: trainable and total parameter counts and the trainable share."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype
