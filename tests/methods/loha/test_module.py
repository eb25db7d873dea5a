"""LoHa: both paths (structured, folded) vs the dense float64 reference, low precision, saved tensors, merge,
dropout semantics against PEFT, the path chooser, 4-bit bases (a fake handle: same results, no dense weight
saved or kept)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import slimtune
from slimtune.core.costs import choose_path
from slimtune.methods.loha import LohaConfig, LohaLayer, loha_delta_weight
from slimtune.methods.loha.costs import loha_costs
from tests.helpers import BF16_TOL, FP32_TOL, check_merge_round_trip, rel_err
from tests.methods.fakes import (MaxAllocation, check_quantized_matches_dense, check_training_dropout_matches_peft,
                                 quantized_pair)

PATHS = ["structured", "folded"]
# (name, base layer factory, input shape, r, use_effective_conv2d)
CASES = [
    ("linear", lambda: nn.Linear(12, 20), (3, 5, 12), 3, False),
    ("linear-r2>d", lambda: nn.Linear(6, 5, bias=False), (7, 6), 4, False),
    ("conv2d-k3-s2", lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9), 2, False),
    ("conv2d-k1", lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 4), 3, False),
    ("conv2d-tucker-s2", lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9), 2, True),
    ("conv2d-tucker-dil", lambda: nn.Conv2d(5, 7, 3, padding=2, dilation=2), (1, 5, 8, 8), 3, True),
    ("conv1d-k3", lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 11), 3, False),
    ("conv1d-tucker", lambda: nn.Conv1d(6, 8, 3, stride=2), (2, 6, 11), 2, True),
    ("conv2d-groups2", lambda: nn.Conv2d(6, 8, 3, groups=2), (2, 6, 7, 7), 2, False),
]


def _params64(layer: LohaLayer) -> dict[str, torch.Tensor]:
    return {k: p.detach().double().clone().requires_grad_() for k, p in layer.peft_parameters().items()}


def dense_reference(layer: LohaLayer, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``base`` with weight ``W + ΔW`` (PEFT's dense recipe), float64, PyTorch autograd."""
    base = layer.base_layer
    delta = loha_delta_weight(params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"],
                              params.get("hada_t1"), params.get("hada_t2"), layer.scaling, base.weight.shape)
    w = base.weight.double() + delta
    b = base.bias.double() if base.bias is not None else None
    if isinstance(base, nn.Linear):
        return F.linear(x, w, b)
    conv = F.conv2d if w.dim() == 4 else F.conv1d
    return conv(x, w, b, base.stride, base.padding, base.dilation, base.groups)


def _layer(make, r, eff, path, dtype=torch.float64, seed=0, **kw) -> LohaLayer:
    torch.manual_seed(seed)
    return LohaLayer(make().to(dtype), r, alpha=1.5 * r, use_effective_conv2d=eff, init_weights=False, path=path,
                     **kw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,make,shape,r,eff", CASES, ids=[c[0] for c in CASES])
def test_matches_dense_reference_float64(name, make, shape, r, eff, path):
    layer = _layer(make, r, eff, path)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert layer.last_path == (path if layer.structured_ok else "folded")
    dy = torch.randn_like(y)
    y.backward(dy)
    params, x64 = _params64(layer), x.detach().clone().requires_grad_()
    ref = dense_reference(layer, x64, params)
    ref.backward(dy)
    assert rel_err(y, ref) < 1e-10
    assert rel_err(x.grad, x64.grad) < 1e-10
    for key, p in layer.peft_parameters().items():
        assert rel_err(p.grad, params[key].grad) < 1e-10, key


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=["linear", "conv", "tucker"])
def test_low_precision_against_float64(case, dtype, tol, path):
    _, make, shape, r, eff = case
    ref_layer = _layer(make, r, eff, path)
    layer = _layer(make, r, eff, path).to(dtype)
    x = torch.randn(shape, dtype=torch.float64)
    xl = x.to(dtype).requires_grad_()
    y = layer(xl)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(dtype))
    params, x64 = _params64(ref_layer), x.clone().requires_grad_()
    ref = dense_reference(ref_layer, x64, params)
    ref.backward(dy)
    assert y.dtype == dtype and rel_err(y, ref) < tol
    assert rel_err(xl.grad, x64.grad) < tol
    for key, p in layer.peft_parameters().items():
        assert p.grad.dtype == dtype and rel_err(p.grad, params[key].grad) < tol, key


