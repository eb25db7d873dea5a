"""Quantising a model to NF4 and training every adapter method on the 4-bit base (QLoRA)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimtune
from slimtune import HraConfig, LohaConfig, LokrConfig, LoraConfig
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.quant import NF4Linear, dequantize, is_quantized_layer, nf4_storage_bytes, quantize
from tests.helpers import FP32_TOL, perturb_adapters, rel_err
from tests.toy_models import tiny_llama

CONFIGS = {
    "lora": lambda: LoraConfig(r=4, target_modules="all-linear"),
    "dora": lambda: LoraConfig(r=4, target_modules="all-linear", use_dora=True),
    "hra": lambda: HraConfig(r=4, target_modules="all-linear"),
    "loha": lambda: LohaConfig(r=4, target_modules="all-linear"),
    "lokr": lambda: LokrConfig(r=4, target_modules="all-linear"),
}
BACKENDS = ["slimtune", "bitsandbytes"]


def backend_available(backend: str) -> bool:
    if backend == "slimtune":
        return True
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def quantized_llama(backend: str = "slimtune") -> nn.Module:
    if not backend_available(backend):
        pytest.skip("bitsandbytes is not installed")
    return quantize(tiny_llama(), "nf4", backend=backend)


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))


def test_quantize_replaces_linears_but_not_the_head():
    model = quantized_llama()
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 * 7
    assert type(model.lm_head) is nn.Linear
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 64 * 64 // 2
    stored = sum(b.numel() * b.element_size() for b in q.buffers())
    assert stored == nf4_storage_bytes(64 * 64)


def test_quantize_options_and_errors():
    model = quantize(tiny_llama(), include_head=True, exclude=["down_proj"])
    assert isinstance(model.lm_head, NF4Linear)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    with pytest.raises(ConfigError, match="unknown quantisation"):
        quantize(tiny_llama(), "int3")
    with pytest.raises(ConfigError, match="backend"):
        quantize(tiny_llama(), backend="torchao")
    adapted = slimtune.adapt(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(SlimtuneError, match="quantise first"):
        quantize(adapted)
    with pytest.raises(SlimtuneError, match="no nn.Linear"):
        quantize(nn.Sequential(nn.ReLU()))


def test_casting_the_model_keeps_the_scales_exact():
    model = quantized_llama()
    q = model.model.layers[0].self_attn.q_proj
    before = q.dequantize(torch.float32)
    model.to(torch.bfloat16)
    assert torch.equal(q.dequantize(torch.float32), before)
    assert q.bias is None and q.weight.dtype == torch.uint8


def test_quantized_model_is_close_to_the_dense_one():
    dense = tiny_llama()
    model = quantize(copy.deepcopy(dense))
    with torch.no_grad():
        got, ref = model(tokens()).logits, dense(tokens()).logits
    assert rel_err(got, ref) < 0.3  # 4-bit weights (~9% error each) through a random 2-layer model: close, not equal


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapter_on_nf4_equals_adapter_on_dequantised_reference(method, backend):
    quantized = quantized_llama(backend)
    reference = dequantize(copy.deepcopy(quantized), torch.float32)
    assert not any(is_quantized_layer(m) for m in reference.modules())
    models = []
    for model in (quantized, reference):
        torch.manual_seed(0)
        slimtune.adapt(model, CONFIGS[method]())
        perturb_adapters(model, seed=1)
        model.train()
        models.append(model)
    outputs, grads = [], []
    for model in models:
        loss = model(tokens(), labels=tokens()).loss
        loss.backward()
        outputs.append(loss)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    assert rel_err(outputs[0], outputs[1]) < FP32_TOL
    assert rel_err(grads[0], grads[1]) < FP32_TOL


@pytest.mark.parametrize("method", list(CONFIGS))
def test_no_dense_weight_is_saved_for_backward(method):
    model = quantized_llama()
    slimtune.adapt(model, CONFIGS[method]())
    perturb_adapters(model, seed=1)
    dense_shapes = {tuple(m.handle.shape) for m in model.modules() if isinstance(m, NF4Linear)}
    params = {p.data_ptr() for p in model.parameters()}  # e.g. the dense head's own weight
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens(), labels=tokens()).loss
    loss.backward()
    assert saved and not dense_shapes & set(saved)


def test_merge_needs_dequantize_and_then_matches():
    model = quantized_llama()
    slimtune.adapt(model, LoraConfig(r=4, target_modules="all-linear"))
    perturb_adapters(model, seed=4)
    model.eval()
    with torch.no_grad():
        before = model(tokens()).logits
    with pytest.raises(SlimtuneError, match="dequantize"):
        slimtune.merge(model)
    dequantize(model, torch.float32)
    slimtune.merge(model)
    with torch.no_grad():
        after = model(tokens()).logits
    assert rel_err(after, before) < FP32_TOL


def test_adapter_checkpoint_from_nf4_base_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = quantized_llama()
    slimtune.adapt(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model, seed=5)
    slimtune.save_adapter(model, tmp_path)
    # PEFT on the dequantised base gives the same output as slimtune on the 4-bit base
    base = dequantize(quantized_llama(), torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    model.eval()
    theirs.eval()
    with torch.no_grad():
        assert rel_err(model(tokens()).logits, theirs(tokens()).logits) < FP32_TOL
    # and back: load into a fresh quantised model
    fresh = quantized_llama()
    slimtune.adapt(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    slimtune.load_adapter(fresh, tmp_path)
    fresh.eval()
    with torch.no_grad():
        assert rel_err(fresh(tokens()).logits, model(tokens()).logits) < FP32_TOL
