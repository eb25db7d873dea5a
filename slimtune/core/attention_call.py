"""diffusers' ``Attention`` called without its per-call signature inspection (installed by :mod:`.lean_layers`).

``Attention.forward`` (diffusers 0.42) runs ``inspect.signature`` on its processor at every call, to drop keyword
arguments the processor does not take, then calls the processor. With no extra keyword arguments — every call a
UNet or DiT makes during training — there is nothing to drop, and the call is exactly
``processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...)``. The inspection costs tens of
microseconds of host time per call on the CPU box (RESULTS.md runs 91, 95); a Stable Diffusion 1.5 step makes 32
such calls, and a step at a few thousand tokens is host-bound. :func:`direct_call` makes that direct call, and a
call with extra keyword arguments goes through diffusers' own forward (which inspects, filters and warns as before).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: ``(module, class)`` of diffusers' attention module whose forward only inspects and forwards to its processor
#: (:mod:`.lean_layers` installs :func:`direct_call` where a module is this class with its class's forward)
ATTENTION_CLASS = ("diffusers.models.attention_processor", "Attention")


def direct_call(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **cross_attention_kwargs: Any) -> torch.Tensor:
    """``attn(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)`` as diffusers computes
    it, calling the processor directly when there are no extra keyword arguments."""
    if cross_attention_kwargs:
        return type(attn).forward(attn, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return attn.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)
