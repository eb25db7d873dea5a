"""The lean Llama layers on a GPU, bf16 included (the CPU interpreter cannot check bf16): the frozen RMSNorm's Triton
kernels against the transformers module (its own roundings: equal but for rare one-ulp differences from the row sum's
order) and ``dx`` against the float64 definition, the fused ``F.rms_norm`` the lean norm runs on CUDA within one
rounding; SwiGLU against PyTorch's ops; a Llama's training step with and without the lean layers."""
from __future__ import annotations

import copy

import pytest
import torch

from slimtune.core.rms_norm import RmsNormFunction, rms_norm_forward
from slimtune.core.swiglu import SwigluFunction, swiglu_backward_reference, swiglu_reference

from ..helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")


def _assert_within_rounding(got: torch.Tensor, ref: torch.Tensor, rare: float) -> None:
    """got is ref but for rounding: fp32 within 1e-6 relative (Frobenius; single elements near a cancellation may
    differ by more ulps of their own); fp16 / bf16 by at most two ulps, in at most a ``rare`` fraction of the
    elements."""
    if ref.dtype == torch.float32:
        assert rel_err(got, ref) < 1e-6
        return
    ulp = torch.finfo(ref.dtype).eps * ref.abs().float().clamp_min(torch.finfo(ref.dtype).tiny)
    assert bool(((got.float() - ref.float()).abs() <= 2 * ulp).all())
    assert (got != ref).float().mean().item() < rare


@pytest.mark.parametrize("d", [64, 1000, 3072, 8192])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_rms_norm_kernels_on_the_gpu(d, dtype, tol):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(d, eps=1e-5).to("cuda", dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 257, d, device="cuda") * 3).to(dtype).requires_grad_()
    y, _ = rms_norm_forward(x.detach(), norm.weight, norm.variance_epsilon)
    plain = norm(x.detach())
    _assert_within_rounding(y, plain, rare=1e-3)
    dy = torch.randn_like(plain)
    RmsNormFunction.apply(x, norm.weight, norm.variance_epsilon).backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    y64.backward(dy.double())
    assert rel_err(y, y64) < tol and rel_err(x.grad, x64.grad) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_norm_runs_pytorchs_fused_kernel_within_one_rounding(dtype):
    """On CUDA the lean norm is ``F.rms_norm`` (one rounding where the module rounds twice): y within one ulp of the
    module's, the fraction that differs printed; dx against float64 as the module's own dx is."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from slimtune.core import lean_layers

    torch.manual_seed(0)
    plain = LlamaRMSNorm(3072, eps=1e-5).to("cuda", dtype).requires_grad_(False)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    lean = copy.deepcopy(plain)
    lean_layers.install(lean)
    assert lean_layers.installed(lean)
    x = (torch.randn(4, 512, 3072, device="cuda") * 3).to(dtype)
    runs = []
    for norm in (plain, lean):
        xg = x.clone().requires_grad_()
        y = norm(xg)
        runs.append(type(y.grad_fn))
        y.backward(torch.ones_like(y))
        runs.append((y.detach(), xg.grad))
    node_plain, (y_plain, dx_plain), node_lean, (y_lean, dx_lean) = runs
    assert node_lean is not node_plain  # not the module's ops
    ulp = torch.finfo(dtype).eps * y_plain.abs().float().clamp_min(torch.finfo(dtype).tiny)
    assert bool(((y_lean.float() - y_plain.float()).abs() <= ulp).all())
    print(f"{dtype}: {(y_lean != y_plain).float().mean().item():.4f} of y differ by one ulp")
    x64 = x.double().requires_grad_()
    y64 = plain.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    y64.backward(torch.ones_like(y64))
    assert rel_err(dx_lean, x64.grad) <= 2 * rel_err(dx_plain, x64.grad) + 1e-3


def test_float32_norm_weight_over_bf16_activations_on_the_gpu():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(3072, eps=1e-5).to("cuda").requires_grad_(False)  # float32, as prepare_model_for_kbit_training
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(2, 300, 3072, device="cuda") * 3).bfloat16().requires_grad_()
    y = RmsNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    plain = norm(x.detach())
    assert y.dtype == plain.dtype == torch.float32 and rel_err(y, plain) < 1e-3  # h rounds to bf16: rare flips
    dy = torch.randn_like(plain)
    y.backward(dy)
    x_plain = x.detach().clone().requires_grad_()
    norm(x_plain).backward(dy)
    assert x.grad.dtype == torch.bfloat16 and rel_err(x.grad, x_plain.grad) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swiglu_kernels_on_the_gpu(dtype):
    torch.manual_seed(0)
    g, u = (torch.randn(2, 300, 1000, device="cuda") * 3).to(dtype), torch.randn(2, 300, 1000, device="cuda").to(dtype)
    dh = torch.randn_like(g)
    ga, ua = g.clone().requires_grad_(), u.clone().requires_grad_()
    h = SwigluFunction.apply(ga, ua)
    h.backward(dh)
    for got, ref in ((h, swiglu_reference(g, u)), *zip((ga.grad, ua.grad), swiglu_backward_reference(dh, g, u))):
        _assert_within_rounding(got, ref, rare=1e-2)


def test_llama_step_with_lean_layers_matches_the_plain_one():
    import slimtune
    from slimtune.core import lean_layers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=500)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 500, (2, 64), device="cuda")
    results = []
    for lean in (True, False):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        slimtune.adapt(model, slimtune.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                                                         "down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        if not lean:
            for m in model.modules():
                if lean_layers.installed(m):
                    del m.forward
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.float(), [p.grad.float() for p in model.parameters() if p.requires_grad]))
    (lean_logits, lean_grads), (logits, grads) = results
    assert rel_err(lean_logits, logits) < 1e-2
    assert max(rel_err(a, b) for a, b in zip(lean_grads, grads)) < 3e-2