@pytest.mark.parametrize("path", PATHS)
def test_fp32_master_weights_with_bf16_activations(path):
    torch.manual_seed(0)
    base = nn.Linear(32, 24).bfloat16()
    layer = LohaLayer(base, 4, 4.0, init_weights=False, path=path, adapter_dtype=torch.float32)
    x = torch.randn(10, 32).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    params = _params64(layer)
    dense_reference(layer, x.double(), params).sum().backward()
    for key, p in layer.peft_parameters().items():
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, params[key].grad) < BF16_TOL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("conv", [False, True])
def test_saves_only_x_weight_and_parameters(path, conv):
    """No ΔW, no W + ΔW, no x·Dᵀ, no cast copy: the saved tensors are x itself, the base weight, the factors."""
    torch.manual_seed(0)
    base = (nn.Conv2d(16, 12, 3, padding=1) if conv else nn.Linear(48, 40)).bfloat16().requires_grad_(False)
    layer = LohaLayer(base, 3, 3.0, init_weights=False, path=path, rank_dropout=0.3).train()
    x = torch.randn((2, 16, 6, 6) if conv else (4, 9, 48)).bfloat16().requires_grad_()
    packed = []
    with saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        layer(x)
    allowed = {x.data_ptr(), base.weight.data_ptr(), *(p.data_ptr() for p in layer.parameters())}
    assert {t.data_ptr() for t in packed} <= allowed
    assert x.data_ptr() in {t.data_ptr() for t in packed}
    # and the structured path never forms a tensor as large as the weight (r² = 9 < d_out; x, y are smaller)
    if path == "structured":
        with MaxAllocation() as mode:
            layer(x).float().sum().backward()
        assert mode.largest < base.weight.numel()


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[7], CASES[8]],
                         ids=["linear", "conv", "tucker", "conv1d-tucker", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(case, dtype):
    _, make, shape, r, eff = case
    layer = _layer(make, r, eff, "auto", dtype=dtype)
    check_merge_round_trip(layer, torch.randn(shape).to(dtype))


def test_default_init_is_identity_and_dropout_off_in_eval():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LohaLayer(base, 4, 8.0, rank_dropout=0.5, module_dropout=0.5).eval()
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.hada_w2_b) == 0
    with torch.no_grad():
        layer.hada_w2_b.normal_()
    a, b = layer(x), layer(x)  # eval: deterministic, no dropout
    assert torch.equal(a, b) and not torch.allclose(a, base(x))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("eff", [False, True])
def test_training_dropout_matches_peft(path, eff):
    """rank_dropout / module_dropout in training: the same draws as PEFT (seeded), hence the same outputs."""
    peft = pytest.importorskip("peft")
    kw = dict(r=3, alpha=5, target_modules=["fc", "conv"], rank_dropout=0.4, module_dropout=0.3,
              use_effective_conv2d=eff, init_weights=False)
    check_training_dropout_matches_peft(peft.LoHaConfig(**kw), LohaConfig(path=path, **kw), fc=(12, 10),
                                        conv=(4, 6))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_model_saves_what_lora_saves(method):
    """A whole tiny Llama step: LoHa/LoKr save exactly as many activation bytes as LoRA (x once per shared input)."""
    pytest.importorskip("transformers")
    from slimtune.memory.accounting import SavedTensorMeter
    from tests.toy_models import tiny_llama

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    saved = {}
    for name, config in [("lora", slimtune.LoraConfig(r=4, target_modules=targets)),
                         (method, (LohaConfig if method == "loha" else slimtune.LokrConfig)(
                             r=4, target_modules=targets, init_weights=False))]:
        model = slimtune.adapt(tiny_llama().train(), config)
        for path in (["structured", "folded"] if name == method else ["-"]):
            for _, adapter in slimtune.adapter_modules(model):
                adapter.path = path
            meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()])
            with meter.record():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            saved[name, path] = meter.bytes
    assert saved[method, "structured"] == saved[method, "folded"] == saved["lora", "-"]


def test_path_chooser():
    # Llama-3.2-3B projections, 2048 tokens, r=32, bf16: with the fused fold kernels (GPU) every projection folds
    # (one dense pass each way against rank-r² products and 4x the launches); with PyTorch's ops the wide ones
    # stay structured
    shapes = [(3072, 3072), (3072, 8192), (8192, 3072)]
    assert all(choose_path(loha_costs(2048, *shape, 32, 2, True, fused_fold=True)) == "folded" for shape in shapes)
    assert all(choose_path(loha_costs(2048, *shape, 32, 2, True)) == "structured" for shape in shapes)
    # r² far above a small layer's width: fold
    assert choose_path(loha_costs(4096, 64, 64, 32, 2, True)) == "folded"
    # small rank on a wide layer: structured
    assert choose_path(loha_costs(4096, 1024, 1024, 4, 4, True)) == "structured"
    assert choose_path(loha_costs(2048, 8192, 8192, 2, 2, True, fused_fold=True)) == "structured"
    layer = LohaLayer(nn.Linear(8, 8), 16, 16.0)  # r² = 256 >> 8
    layer(torch.randn(64, 8))
    assert layer.last_path == "folded"
    layer.path = "structured"
    layer(torch.randn(64, 8))
    assert layer.last_path == "structured"


def test_bad_values_and_targets():
    with pytest.raises(slimtune.ConfigError, match="rank_dropout"):
        LohaConfig(target_modules=["0"], rank_dropout=1.0)
    with pytest.raises(slimtune.ConfigError, match="path"):
        LohaConfig(target_modules=["0"], path="dense")
    with pytest.raises(slimtune.TargetError, match="padding_mode"):
        slimtune.adapt(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")),
                       LohaConfig(target_modules=["0"]))
    with pytest.raises(slimtune.TargetError, match="Embedding"):
        slimtune.adapt(nn.Sequential(nn.Embedding(4, 4)), LohaConfig(target_modules=["0"]))


# -- 4-bit bases: the weight through a handle, dequantised right before each use (tests/methods/fakes.py) -----
@pytest.mark.parametrize("path", PATHS)
def test_quantized_base_matches_dense(path, fake_quant):
    dense, quant = quantized_pair(LohaLayer, dict(r=3, alpha=4.0, init_weights=False))
    assert {k: p.shape for k, p in quant.peft_parameters().items()} == {
        k: p.shape for k, p in dense.peft_parameters().items()}
    assert quant.hada_w1_a.dtype == torch.float64  # the handle's dtype, not the packed uint8
    check_quantized_matches_dense(dense, quant, path)


def test_merge_on_quantized_base_refuses(fake_quant):
    _, quant = quantized_pair(LohaLayer, dict(r=2, alpha=2.0, init_weights=False))
    with pytest.raises(slimtune.SlimtuneError, match="dequantize"):
        quant.merge()
    assert not quant.merged
