"""DoRA layers (Linear, transformers Conv1D, Conv1d, Conv2d) against DoRA's dense definition in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune
import slimtune.adapters.dora as D
from slimtune.adapters.dora import DoraConv, DoraLinear
from tests.helpers import BF16_TOL, FP32_TOL, check_merge_round_trip, rel_err


def _conv1d_hf(d_in, d_out):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(d_out, d_in)  # weight [d_in, d_out]


BASES = {
    "linear": (lambda: nn.Linear(24, 20), (3, 5, 24)),
    "linear_nobias": (lambda: nn.Linear(24, 20, bias=False), (7, 24)),
    "hf_conv1d": (lambda: _conv1d_hf(24, 20), (2, 5, 24)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 9)),
    "conv2d_strided_dilated": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), (2, 6, 9, 11)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 8, 1, bias=False), (2, 6, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, padding=2, stride=2), (2, 6, 17)),
}


def dora_reference(base: nn.Module, x, a, b, m, s):
    """``base`` with weight ``g·(W + s·B A)``, g = m / ‖W + s·B A‖_row (norm detached), in x's dtype."""
    w = base.weight.to(x.dtype)
    fan_in_fan_out = not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d))
    w2 = w.t() if fan_in_fan_out else w.reshape(w.shape[0], -1)
    v = w2 + s * b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    wp = (m.reshape(-1) / v.norm(dim=1).detach())[:, None] * v
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, wp.reshape(w.shape), bias, base.stride, base.padding, base.dilation)
    if isinstance(base, nn.Conv1d):
        return F.conv1d(x, wp.reshape(w.shape), bias, base.stride, base.padding, base.dilation)
    return F.linear(x, wp, bias)


def make(kind: str, dtype=torch.float32, adapter_dtype=None, r=4, seed=0, perturb=True):
    torch.manual_seed(seed)
    make_base, shape = BASES[kind]
    model = nn.Sequential(make_base()).to(dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=r, alpha=6, target_modules=["0"], use_dora=True,
                                              adapter_dtype=adapter_dtype))
    layer = model[0]
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen).to(layer.magnitude.dtype))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    return layer, x


