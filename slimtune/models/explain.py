"""``slimtune profile --explain``: each adapted layer's variant choices for a preset's training step, found without
running it — the model is built and adapted on the meta device, one forward pass records every adapter's input,
and each adapter explains its choices for that input (:mod:`slimtune.core.explain`)."""
from __future__ import annotations

import torch

from ..core.explain import LayerExplanation, adapter_inputs, explain_layers
from ..core.inject import adapt
from ..core.tracing import mark_compiled
from .layers import layer_stack
from .presets import Preset, get_preset, resolve_dtype
from .workload import build_model, default_targets, forward_loss, make_adapter_config, make_inputs


def explain_preset(preset: str | Preset, method: str, rank: int, alpha: float | None, batch: int, seq: int,
                   dtype: str | torch.dtype = "bfloat16", compiled: bool = False) -> list[LayerExplanation]:
    """The choices of every adapted layer of ``preset`` adapted with ``method`` (the workload's default targets)
    for a step of ``batch`` x ``seq`` (diffusion presets: their default resolution), in ``dtype``; ``compiled``:
    as the layers run under :func:`~slimtune.models.layers.compile_layers` (``profile --compile``) from the second
    step on (the layers are marked compiled, not compiled: the meta device runs nothing)."""
    spec = get_preset(preset)
    torch_dtype = resolve_dtype(dtype)
    model = build_model(spec, "meta", torch_dtype, seed=0)
    adapt(model, make_adapter_config(method, rank, alpha, default_targets(spec, method)))
    if compiled:
        for layer in layer_stack(model):
            mark_compiled(layer)
    model.train()
    inputs = make_inputs(spec, model, batch, seq, "meta", torch_dtype)
    with adapter_inputs(model) as seen, torch.no_grad():
        forward_loss(spec, model, inputs)
    return explain_layers(model, seen)
