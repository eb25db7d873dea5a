"""The SwiGLU Function (slimtune.core.swiglu) and the lean gated MLP of transformers' Llama-family models: PyTorch's
own numbers bit for bit on the CPU, one tensor fewer saved per MLP, and the Triton kernels against the references
under ``TRITON_INTERPRET=1`` (float32 and float16; bf16 on the GPU: ``test_lean_llama_cuda.py``)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimtune
from slimtune.core import lean_layers
from slimtune.core.swiglu import SwigluFunction

from ..helpers import causal_lm_step_saved, check_interpreted_errors, perturb_adapters

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_is_autograd_bit_for_bit(dtype):
    torch.manual_seed(0)
    g, u = (torch.randn(3, 5, 16) * 3).to(dtype), torch.randn(3, 5, 16).to(dtype)
    dh = torch.randn(3, 5, 16).to(dtype)
    ga, ua = g.clone().requires_grad_(), u.clone().requires_grad_()
    h = SwigluFunction.apply(ga, ua)
    h.backward(dh)
    gp, up = g.clone().requires_grad_(), u.clone().requires_grad_()
    ref = F.silu(gp) * up
    ref.backward(dh)
    assert torch.equal(h, ref) and torch.equal(ga.grad, gp.grad) and torch.equal(ua.grad, up.grad)


def _tiny_llama(act: str = "silu") -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, hidden_act=act)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("recipe", [False, True])
def test_lean_mlp_in_a_llama_is_the_plain_step_bit_for_bit_and_saves_less(recipe, monkeypatch):
    """silu(gate(x)) is not kept; with the down_proj recipe on (h at least MLP_RECIPE_BYTES; here every h) h = silu(g)·u
    is not kept either."""
    if recipe:
        monkeypatch.setattr(lean_layers, "MLP_RECIPE_BYTES", 0)
    base = _tiny_llama()
    ids = torch.randint(0, 100, (2, 9))
    runs = []
    for lean in (True, False):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        slimtune.adapt(model, slimtune.LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
        perturb_adapters(model)
        mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
        assert len(mlps) == 2 and all(lean_layers.installed(m) for m in mlps)
        if not lean:
            for m in mlps:
                del m.forward
        runs.append(causal_lm_step_saved(model, ids))
    (lean_out, lean_grads, lean_bytes), (out, grads, plain_bytes) = runs
    assert torch.equal(lean_out, out) and all(torch.equal(a, b) for a, b in zip(lean_grads, grads))
    # per MLP, silu(gate(x)) and (down_proj's adapter keeping the recipe instead) h = silu(g)·u: [2, 9, 128] bf16 each
    assert plain_bytes - lean_bytes == 2 * (2 if recipe else 1) * (2 * 9 * 128 * 2)


def test_lean_mlp_only_with_silu_and_runs_plainly_without_gradients():
    gelu = _tiny_llama("gelu")
    slimtune.adapt(gelu, slimtune.LoraConfig(r=4, target_modules=["down_proj"]))
    assert not any(lean_layers.installed(m) for m in gelu.modules() if type(m).__name__ == "LlamaMLP")
    model = _tiny_llama()
    slimtune.adapt(model, slimtune.LoraConfig(r=4, target_modules=["down_proj"]))
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(mlp(x), type(mlp).forward(mlp, x))
    y = mlp(x)  # gate and up frozen and x without grad: nothing to pass on, the plain product
    assert y.grad_fn is not None and "Swiglu" not in type(y.grad_fn.next_functions[0][0]).__name__


INTERPRETED = r"""
import json, torch
from slimtune.core.swiglu import swiglu_reference, swiglu_backward_reference
from slimtune.core.triton_swiglu import swiglu_forward_triton, swiglu_backward_triton
from tests.helpers import rel_err

torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float16):
    for shape in ((7,), (3, 5, 33), (2, 2100)):
        g, u, dh = (torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        h = swiglu_forward_triton(g, u)
        dg, du = swiglu_backward_triton(dh.expand(shape), g, u)
        rdg, rdu = swiglu_backward_reference(dh, g, u)
        results[f"{str(dtype)[6:]}/{shape}"] = [rel_err(h, swiglu_reference(g, u)), rel_err(dg, rdg), rel_err(du, rdu)]
print("RESULTS " + json.dumps(results))
"""


def test_triton_kernels_match_the_references_interpreted():
    check_interpreted_errors(INTERPRETED, cases=6)
