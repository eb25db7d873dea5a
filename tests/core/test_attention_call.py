"""slimtune.core.attention_call: diffusers' Attention called without its per-call signature inspection, and its
default processor's body without its no-op steps — the processor's values and gradients bit for bit, and the
processor itself wherever the form or the call differ."""
from __future__ import annotations

import copy

import pytest
import torch

import slimtune
from slimtune.core import lean_layers
from slimtune.core.attention_call import direct_call, plain_call
from tests.helpers import perturb_adapters

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def test_attention_is_called_directly_with_the_same_result():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8)
    lean = copy.deepcopy(attn)
    lean_layers.install(lean)
    assert lean_layers.installed(lean)
    x, enc = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    assert torch.equal(lean(x), attn(x)) and torch.equal(lean(x, enc), attn(x, enc))
    assert torch.equal(lean(x, encoder_hidden_states=enc), attn(x, encoder_hidden_states=enc))
    assert torch.equal(lean(x, unknown_key=1), attn(x, unknown_key=1))  # diffusers' own forward drops it


def _grads(attn: Attention, run, cross: bool) -> list[torch.Tensor]:
    """Output and the gradients of x, the context and every trainable parameter, for one fwd+bwd of ``run``."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    enc = torch.randn(2, 3, 12, generator=gen, requires_grad=True) if cross else None
    out = run(attn, x, enc)
    out.square().sum().backward()
    params = list(slimtune.trainable_parameters(attn))
    grads = [out.detach(), x.grad, *([enc.grad] if cross else []), *(p.grad.clone() for p in params)]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_the_default_processors_body_is_the_processor_bit_for_bit(cross):
    """A UNet block's attention (LoRA on its projections, training): the body the direct call runs gives the
    processor's output and gradients bit for bit, without the division by the rescale factor 1."""
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, cross_attention_dim=12 if cross else None)
    slimtune.adapt(attn, slimtune.LoraConfig(r=4, target_modules=_TARGETS))
    perturb_adapters(attn, seed=2)
    attn.train()
    x = torch.randn(2, 5, 16)
    assert type(attn.processor) is AttnProcessor2_0 and plain_call(attn, x, None, None)
    twin = copy.deepcopy(attn)  # each its first step: q/k/v run alone in both (grouped from the second on)
    direct = _grads(attn, lambda a, x, enc: direct_call(a, x, enc), cross)
    processor = _grads(twin, lambda a, x, enc: a.processor(a, x, encoder_hidden_states=enc), cross)
    assert all(torch.equal(a, b) for a, b in zip(direct, processor))
    out = direct_call(attn, x.requires_grad_(), torch.randn(2, 3, 12) if cross else None)
    assert "Div" not in type(out.grad_fn).__name__


def test_output_dropout_in_training_runs_as_the_processor_runs_it():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(3)
    direct = direct_call(attn, x)
    torch.manual_seed(3)
    assert torch.equal(direct, attn.processor(attn, x)) and (direct == 0).any()


@pytest.mark.parametrize("form", ["rescale", "residual", "mask", "image", "qk norm", "group norm", "cross norm",
                                  "subclass"])
def test_any_other_form_goes_to_the_processor(form):
    kwargs = {"rescale": dict(rescale_output_factor=2.0), "residual": dict(residual_connection=True),
              "qk norm": dict(qk_norm="layer_norm"), "group norm": dict(norm_num_groups=4),
              "cross norm": dict(cross_attention_dim=12, cross_attention_norm="layer_norm")}.get(form, {})
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, **kwargs)
    if form == "subclass":
        attn.set_processor(type("Custom", (AttnProcessor2_0,), {})())
    x = torch.randn(2, 16, 2, 3) if form == "image" else torch.randn(2, 6, 16)
    enc = torch.randn(2, 3, 12) if form == "cross norm" else None
    mask = torch.ones(2, 1, 6, dtype=torch.bool) if form == "mask" else None
    assert not plain_call(attn, x, enc, mask)
    assert torch.equal(direct_call(attn, x, enc, mask),
                       attn.processor(attn, x, encoder_hidden_states=enc, attention_mask=mask))
