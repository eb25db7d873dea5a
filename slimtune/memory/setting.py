"""One switch for what training trades for memory: ``memory="fast" | "balanced" | "max-fit"``.

=============  ===========================================================================================
``fast``       nothing extra: every activation kept, no recompute (the default; the fastest step)
``balanced``   language models: the causal-LM loss through the output head in chunks, never the
               ``[tokens, vocab]`` logits (:mod:`.chunked_loss`), and every transformer layer checkpointed
               (:mod:`.recompute`): one more forward of the layers per step, activations of one layer at a time.
               Diffusion models (UNet, DiT): each feed-forward input projection and its activation recomputed in
               backward (:func:`~.recompute.checkpoint_feed_forwards`): one more projection GEMM per block
``max-fit``    ``balanced``, and the checkpointed layer inputs kept in pinned CPU memory, copied on a side
               stream (:mod:`.offload`): what stays on the GPU no longer grows with the number of layers
               (language models only)
=============  ===========================================================================================

Every setting, ``fast`` included, runs on the lean frozen layers :func:`slimtune.adapt` installs
(:mod:`slimtune.core.lean_layers`: exact, no recompute but one GroupNorm pass per GroupNorm + SiLU pair).

:func:`memory_setting` checks a name and says what it turns on; :func:`apply_memory_setting` installs the
recompute and offload on a model (the loss is the training loop's:
:func:`~slimtune.memory.chunked_loss.chunked_causal_lm_loss`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from .recompute import (
    LayerCheckpointing,
    check_plain_layers,
    checkpoint_feed_forwards,
    checkpoint_layers,
    feed_forward_projections,
)

MEMORY_SETTINGS = ("fast", "balanced", "max-fit")


@dataclasses.dataclass(frozen=True)
class MemorySetting:
    """What a ``memory`` setting turns on."""

    name: str
    chunked_loss: bool
    checkpoint: bool
    offload: bool


def memory_setting(name: str | MemorySetting, field: str = "memory") -> MemorySetting:
    """The setting called ``name``; :class:`ConfigError` (naming ``field``) for an unknown one."""
    if isinstance(name, MemorySetting):
        return name
    if name not in MEMORY_SETTINGS:
        raise ConfigError(f"unknown {field} setting {name!r}; choose from {', '.join(MEMORY_SETTINGS)}")
    return MemorySetting(name, chunked_loss=name != "fast", checkpoint=name != "fast", offload=name == "max-fit")


def apply_memory_setting(model: nn.Module, memory: str | MemorySetting,
                         context_fn: Callable[[], Any] | None = None, plain_layers: int = 0
                         ) -> LayerCheckpointing | None:
    """Install what ``memory`` needs on ``model`` (layer checkpointing, CPU offload; a diffusion model's
    feed-forward recompute); in place. Returns the installed checkpointing (``.remove()`` undoes it), or ``None``
    for ``"fast"``. Call it after the adapter
    is applied; compute the loss with :func:`~slimtune.memory.chunked_loss.chunked_causal_lm_loss` for the
    chunked loss. ``context_fn``: ``torch.utils.checkpoint``'s (the estimator's simulation passes one).
    ``plain_layers``: the last this many layers stay un-checkpointed (``balanced`` / ``max-fit``: faster, one
    layer's activations each; refused with ``fast``, which checkpoints nothing)."""
    setting = memory_setting(memory)
    check_plain_layers_with(setting, plain_layers)
    if not setting.checkpoint:
        return None
    if feed_forward_projections(model):  # a diffusers denoiser
        check_for_diffusion(setting, plain_layers)
        return checkpoint_feed_forwards(model, context_fn=context_fn)
    return checkpoint_layers(model, offload=setting.offload, context_fn=context_fn, plain_layers=plain_layers)


def check_for_diffusion(setting: MemorySetting, plain_layers: int = 0, field: str = "memory") -> MemorySetting:
    """``setting`` if a diffusion model can take it (``fast``, ``balanced``); else :class:`ConfigError`."""
    if setting.offload:
        raise ConfigError(f"{field}={setting.name!r} offloads a language model's checkpointed layers; a diffusion "
                          "model takes 'fast' or 'balanced' (or diffusers' gradient checkpointing)")
    if plain_layers:
        raise ConfigError(f"plain_layers={plain_layers} applies to a language model's layer stack, not a diffusion "
                          "model")
    return setting


def check_plain_layers_with(setting: MemorySetting, plain_layers: Any) -> int:
    """``plain_layers`` when it is a non-negative integer and ``setting`` checkpoints layers (or it is 0); else
    :class:`ConfigError`."""
    check_plain_layers(plain_layers)
    if plain_layers and not setting.checkpoint:
        raise ConfigError(f"plain_layers={plain_layers} needs memory='balanced' or 'max-fit' (memory="
                          f"{setting.name!r} checkpoints no layer)")
    return plain_layers
