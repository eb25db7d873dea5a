"""diffusers' ``Attention`` called without its per-call signature inspection, and its default processor's body run
without its no-op steps (installed by :mod:`.lean_layers`).

``Attention.forward`` (diffusers 0.42) runs ``inspect.signature`` on its processor at every call, to drop keyword
arguments the processor does not take, then calls the processor. With no extra keyword arguments — every call a
UNet or DiT makes during training — there is nothing to drop, and the call is exactly
``processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...)``. The inspection costs tens of
microseconds of host time per call on the CPU box (RESULTS.md runs 91, 95); a Stable Diffusion 1.5 step makes 32
such calls, and a step at a few thousand tokens is host-bound. :func:`direct_call` makes that direct call, and a
call with extra keyword arguments goes through diffusers' own forward (which inspects, filters and warns as before).

Where the processor is diffusers' default ``AttnProcessor2_0`` and the module and call are in the plain form a UNet's
and a DiT's transformer blocks use (:func:`plain_call`: a 3-D input, no mask, no spatial, group, q/k or cross norm,
no residual connection, an output rescale factor of 1), :func:`attention_body` runs the processor's own ops for
that form and leaves out what does nothing there: the branches for the other forms, the output dropout at p = 0
(``F.dropout`` returns its input), and the division by the rescale factor 1 (``x / 1`` is ``x`` bit for bit, but it is
a kernel and an autograd node each way, twice per transformer block). Values and gradients are the processor's bit
for bit (tested); any other processor, form or call goes to the processor itself.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: ``(module, class)`` of diffusers' attention module whose forward only inspects and forwards to its processor
#: (:mod:`.lean_layers` installs :func:`direct_call` where a module is this class with its class's forward)
ATTENTION_CLASS = ("diffusers.models.attention_processor", "Attention")


@functools.cache
def _default_processor() -> type:
    """diffusers' ``AttnProcessor2_0`` (asked only for an ``Attention`` module: diffusers is loaded)."""
    return sys.modules[ATTENTION_CLASS[0]].AttnProcessor2_0


def plain_call(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> bool:
    """Whether this call is one :func:`attention_body` runs as the processor would: diffusers' ``AttnProcessor2_0``
    itself (its class, not a subclass), a 3-D ``hidden_states`` without a mask, and a module with no spatial, group,
    q/k or (for cross-attention) cross norm, no residual connection, an output rescale factor of 1 and its output
    projection and dropout."""
    return (type(attn.processor) is _default_processor() and attention_mask is None
            and isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3
            and attn.rescale_output_factor == 1 and not attn.residual_connection
            and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
            and (encoder_hidden_states is None or not attn.norm_cross) and len(attn.to_out) == 2)


def attention_body(attn: nn.Module, hidden_states: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
    """``AttnProcessor2_0``'s ops for a :func:`plain_call`: x ``[B, N, C]`` (and the context ``[B, M, C_ctx]``, or
    None for self-attention) -> ``[B, N, C_out]``."""
    batch = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    key = attn.to_k(context)
    value = attn.to_v(context)
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
    projection, dropout = attn.to_out
    out = projection(out)
    return dropout(out) if dropout.training and dropout.p > 0 else out


def direct_call(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **cross_attention_kwargs: Any) -> torch.Tensor:
    """``attn(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)`` as diffusers computes
    it: the processor called directly when there are no extra keyword arguments, its body where :func:`plain_call`."""
    if cross_attention_kwargs:
        return type(attn).forward(attn, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    if plain_call(attn, hidden_states, encoder_hidden_states, attention_mask):
        return attention_body(attn, hidden_states, encoder_hidden_states)
    return attn.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)
