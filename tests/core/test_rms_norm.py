"""The frozen RMSNorm Function (slimtune.core.rms_norm) and its lean install on transformers' RMSNorm modules: the
module's forward bit for bit on the CPU, gradients against float64, less saved for backward in bf16, and the Triton
kernels against the references under ``TRITON_INTERPRET=1`` (float32 and float16; bf16 on the GPU:
``test_lean_llama_cuda.py``)."""
from __future__ import annotations

import copy

import pytest
import torch

import slimtune
from slimtune.core import lean_layers
from slimtune.core.rms_norm import (RmsNormFunction, rms_norm_backward_reference, rms_norm_forward,
                                    rms_norm_reference)

from ..helpers import causal_lm_step_saved, check_interpreted_errors, perturb_adapters, rel_err

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402


def _norm(d: int, dtype: torch.dtype, eps: float = 1e-5) -> LlamaRMSNorm:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(d, eps=eps).to(dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_the_module_bit_for_bit(dtype):
    norm = _norm(48, dtype)
    x = (torch.randn(3, 5, 48) * 3).to(dtype)
    y, rstd = rms_norm_reference(x, norm.weight, norm.variance_epsilon)
    assert torch.equal(y, norm(x)) and rstd.dtype == torch.float32 and rstd.shape == (3, 5, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_function_gradient_matches_float64_autograd(dtype, tol):
    norm = _norm(40, dtype)
    x = (torch.randn(2, 7, 40) * 2).to(dtype).requires_grad_()
    dy = torch.randn(2, 7, 40).to(dtype)
    y = RmsNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()  # the definition in float64 (the module itself computes in float32)
    y64 = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    y64.backward(dy.double())
    assert rel_err(y, y64) < tol and rel_err(x.grad, x64.grad) < tol


def test_backward_reference_rounds_the_product_gradient_as_autograd():
    norm = _norm(64, torch.bfloat16)
    x = (torch.randn(4, 64) * 2).bfloat16().requires_grad_()
    dy = torch.randn(4, 64).bfloat16()
    norm(x).backward(dy)
    _, rstd = rms_norm_reference(x.detach(), norm.weight, norm.variance_epsilon)
    got = rms_norm_backward_reference(dy, x.detach(), norm.weight, rstd)
    assert got.dtype == torch.bfloat16 and rel_err(got, x.grad) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_on_half_activations_is_the_module(dtype):
    """PEFT's ``prepare_model_for_kbit_training`` leaves norms in float32 over bf16 / fp16 activations."""
    norm = _norm(40, torch.float32)
    x = (torch.randn(2, 7, 40) * 2).to(dtype).requires_grad_()
    dy = torch.randn(2, 7, 40)
    y = RmsNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    plain = norm(x.detach())
    assert y.dtype == plain.dtype == torch.float32 and torch.equal(y, plain)
    y.backward(dy)
    x_plain = x.detach().clone().requires_grad_()
    norm(x_plain).backward(dy)
    assert x.grad.dtype == dtype and rel_err(x.grad, x_plain.grad) < 1e-2


def test_meta_tensors_get_the_kernel_outputs_only():
    x = torch.empty(2, 3, 8, device="meta", dtype=torch.bfloat16)
    y, rstd = rms_norm_forward(x, torch.empty(8, device="meta", dtype=torch.bfloat16), 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype and rstd.dtype == torch.float32
    y, _ = rms_norm_forward(x, torch.empty(8, device="meta"), 1e-6)
    assert y.dtype == torch.float32


def _tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def _adapted(base: torch.nn.Module, lean: bool) -> torch.nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    slimtune.adapt(model, slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_adapters(model)
    if not lean:
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                del module.forward
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_in_a_llama_keeps_its_outputs_and_saves_less(dtype):
    base = _tiny_llama(dtype)
    ids = torch.randint(0, 100, (2, 9))
    runs = []
    for lean in (True, False):
        model = _adapted(base, lean)
        norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
        assert len(norms) == 5 and all(lean_layers.installed(m) == lean for m in norms)
        runs.append(causal_lm_step_saved(model, ids))
    (lean_out, lean_grads, lean_bytes), (out, grads, plain_bytes) = runs
    assert torch.equal(lean_out, out)  # the CPU runs the module's own ops
    assert max(rel_err(a, b) for a, b in zip(lean_grads, grads)) < (1e-5 if dtype == torch.float32 else 2e-2)
    # bf16: the module keeps a float32 copy of each norm's input (4 bytes an element), the Function the input (2)
    assert lean_bytes < plain_bytes if dtype == torch.bfloat16 else lean_bytes == plain_bytes


def test_lean_rms_norm_steps_aside_where_it_does_not_apply():
    model = _adapted(_tiny_llama(torch.float32), lean=True)
    norm = model.model.norm
    x = torch.randn(2, 3, 64, requires_grad=True)
    calls = []
    original = RmsNormFunction.apply

    def counting(*args):
        calls.append(args)
        return original(*args)

    RmsNormFunction.apply = counting
    try:
        norm(x)  # lean
        norm(x.detach())  # no gradient to pass on
        with torch.no_grad():
            norm(x)
        norm(x.bfloat16())  # a float32 weight on bf16 activations: lean, its output float32 as the module's
        norm.weight.data = norm.weight.data.bfloat16()
        norm(x)  # a bf16 weight on float32 activations: the module's own promotion
        norm.weight.data = norm.weight.data.float()
        norm.weight.requires_grad_(True)
        norm(x)  # a trained weight
    finally:
        RmsNormFunction.apply = original
    assert len(calls) == 2 and calls[1][0].dtype == torch.bfloat16


def test_other_rms_norms_are_left_alone():
    class LookAlikeRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    model = torch.nn.Sequential(LookAlikeRMSNorm(8), torch.nn.Linear(8, 8))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["1"]))
    assert not lean_layers.installed(model[0])


INTERPRETED = r"""
import json, torch
from slimtune.core.rms_norm import rms_norm_reference, rms_norm_backward_reference, rms_norm_forward, rms_norm_backward
from slimtune.core.triton import use_triton
from tests.helpers import rel_err

torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float16):
    for rows, d in ((5, 7), (33, 130), (4, 1000)):
        x = (torch.randn(rows, d) * 3).to(dtype)
        w = (torch.rand(d) + 0.5).to(dtype)
        dy = torch.randn(rows, d).to(dtype)
        assert use_triton(x)
        y, rstd = rms_norm_forward(x, w, 1e-5)
        ry, rrstd = rms_norm_reference(x, w, 1e-5)
        dx = rms_norm_backward(dy, x, w, rstd)
        rdx = rms_norm_backward_reference(dy, x, w, rrstd)
        key = f"{str(dtype)[6:]}/{rows}x{d}"
        results[key] = [rel_err(y, ry), rel_err(rstd, rrstd.view(-1)), rel_err(dx, rdx)]
    # a 3-D input whose rows are strided (a slice of a wider tensor) and a stride-0 gradient
    wide = (torch.randn(2, 6, 40) * 2).to(dtype)
    x = wide[..., :24]
    w = (torch.rand(24) + 0.5).to(dtype)
    y, rstd = rms_norm_forward(x, w, 1e-6)
    ry, rrstd = rms_norm_reference(x, w, 1e-6)
    ones = torch.ones((), dtype=dtype).expand(2, 6, 24)
    dx = rms_norm_backward(ones, x, w, rstd)
    rdx = rms_norm_backward_reference(ones, x, w, rrstd)
    results[f"{str(dtype)[6:]}/strided"] = [rel_err(y, ry), rel_err(dx, rdx)]
    # a float32 weight over these activations: y float32, dx in x's dtype
    x = (torch.randn(9, 50) * 2).to(dtype)
    w32 = torch.rand(50) + 0.5
    y, rstd = rms_norm_forward(x, w32, 1e-5)
    ry, rrstd = rms_norm_reference(x, w32, 1e-5)
    dy32 = torch.randn(9, 50)
    dx = rms_norm_backward(dy32, x, w32, rstd)
    rdx = rms_norm_backward_reference(dy32, x, w32, rrstd)
    assert y.dtype == ry.dtype == torch.float32 and dx.dtype == rdx.dtype == dtype
    results[f"{str(dtype)[6:]}/float32_weight"] = [rel_err(y, ry), rel_err(dx, rdx)]
print("RESULTS " + json.dumps(results))
"""


def test_triton_kernels_match_the_references_interpreted():
    check_interpreted_errors(INTERPRETED, cases=10)


def test_unload_gives_the_llama_its_own_forwards_back():
    model = _adapted(_tiny_llama(torch.float32), lean=True)
    lean = [m for m in model.modules() if lean_layers.installed(m)]
    assert {type(m).__name__ for m in lean} == {"LlamaRMSNorm", "LlamaMLP"}
    slimtune.unload(model)
    assert not any(lean_layers.installed(m) for m in model.modules())
    assert all("forward" not in m.__dict__ for m in lean)
