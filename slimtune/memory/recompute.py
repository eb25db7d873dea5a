"""Activation checkpointing per transformer layer, optionally offloading to the CPU.

:func:`checkpoint_layers` makes every layer of the model's layer stack (the longest ``nn.ModuleList`` of one
layer class: a decoder's ``layers``, GPT-2's ``h``, BERT's ``layer``) run under PyTorch's non-reentrant
``torch.utils.checkpoint``: forward keeps only the layer's inputs, backward runs the layer again to rebuild what
it needs. Non-reentrant checkpointing recomputes through any autograd Function, so every adapter method's
Function (LoRA, DoRA, HRA, LoHa, LoKr, on dense or NF4 weights) works unchanged, and the frozen embedding needs
no ``enable_input_require_grads``. The layer's own ``forward`` is wrapped on the instance (no module is
replaced, so parameter names and checkpoints do not change); :meth:`LayerCheckpointing.remove` undoes it.

* ``offload=True``: what the checkpoint keeps (each layer's input hidden states) goes to pinned CPU memory
  through :class:`~slimtune.memory.offload.CpuOffload`; its hooks are entered only for a layer whose input is
  on a CUDA device, or on meta in the estimator's simulation (elsewhere there is nothing to move, and outer
  hooks, such as the profiler's meter, keep seeing what the checkpoint saves).

Without gradients (``torch.no_grad()``, evaluation) the layers run as they are.

:func:`checkpoint_feed_forwards` is the diffusion models' version (``memory="balanced"`` on a UNet or DiT): each
transformer block's feed-forward input projection with its activation (diffusers' ``GEGLU``, ``GELU``,
``ApproximateGELU``, ``SwiGLU``: a module of ``diffusers.models.activations`` holding a ``proj``) keeps its input
``[tokens, dim]`` instead of the projection's output (``2·4·dim`` wide for GEGLU, where the gate's activation keeps
another ``4·dim``) and runs again in backward: one more projection GEMM per block. Flux's single-stream blocks
call their MLP projection and its activation as two modules (``proj_mlp``, then ``act_mlp``: a GELU that keeps the
``4·dim``-wide projection output); there the pair runs as one checkpointed call from ``proj_mlp`` (``act_mlp``
passes its input through while installed), which keeps only the block's normalised input — a tensor the attention
projections keep anyway.

Not here: selective recompute (keep attention's or the matrix products' outputs, recompute norms and SwiGLU)
through ``create_selective_checkpoint_contexts``: the adapter Functions update their matrix products' outputs
in place, which the selective cache refuses, and transformers' attention path did not replay op for op.
"""
from __future__ import annotations

import contextlib
from types import MethodType
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core import lean_layers
from ..errors import ConfigError
from ..models.layers import layer_stack
from .offload import CpuOffload


class _CheckpointedForward:
    """A layer's ``forward`` run under non-reentrant checkpointing (when gradients are on)."""

    def __init__(self, forward: Callable[..., Any], offload: CpuOffload | None,
                 previous: Callable[..., Any] | None, context_fn: Callable[[], Any] | None) -> None:
        self.forward, self.offload, self.context_fn = forward, offload, context_fn
        self.previous = previous  # an instance-level forward the layer had before (restored by remove)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        offload = self.offload is not None and any(isinstance(a, torch.Tensor) and (a.is_cuda or a.is_meta)
                                                   for a in args)
        with self.offload if offload else contextlib.nullcontext():  # type: ignore[union-attr]
            if self.context_fn is not None:
                return checkpoint(self.forward, *args, use_reentrant=False, context_fn=self.context_fn, **kwargs)
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


class _PassThrough:
    """An activation module's ``forward`` while its projection's checkpointed call applies it (see
    :func:`checkpoint_feed_forwards`): the input, unchanged."""

    def __init__(self, previous: Callable[..., Any] | None) -> None:
        self.previous = previous

    def __call__(self, x: Any) -> Any:
        return x


class _ProjectionWithActivation:
    """``activation(projection(x))`` from the two modules' own ``forward`` methods."""

    def __init__(self, projection: Callable[..., Any], activation: Callable[..., Any]) -> None:
        self.projection, self.activation = projection, activation

    def __call__(self, x: Any) -> Any:
        return self.activation(self.projection(x))


class LayerCheckpointing:
    """Checkpointing installed on ``layers``; :meth:`remove` restores their own ``forward``."""

    def __init__(self, layers: list[nn.Module], offload: CpuOffload | None) -> None:
        self.layers, self.offload = layers, offload

    def remove(self) -> None:
        for layer in self.layers:
            wrapper = layer.__dict__.get("forward")
            if isinstance(wrapper, (_CheckpointedForward, _PassThrough)):
                del layer.forward
                if wrapper.previous is not None:
                    layer.forward = wrapper.previous


