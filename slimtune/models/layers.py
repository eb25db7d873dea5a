"""A model's stack of transformer layers, and what is done to it layer by layer: found here, checkpointed by
:mod:`slimtune.memory.recompute`, compiled by :func:`compile_layers`."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import lean_layers
from ..core.siblings import SiblingGroup, still_learning, watched_groups
from ..core.stacked_rows import LayerStacks
from ..core.tracing import mark_compiled
from ..errors import ConfigError


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers: the longest ``nn.ModuleList`` whose entries share one class."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
                and (best is None or len(module) > len(best))):
            best = module
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no stack of layers (an nn.ModuleList of one layer class) "
                          "to checkpoint or compile")
    return best


def compile_layers(model: nn.Module, **options: Any) -> int:
    """``torch.compile`` each layer of ``model``'s transformer stack (regional compilation; ``options`` go to
    ``torch.compile``), in place; returns how many. Each layer's ``forward`` becomes its compiled self, an attribute
    of the instance: parameter names, the state dict and saved adapters do not change, and checkpointing
    (``memory``, transformers' own) wraps the compiled forward. The layers share one code object, so one compiled
    graph serves them all (one more where the first layer's input needs no gradient): the compile time is one
    layer's, not the model's. The layers' lean frozen forwards are taken off first
    (:func:`~slimtune.core.lean_layers.remove_within`: each would be a guard of its own), and a transformers model's
    KV cache is turned off (``config.use_cache = False``: each layer's cache update would be a guard too; a training
    step needs no cache), and the layers are marked compiled (:func:`~slimtune.core.tracing.mark_compiled`: no eager
    work is done ahead for them, such as DoRA's step vectors, which their compiled forwards would not use). Inductor
    fuses what runs between the matrix products (norms, rotary, SwiGLU, residual adds; the adapters' Functions
    compile without a graph break: ``tests/core/test_compile.py``). A layer with sibling LoRA layers that read one
    input (q/k/v, gate/up) runs eagerly until they have learnt so (the first step), then compiled with each such
    chain as one Function (:mod:`slimtune.core.siblings`), as eager steps run them, and with each chain's frozen
    weights and A's in one tensor, so that one GEMM gives the chain's base outputs and ``x Aᵀ`` (and two its ``dx``;
    a LoRA layer in no chain, such as o or down, is stacked alone: :mod:`slimtune.core.stacked_rows`; gate/up is
    stacked wide, each member's weight and B one matrix: :mod:`slimtune.core.wide_rows`). DoRA's chains are stacked as
    rows too, and run :mod:`slimtune.methods.dora.stacked` on them, which also forms every member's norm from one
    GEMM."""
    layers = layer_stack(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    for layer in layers:
        lean_layers.remove_within(layer)
        mark_compiled(layer)
        compiled = torch.compile(layer.forward, **options)
        groups = watched_groups(layer)
        layer.forward = _LearnThenCompiled(layer.forward, compiled, groups, model) if groups else compiled
    return len(layers)


class _LearnThenCompiled:
    """A compiled layer's forward where sibling LoRA layers within it (q/k/v, gate/up: :mod:`slimtune.core.siblings`)
    learn which of them read one input: eager while any of its groups learns (the first step, until a backward pass
    has run through them), then the compiled forward, whose graph runs each learnt chain as one Function, its frozen
    weights and A's stacked in one tensor (:mod:`slimtune.core.stacked_rows`; checked before every call). Held
    outputs a traced frame left untaken are dropped after each compiled call."""

    def __init__(self, eager: Any, compiled: Any, groups: list[SiblingGroup], model: nn.Module) -> None:
        self.eager, self.compiled, self.groups = eager, compiled, groups
        self.stacks = LayerStacks(groups, model)  # notes the frozen weights now, before any FSDP wrapper
        self.stacked_as_learnt = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.stacks.keep()  # stacked again where the model moved (.to()) or took new tensors since
        if still_learning(self.groups):  # the first step, or again after a checkpoint (siblings.relearn)
            self.stacked_as_learnt = False
            return self.eager(*args, **kwargs)
        if not self.stacked_as_learnt:  # each learnt chain's weights and A's in one tensor
            self.stacks.build()
            self.stacked_as_learnt = True
        try:
            return self.compiled(*args, **kwargs)
        finally:
            for group in self.groups:
                group.clear_traced()
