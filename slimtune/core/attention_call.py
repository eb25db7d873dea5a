"""diffusers' ``Attention`` called without its per-call signature inspection (installed by :mod:`.lean_layers`).

``Attention.forward`` (diffusers 0.42) runs ``inspect.signature`` on its processor at every call, to drop keyword
arguments the processor does not take, then calls the processor. With no extra keyword arguments — every call a
UNet or DiT makes during training — there is nothing to drop, and the call is exactly
``processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...)``. The inspection costs tens of
microseconds of host time per call on the CPU box (RESULTS.md runs 91, 95); a Stable Diffusion 1.5 step makes 32
such calls, and a step at a few thousand tokens is host-bound. :class:`AttentionCall` makes that direct call, and any call with extra keyword
arguments goes through diffusers' own forward (which inspects, filters and warns as before).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

#: ``(module, class)`` of diffusers' attention module whose forward only inspects and forwards to its processor
ATTENTION_CLASS = ("diffusers.models.attention_processor", "Attention")


def is_diffusers_attention(m: nn.Module) -> bool:
    """Whether ``m`` is diffusers' ``Attention`` with that class's own forward (the one this module knows)."""
    cls = type(m)
    module, name = ATTENTION_CLASS
    if cls.__module__ != module or cls.__name__ != name:
        return False
    return cls.forward is getattr(sys.modules[module], name).forward


def direct_call(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **cross_attention_kwargs: Any) -> torch.Tensor:
    """``attn(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)`` as diffusers computes
    it, calling the processor directly when there are no extra keyword arguments."""
    if cross_attention_kwargs:
        return type(attn).forward(attn, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return attn.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)