def installed(model: nn.Module) -> bool:
    """Whether :func:`checkpoint_layers` is active on ``model``'s layers."""
    return any(isinstance(m.__dict__.get("forward"), _CheckpointedForward) for m in model.modules())


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether transformers' own checkpointing is on (``is_activation_checkpointing``, formerly
    ``is_gradient_checkpointing``)."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


def check_plain_layers(plain_layers: Any) -> int:
    """``plain_layers`` when it is a non-negative integer; else :class:`ConfigError`."""
    if isinstance(plain_layers, bool) or not isinstance(plain_layers, int) or plain_layers < 0:
        raise ConfigError(f"plain_layers must be a non-negative integer, got {plain_layers!r}")
    return plain_layers


def feed_forward_projections(model: nn.Module) -> list[nn.Module]:
    """The feed-forward input projections with their activations in ``model`` (diffusers' activation modules that
    hold a ``proj``: GEGLU, GELU, ApproximateGELU, SwiGLU); empty for a model without them (any transformers
    model)."""
    return [m for m in model.modules()
            if type(m).__module__ == "diffusers.models.activations" and isinstance(getattr(m, "proj", None), nn.Module)]


def split_mlps(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(proj_mlp, act_mlp)`` of each diffusers block that calls its MLP projection and activation as two modules
    (Flux's single-stream blocks); empty for other models."""
    return [(m.proj_mlp, m.act_mlp) for m in model.modules()
            if type(m).__module__.startswith("diffusers.") and isinstance(getattr(m, "proj_mlp", None), nn.Module)
            and isinstance(getattr(m, "act_mlp", None), nn.Module)]


def checkpoint_feed_forwards(model: nn.Module, context_fn: Callable[[], Any] | None = None) -> LayerCheckpointing:
    """Checkpoint every :func:`feed_forward_projections` module of a diffusion model, and every :func:`split_mlps`
    pair as one call (see the module docstring). Refused when the model already checkpoints (diffusers'
    ``enable_gradient_checkpointing`` or an earlier call) or has no such module."""
    if any(checkpointing_enabled(m) for m in model.modules()) or installed(model):
        raise ConfigError(f"{type(model).__name__} already checkpoints (diffusers' enable_gradient_checkpointing or "
                          "an earlier call): turn that off first")
    modules = feed_forward_projections(model)
    if not modules:
        raise ConfigError(f"{type(model).__name__} has no diffusers feed-forward projection (GEGLU, GELU, ...) to "
                          "recompute")
    for module in modules:
        # a lean GEGLU (core.lean_layers) runs its class's own forward inside: a checkpointed call keeps nothing of
        # it anyway, and the lean one would only rebuild its GELU once more in backward
        forward = MethodType(type(module).forward, module) if lean_layers.installed(module) else module.forward
        module.forward = _CheckpointedForward(forward, None, module.__dict__.get("forward"), context_fn)
    for projection, activation in split_mlps(model):
        pair = _ProjectionWithActivation(projection.forward, activation.forward)
        projection.forward = _CheckpointedForward(pair, None, projection.__dict__.get("forward"), context_fn)
        activation.forward = _PassThrough(activation.__dict__.get("forward"))
        modules += [projection, activation]
    return LayerCheckpointing(modules, None)


def checkpoint_layers(model: nn.Module, offload: bool = False, min_offload_bytes: int | None = None,
                      context_fn: Callable[[], Any] | None = None, plain_layers: int = 0) -> LayerCheckpointing:
    """Checkpoint the layers of ``model``'s layer stack (see the module docstring); ``offload``: keep the
    checkpointed inputs in pinned CPU memory (tensors of ``min_offload_bytes`` or more). ``plain_layers``: leave
    the last this many layers as they are (they keep their activations: no recompute, one layer's activations
    each; the last ones, because backward frees theirs first, before any recompute). Refused when the model
    already checkpoints (transformers' ``gradient_checkpointing_enable`` or an earlier call): the layers would
    recompute twice. ``context_fn``: ``torch.utils.checkpoint``'s (the estimator's simulation passes one)."""
    check_plain_layers(plain_layers)
    if checkpointing_enabled(model) or installed(model):
        raise ConfigError(f"{type(model).__name__} already checkpoints its layers (gradient_checkpointing_enable "
                          "or an earlier checkpoint_layers): turn that off first")
    layers = list(layer_stack(model))
    if plain_layers > len(layers):
        raise ConfigError(f"plain_layers={plain_layers} but {type(model).__name__} has {len(layers)} layers")
    layers = layers[:len(layers) - plain_layers]
    hooks = None
    if offload:
        hooks = CpuOffload() if min_offload_bytes is None else CpuOffload(min_offload_bytes)
    for layer in layers:
        layer.forward = _CheckpointedForward(layer.forward, hooks, layer.__dict__.get("forward"), context_fn)
    return LayerCheckpointing(layers, hooks)
