"""LoraLinear: math vs float64, q/k/v saving x once, merge/unmerge, disable, init, dtypes."""
import math

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import slimtune
from slimtune.methods.lora import LoraLinear, lora_linear_reference, lora_scaling
from tests.helpers import BF16_TOL, FP32_TOL, perturb_adapters, rel_err


class Attn(nn.Module):
    def __init__(self, d=32, kv=16):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(d + 2 * kv, d)

    def forward(self, x):
        return self.o_proj(torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1))


def _adapted(dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    m = Attn().to(dtype)
    slimtune.adapt(m, slimtune.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **cfg))
    perturb_adapters(m)
    return m


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("rslora", [False, True])
def test_module_matches_float64_reference(dtype, tol, rslora):
    layer = nn.Linear(40, 24).to(dtype).requires_grad_(False)
    lora = LoraLinear(layer, r=4, alpha=8, rslora=rslora)
    perturb_adapters(lora)
    x = torch.randn(3, 5, 40).to(dtype).requires_grad_()
    y = lora(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = (p.detach().double().requires_grad_() for p in (lora.lora_A, lora.lora_B))
    ref = lora_linear_reference(x64, layer.weight.double(), layer.bias.double(), a64, b64, lora.scaling)
    ref.backward(dy.double())
    assert lora.scaling == (8 / math.sqrt(4) if rslora else 2.0)
    assert rel_err(y, ref) < tol
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(lora.lora_A.grad, a64.grad) < tol and rel_err(lora.lora_B.grad, b64.grad) < tol
    assert layer.weight.grad is None


def test_qkv_sharing_one_input_store_it_once():
    m = _adapted(torch.bfloat16)
    x = torch.randn(4, 8, 32, dtype=torch.bfloat16, requires_grad=True)
    packed = []
    with saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        m(x)
    params = {p.data_ptr() for p in m.parameters()}
    activations = {t.data_ptr(): t.numel() * t.element_size() for t in packed if t.data_ptr() not in params}
    # x once for q/k/v, and the concatenated attention output once for o_proj (plus cat's own bookkeeping)
    x_bytes = x.numel() * x.element_size()
    assert x.data_ptr() in activations
    assert sum(1 for t in packed if t.data_ptr() == x.data_ptr()) == 3  # q, k and v pack the same x...
    assert sum(activations.values()) == x_bytes + 4 * 8 * 64 * 2  # ...which is stored once


def test_adapter_dtype_float32_master_weights():
    m = _adapted(torch.bfloat16, adapter_dtype=torch.float32)
    assert m.q_proj.lora_A.dtype == torch.float32 and m.q_proj.base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.q_proj.lora_A.grad.dtype == torch.float32


def test_init_default_and_gaussian():
    layer = nn.Linear(64, 32)
    d = LoraLinear(layer, r=16, alpha=16)
    assert torch.count_nonzero(d.lora_B) == 0 and d.lora_A.abs().max() <= 1 / math.sqrt(64) + 1e-6
    g = LoraLinear(layer, r=16, alpha=16, init="gaussian")
    assert torch.count_nonzero(g.lora_B) == 0 and abs(g.lora_A.std().item() - 1 / 16) < 0.02
    x = torch.randn(5, 64)
    assert torch.equal(d(x), layer(x))  # B = 0: the adapter starts as the identity
    assert lora_scaling(16, 4, True) == 8.0


def test_init_nora_unit_columns_and_linear_only():
    """NoRA (PEFT 0.22's ``init_lora_weights="nora"``): A's columns ``[r]`` at unit norm, B zero; a convolution's
    LoRA refuses it by name, as PEFT supports it for Linear layers only."""
    layer = nn.Linear(64, 32)
    n = LoraLinear(layer, r=16, alpha=16, init="nora")
    assert torch.count_nonzero(n.lora_B) == 0
    assert torch.allclose(n.lora_A.norm(dim=0), torch.ones(64), atol=1e-5)
    with pytest.raises(slimtune.ConfigError, match="nora"):
        slimtune.adapt(nn.Sequential(nn.Conv2d(4, 4, 3)), slimtune.LoraConfig(r=2, target_modules=["0"], init="nora"))


def test_init_orthogonal_starts_at_the_base_with_both_factors_nonzero():
    """PEFT's ``init_lora_weights="orthogonal"``: A and B from complementary halves of an orthogonal basis, so B A is
    zero up to rounding while neither is; an odd rank is refused by name."""
    layer = nn.Linear(64, 32).double()
    o = LoraLinear(layer, r=16, alpha=16, init="orthogonal")
    a, b = o.lora_A.detach(), o.lora_B.detach()
    assert torch.count_nonzero(a) == a.numel() and torch.count_nonzero(b) == b.numel()
    assert (b @ a).abs().max() < 1e-12 * b.norm() * a.norm()
    x = torch.randn(5, 64, dtype=torch.float64)
    assert rel_err(o(x), layer(x)) < 1e-12
    with pytest.raises(slimtune.ConfigError, match="even rank"):
        LoraLinear(nn.Linear(64, 32), r=3, alpha=3, init="orthogonal")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip_is_bit_exact(dtype):
    m = _adapted(dtype)
    original = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 32).to(dtype)
    with torch.no_grad():
        before = m(x)
        slimtune.merge(m)
        assert all(a.merged for _, a in slimtune.adapter_modules(m))
        assert not torch.equal(m.q_proj.base_layer.weight, original["q_proj.base_layer.weight"])
        merged = m(x)
        slimtune.unmerge(m)
        after = m(x)
    assert rel_err(merged, before) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    for k, v in m.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert torch.equal(after, before)


def test_merge_restores_bits_even_when_rounding_would_not():
    layer = nn.Linear(256, 256)
    lora = LoraLinear(layer, r=8, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_(std=10.0)  # an update as large as the weight: many roundings
    w0 = layer.weight.clone()
    lora.merge()
    lora.unmerge()
    assert torch.equal(layer.weight, w0)
    assert lora._merge_fix is None


def test_disable_adapters_gives_base_output_exactly():
    m = _adapted()
    base = Attn()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in m.state_dict().items() if "lora_" not in k})
    x = torch.randn(2, 32)
    with slimtune.disable_adapters(m):
        assert torch.equal(m(x), base(x))
    assert not torch.equal(m(x), base(x))
    slimtune.merge(m)
    with slimtune.disable_adapters(m):
        assert torch.equal(m(x), base(x))
    assert m.q_proj.merged


def test_hf_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 16)  # weight [16, 24]
    lora = LoraLinear(conv, r=4, alpha=4)
    perturb_adapters(lora)
    x = torch.randn(3, 16)
    ref = conv(x) + lora.scaling * (x @ lora.lora_A.t() @ lora.lora_B.t())
    assert rel_err(lora(x), ref) < FP32_TOL
    lora.merge()
    assert rel_err(conv(x), ref) < FP32_TOL


def test_autocast_computes_in_autocast_dtype():
    m = _adapted(torch.float32)
    x = torch.randn(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m.q_proj(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, m.q_proj(x)) < BF16_TOL


def test_wrong_input_width_is_a_clear_error():
    lora = LoraLinear(nn.Linear(8, 4), r=2, alpha=2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        lora(torch.randn(3, 9))
