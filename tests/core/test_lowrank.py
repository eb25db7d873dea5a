"""The LoRA autograd Function against a float64 reference, gradcheck, saved tensors, variant choice."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from slimtune.core.lowrank import (LowRankLinearFunction, backward_flops, choose_backward, dropout_keep_mask,
                                   lowrank_linear)
from slimtune.methods.lora import lora_linear_reference
from tests.helpers import BF16_TOL, FP32_TOL, rel_err


def _inputs(n=6, d_in=10, d_out=7, r=3, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    bb = torch.randn(d_out, r, generator=g, dtype=torch.float64)  # non-zero B
    return [t.to(dtype) if t is not None else None for t in (x, w, b, a, bb)]


def test_gradcheck_float64():
    x, w, b, a, bb = _inputs()
    x.requires_grad_(); a.requires_grad_(); bb.requires_grad_(); w.requires_grad_(); b.requires_grad_()
    f = lambda *t: LowRankLinearFunction.apply(*t, 0.7, 0.0, 0)
    assert torch.autograd.gradcheck(f, (x, w, b, a, bb))


def test_gradcheck_with_dropout_float64():
    x, w, b, a, bb = _inputs()
    for t in (x, a, bb):
        t.requires_grad_()
    f = lambda x, a, bb: LowRankLinearFunction.apply(x, w, b, a, bb, 1.3, 0.4, 1234)
    assert torch.autograd.gradcheck(f, (x, a, bb))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("variant", ["recompute", "gram"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_float64_reference(dtype, tol, variant, dropout, monkeypatch):
    monkeypatch.setattr("slimtune.core.lowrank.choose_backward", lambda *args: variant)
    x64, w64, b64, a64, bb64 = _inputs(n=33, d_in=64, d_out=48, r=8)
    seed, s = 99, 0.5
    leaves64 = [t.clone().requires_grad_() for t in (x64, a64, bb64)]
    mask = dropout_keep_mask(x64.reshape(-1, 64), dropout, seed).reshape(x64.shape) if dropout else None
    drop = (lambda t: t * mask) if dropout else (lambda t: t)
    ref = lora_linear_reference(leaves64[0], w64, b64, leaves64[1], leaves64[2], s, drop)
    dy = torch.randn_like(ref)
    ref.backward(dy)

    leaves = [t.to(dtype).requires_grad_() for t in (x64, a64, bb64)]
    y = LowRankLinearFunction.apply(leaves[0], w64.to(dtype), b64.to(dtype), leaves[1], leaves[2], s, dropout, seed)
    y.backward(dy.to(dtype))
    assert y.dtype == dtype
    if dropout and dtype == torch.bfloat16:
        # the mask is drawn in the activation dtype from the same seed; compare against that mask
        mask16 = dropout_keep_mask(leaves[0].detach().reshape(-1, 64), dropout, seed).reshape(x64.shape).double()
        leaves64 = [t.detach().clone().requires_grad_() for t in (x64, a64, bb64)]
        ref = lora_linear_reference(leaves64[0], w64, b64, leaves64[1], leaves64[2], s, lambda t: t * mask16)
        ref.backward(dy)
    assert rel_err(y, ref) < tol
    for got, want in zip(leaves, leaves64):
        assert rel_err(got.grad, want.grad) < tol


def test_fp32_master_weights_with_bf16_activations():
    x, w, b, a, bb = _inputs(n=16, d_in=32, d_out=32, r=4, dtype=torch.float32)
    a.requires_grad_(); bb.requires_grad_()
    y = lowrank_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a, bb, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    ref_a, ref_b = a.detach().double().requires_grad_(), bb.detach().double().requires_grad_()
    lora_linear_reference(x.double(), w.double(), b.double(), ref_a, ref_b, 2.0).sum().backward()
    assert rel_err(a.grad, ref_a.grad) < BF16_TOL and rel_err(bb.grad, ref_b.grad) < BF16_TOL


def test_no_input_grad_when_input_does_not_require_it():
    x, w, b, a, bb = _inputs(dtype=torch.float32)
    a.requires_grad_(); bb.requires_grad_()
    lowrank_linear(x, w, b, a, bb, 1.0).sum().backward()
    assert x.grad is None and w.grad is None and a.grad is not None


def test_saves_only_the_input_and_parameters():
    """No x@A, no dropped copy, no fp32 copy: the only activation saved is x itself, even with dropout."""
    x, w, b, a, bb = _inputs(dtype=torch.bfloat16)
    x.requires_grad_()
    params = [torch.nn.Parameter(t) for t in (a.float(), bb.float())]
    packed = []
    with saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        lowrank_linear(x, w, b, params[0], params[1], 1.0, dropout_p=0.2)
    ptrs = {t.data_ptr() for t in packed}
    assert ptrs <= {x.data_ptr(), w.data_ptr(), params[0].data_ptr(), params[1].data_ptr()}
    assert x.data_ptr() in ptrs


def test_variant_choice_by_flops():
    # Llama-like layer, many tokens, small rank: thin GEMMs win
    assert choose_backward(8192, 4096, 4096, 16) == "recompute"
    # a tiny layer with huge token count and a rank as large as the layer: the gram matrix is cheaper
    assert choose_backward(10**6, 32, 32, 32) == "gram"
    for v in ("recompute", "gram"):
        assert backward_flops(v, 10, 20, 30, 4) > 0
    with pytest.raises(ValueError):
        backward_flops("dense", 1, 1, 1, 1)
