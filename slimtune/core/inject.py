"""Putting adapters into a model and taking them out: written once for every adapter method."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import SlimtuneError
from . import registry
from .config import AdapterConfig
from .lean_layers import install as install_lean_layers
from .module import AdapterModule
from .removers import Removers
from .stacked_rows import unstack
from .targeting import find_saved_modules, find_targets
from .trained_copy import TrainedCopy

CONFIG_ATTR = "slimtune_config"
HOOKS_ATTR = "slimtune_hooks_remover"  # removes the model-level hooks the method's finalizer attached


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclasses.dataclass
class AdapterSet:
    """One config's adapters out of a model (:func:`detach`), ready to go back in (:func:`attach`): the adapter of
    each adapted layer and the copy of each module to save, by qualified name. The adapters hold the very base
    layers the model runs while they are out."""

    config: AdapterConfig
    adapters: list[tuple[str, AdapterModule]]
    copies: list[tuple[str, TrainedCopy]]

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, module in self.adapters + self.copies:
            yield from module.parameters()


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace every module ``config`` targets by an adapter holding it, and every module in ``modules_to_save`` by a
    :class:`~slimtune.core.trained_copy.TrainedCopy`; freeze everything else (the adapters too with
    ``inference_mode``).

    Returns ``model`` (changed in place). All adapters are built before the model is touched, so a
    failing target leaves the model as it was.
    """
    if not isinstance(config, AdapterConfig):
        raise SlimtuneError(f"config must be an adapter config (e.g. LoraConfig), got {type(config).__name__}")
    targets = find_targets(model, config)
    adapters = [(name, registry.build_adapter(config, name, module).train(module.training))
                for name, module in targets]
    copies = [(name, TrainedCopy(module)) for name, module in find_saved_modules(model, config)]
    for param in model.parameters():
        param.requires_grad_(False)
    attach(model, AdapterSet(config, adapters, copies))
    if config.inference_mode:
        for param in trainable_parameters(model):
            param.requires_grad_(False)
    return model


def attach(model: nn.Module, adapter_set: AdapterSet) -> nn.Module:
    """Put an :class:`AdapterSet` (from :func:`adapt`'s building or :func:`detach`) into ``model``, and give the
    frozen rest its lean layers (:func:`install_frozen_lean_layers`; removed with the adapters)."""
    for name, module in adapter_set.adapters + adapter_set.copies:
        _set_submodule(model, name, module)
    remover = registry.finalize(adapter_set.config, model, [adapter for _, adapter in adapter_set.adapters])
    lean = install_frozen_lean_layers(model, registry.method_for(adapter_set.config).unet_lean_scale)
    setattr(model, CONFIG_ATTR, adapter_set.config)
    setattr(model, HOOKS_ATTR, Removers((remover, lean)))
    return model


def install_frozen_lean_layers(model: nn.Module, unet_lean_scale: int = 1) -> Callable[[], None]:
    """Give the frozen rest of ``model`` — every module but adapters and trained copies, and their children — its
    lean layers (:mod:`.lean_layers`: frozen convolutions that do not keep their inputs, GroupNorm + SiLU and GEGLU
    that keep one tensor, Llama-family RMSNorms and gated MLPs that keep their inputs; a UNet's from
    ``unet_lean_scale`` times :data:`~.lean_layers.UNET_LEAN_BYTES`, the method's :attr:`~.registry.Method.unet_lean_scale`).
    Returns the remover."""
    return install_lean_layers(model, skip=lambda m: isinstance(m, (AdapterModule, TrainedCopy)),
                               size_scale=unet_lean_scale)


def _take_out(model: nn.Module, keep_trained: bool, merged: bool = False) -> AdapterSet:
    """Put each adapted layer's base layer back, and each saved module's original (``keep_trained``: its trained
    copy); remove the model-level hooks. Returns what was taken out. ``merged``: the adapters are all merged, and
    their base layers leave with the update folded in (for good); otherwise none may be merged."""
    config = getattr(model, CONFIG_ATTR, None)
    adapters, copies = adapter_modules(model), trained_copies(model)
    if not adapters and not copies or not isinstance(config, AdapterConfig):
        raise SlimtuneError(f"{type(model).__name__} has no slimtune adapters: call slimtune.adapt first")
    wrong = [name for name, adapter in adapters if adapter.merged != merged]
    if wrong:
        raise SlimtuneError(f"{wrong[0]} is {'not ' if merged else ''}merged: "
                            f"{'merge' if merged else 'unmerge'} the model first")
    unstack(model)  # a plain model shares no storage between its weights (core.stacked_rows)
    for name, adapter in adapters:
        _set_submodule(model, name, adapter.base_layer)
    for name, held in copies:
        _set_submodule(model, name, held.trained_module if keep_trained else held.original_module)
    remover = model.__dict__.pop(HOOKS_ATTR, None)
    if remover is not None:
        remover()
    delattr(model, CONFIG_ATTR)
    return AdapterSet(config, adapters, copies)


def detach(model: nn.Module) -> AdapterSet:
    """Take the adapters (and the copies of the modules to save) out of ``model``, which runs its own layers again;
    :func:`attach` puts them back. Refused while merged."""
    return _take_out(model, keep_trained=False)


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """The plain model back, in place: each adapted layer is its base layer again (its original class and
    parameter names), each module to save is its trained copy. ``merge=True`` folds the adapters into the base
    weights first; otherwise merged adapters are unmerged first (the base weights come back bit for bit).
    Returns ``model``."""
    for _, adapter in _require_adapted(model):
        if merge and not adapter.merged:
            adapter.merge()
        elif not merge and adapter.merged:
            adapter.unmerge()
    _take_out(model, keep_trained=True, merged=merge)
    return model


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """``(qualified name of the adapted layer, adapter)`` for every adapter in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterModule)]


def trained_copies(model: nn.Module) -> list[tuple[str, TrainedCopy]]:
    """``(qualified name, copy)`` for every module to save in ``model`` (``modules_to_save``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TrainedCopy)]


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
    """Run the base model alone inside the block (the modules to save: their originals); merged adapters are
    unmerged for it and merged again after."""
    found = _require_adapted(model)
    remerge = [a for _, a in found if a.merged]
    for adapter in remerge:
        adapter.unmerge()
    previous = [(a, a.disabled) for _, a in found + trained_copies(model)]
    for adapter, _ in previous:
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