def check_against_reference(layer, x, tol):
    x = x.clone().requires_grad_()
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    y.backward(dy)
    params = (layer.lora_A, layer.lora_B, layer.magnitude)
    leaves = [p.detach().double().requires_grad_() for p in params]
    x64 = x.detach().double().requires_grad_()
    ref = dora_reference(layer.base_layer, x64, *leaves, layer.scaling)
    ref.backward(dy.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    errors = {"y": rel_err(y, ref), "x": rel_err(x.grad, x64.grad)}
    errors.update({name: rel_err(p.grad, leaf.grad) for name, p, leaf in zip("ABm", params, leaves)})
    assert all(e < tol for e in errors.values()), errors
    for p in params:
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_matches_dense_definition(kind, dtype, tol):
    layer, x = make(kind, dtype)
    assert isinstance(layer, DoraConv if "conv" in kind and "hf" not in kind else DoraLinear)
    check_against_reference(layer, x, tol)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fp32_master_weights_with_bf16_base(kind):
    layer, x = make(kind, torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.magnitude.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    check_against_reference(layer, x, BF16_TOL)


def test_autocast_bf16_over_fp32_base():
    layer, x = make("linear")
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ref = dora_reference(layer.base_layer, x.detach().double(), layer.lora_A.double(), layer.lora_B.double(),
                         layer.magnitude.double(), layer.scaling)
    assert rel_err(y, ref) < BF16_TOL
    assert layer.magnitude.grad.dtype == torch.float32


def test_near_unity_magnitudes_keep_fp32_accuracy():
    """g − 1 ~ 1e-6: the rescaling must still show, at fp32 accuracy (no cancellation)."""
    layer, x = make("linear", perturb=False)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1e-4)
        norm = layer.weight_norm(layer.base_layer.weight)
        layer.magnitude.copy_(norm * (1 + 1e-6 * torch.randn(norm.shape)))
    check_against_reference(layer, x, 1e-6)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_fresh_layer_computes_its_base(kind):
    layer, x = make(kind, perturb=False)
    w2 = layer.weight2d(layer.base_layer.weight)
    assert w2.shape[0] == layer.magnitude.numel()
    assert torch.allclose(layer.magnitude.reshape(-1), w2.norm(dim=1), rtol=1e-6)
    with torch.no_grad():
        assert rel_err(layer(x), layer.base_layer(x)) < 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_no_grad_forward_equals_training_forward(kind):
    layer, x = make(kind)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y.detach())
    with slimtune.disable_adapters(nn.Sequential(layer)):
        assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dropout_is_pefts_formula(kind):
    """Training with dropout: ``base(x) + (g−1)·base_nobias(drop(x)) + g·s·lora(drop(x))``, as PEFT."""
    layer, x = make(kind)
    layer.dropout_p = 0.3
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.3, training=True)
    base = layer.base_layer
    with torch.no_grad():
        w2 = layer.weight2d(base.weight)
        a, b = layer.factors2d()
        norm = (w2 + layer.scaling * b @ a).norm(dim=1)
        g = layer.magnitude.reshape(-1) / norm
        view = (1, -1) + (1,) * (x.dim() - 2)
        if kind == "linear":
            base_d = F.linear(xd, base.weight)
            lora_d = F.linear(F.linear(xd, layer.lora_A), layer.lora_B)
            g = g.view(-1)
        else:
            base_d = F.conv2d(xd, base.weight, None, base.stride, base.padding, base.dilation)
            h = F.conv2d(xd, layer.lora_A, None, base.stride, base.padding, base.dilation)
            lora_d = F.conv2d(h, layer.lora_B)
            g = g.view(view)
        ref = base(x) + (g - 1) * base_d + g * layer.scaling * lora_d
    assert rel_err(y, ref) < FP32_TOL
    y.sum().backward()
    assert layer.magnitude.grad is not None


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "conv2d", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(kind, dtype):
    layer, x = make(kind, dtype)
    y = check_merge_round_trip(layer, x)
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_norm_is_computed_once_per_forward_and_weight_norms_are_cached(monkeypatch):
    calls = {"norm": 0, "weight": 0}
    real_norm, real_weight = D.factored_row_norm_sq, D.weight_row_norm_sq

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(D, "factored_row_norm_sq", count("norm", real_norm))
    monkeypatch.setattr(D, "weight_row_norm_sq", count("weight", real_weight))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    assert calls == {"norm": 2, "weight": 2}  # the magnitude's init
    x = torch.randn(4, 12)
    for _ in range(3):
        model(x).sum().backward()
    assert calls == {"norm": 2 + 6, "weight": 2}, "one norm per layer per forward, ‖W‖² from the cache"
    with torch.no_grad():
        model[0].base_layer.weight.mul_(2)  # an in-place change of W is seen
    model(x)
    assert calls == {"norm": 10, "weight": 3}
    slimtune.merge(model)
    slimtune.unmerge(model)
    model(x)
    assert calls["weight"] == 5


def test_grouped_conv_and_bad_flag_are_refused():
    with pytest.raises(slimtune.ConfigError, match="grouped"):
        slimtune.adapt(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)),
                       slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(slimtune.ConfigError, match="use_dora"):
        slimtune.LoraConfig(r=2, target_modules=["0"], use_dora="yes")


def test_peft_parameters_and_shapes():
    lin, _ = make("linear")
    conv, _ = make("conv2d")
    assert set(lin.peft_parameters()) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert lin.magnitude.shape == (20,) and conv.magnitude.shape == (1, 8, 1, 1)
    assert "magnitude" in dict(lin.named_parameters())


def test_dora_recompute_gives_the_same_gradients_and_saves_no_product():
    from torch.autograd.graph import saved_tensors_hooks

    import slimtune

    def build(recompute):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 48))
        slimtune.adapt(net, slimtune.LoraConfig(r=4, target_modules=["0"], use_dora=True, dora_recompute=recompute))
        with torch.no_grad():
            net[0].lora_B.normal_()
        return net

    x = torch.randn(6, 32, requires_grad=True)
    grads = []
    for recompute in (False, True):
        net = build(recompute)
        packed = []
        with saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            y = net(x)
        big = [t for t in packed if t.shape == (6, 48)]
        assert bool(big) != recompute  # the [N, d_out] product is kept only without recompute
        y.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad] + [x.grad.clone()])
        x.grad = None
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
