"""LoKr: PEFT's factorisation and parameter layout, both paths vs the dense float64 reference, low precision,
saved tensors (no [d_out, d_in] tensor on the structured path), merge, the chooser, 4-bit bases."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import slimtune
from slimtune.core.costs import choose_path
from slimtune.methods.lokr import LokrConfig, LokrLayer, factorization, lokr_delta_weight, lokr_factors
from slimtune.methods.lokr.math import lokr_costs
from tests.helpers import BF16_TOL, FP32_TOL, check_merge_round_trip, rel_err
from tests.methods.fakes import (CountOps, MaxAllocation, check_quantized_matches_dense,
                                 check_training_dropout_matches_peft, quantized_pair)

PATHS = ["structured", "folded"]
# (name, base layer factory, input shape, LokrLayer kwargs)
CASES = [
    ("linear-auto", lambda: nn.Linear(12, 20), (3, 5, 12), dict(r=2)),
    ("linear-odd", lambda: nn.Linear(15, 21, bias=False), (7, 15), dict(r=1)),
    ("linear-prime", lambda: nn.Linear(7, 13), (4, 7), dict(r=3)),
    ("linear-factor4", lambda: nn.Linear(24, 40), (6, 24), dict(r=2, decompose_factor=4)),
    ("linear-decompose-both", lambda: nn.Linear(64, 48), (5, 64), dict(r=2, decompose_both=True)),
    ("linear-full-w2", lambda: nn.Linear(16, 16), (5, 16), dict(r=8)),
    ("conv2d-k3-s2", lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), (2, 16, 9, 9), dict(r=2)),
    ("conv2d-k3-full", lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7), dict(r=4)),
    ("conv2d-k1", lambda: nn.Conv2d(16, 32, 1), (2, 16, 5, 4), dict(r=2, use_effective_conv2d=True)),
    ("conv2d-tucker", lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), (2, 16, 9, 9),
     dict(r=2, use_effective_conv2d=True, decompose_both=True)),
    ("conv1d-lowrank", lambda: nn.Conv1d(16, 32, 3, padding=1), (2, 16, 11), dict(r=2)),
    ("conv1d-tucker", lambda: nn.Conv1d(16, 32, 5, stride=2), (2, 16, 13), dict(r=2, use_effective_conv2d=True)),
    ("conv1d-full-w2", lambda: nn.Conv1d(4, 8, 3, padding=1), (2, 4, 9), dict(r=4)),  # PEFT's w2 ⊗ w1 layout
    ("conv2d-groups2", lambda: nn.Conv2d(8, 12, 3, groups=2), (2, 8, 6, 6), dict(r=2)),
]


def _params64(layer: LokrLayer) -> dict[str, torch.Tensor]:
    return {k: p.detach().double().clone().requires_grad_() for k, p in layer.peft_parameters().items()}


def dense_reference(layer: LokrLayer, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    base = layer.base_layer
    w1, w2 = lokr_factors(tuple(params), tuple(params.values()), torch.float64)
    w = base.weight.double() + lokr_delta_weight(w1, w2, layer.scaling, base.weight.shape)
    b = base.bias.double() if base.bias is not None else None
    if isinstance(base, nn.Linear):
        return F.linear(x, w, b)
    conv = F.conv2d if w.dim() == 4 else F.conv1d
    return conv(x, w, b, base.stride, base.padding, base.dilation, base.groups)


def _layer(make, kw, path, dtype=torch.float64, seed=0) -> LokrLayer:
    torch.manual_seed(seed)
    kw = dict(kw)
    r = kw.pop("r")
    return LokrLayer(make().to(dtype), r, alpha=1.5 * r, init_weights=False, path=path, **kw)


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 200):
        for factor in (-1, 0, -2, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    assert factorization(3072) == (48, 64) and factorization(8192) == (64, 128) and factorization(8, 4) == (4, 2)


@pytest.mark.parametrize("name,make,shape,kw", CASES, ids=[c[0] for c in CASES])
def test_parameter_names_and_shapes_match_peft(name, make, shape, kw):
    peft = pytest.importorskip("peft")
    kw = dict(kw)
    r = kw.pop("r")
    ours = LokrLayer(make(), r, alpha=r, **kw)
    theirs = peft.get_peft_model(nn.Sequential(make()), peft.LoKrConfig(r=r, target_modules=["0"], **kw))
    layer = theirs.base_model.model[0]
    want = {key: tuple(getattr(layer, key)["default"].shape) for key in layer.adapter_layer_names
            if "default" in getattr(layer, key)}
    assert {k: tuple(p.shape) for k, p in ours.peft_parameters().items()} == want


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,make,shape,kw", CASES, ids=[c[0] for c in CASES])
def test_matches_dense_reference_float64(name, make, shape, kw, path):
    layer = _layer(make, kw, path)
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


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("case", [CASES[4], CASES[6], CASES[9]], ids=["linear", "conv", "tucker"])
def test_low_precision_against_float64(case, dtype, tol, path, device):
    """The reference is float64 at the low-precision layer's own values (its parameters and base, x and dy as
    rounded): what is measured is the computation's rounding. (Against the unrounded float64 values, the Tucker
    case's small factor gradients reach 1.1e-2 in bf16 over random draws, from rounding the inputs alone.)"""
    _, make, shape, kw = case
    layer = _layer(make, kw, path).to(device, dtype)
    ref_layer = copy.deepcopy(layer).to("cpu", torch.float64)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    xl = x.to(device, copy=True).requires_grad_()
    y = layer(xl)
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    y.backward(dy.to(device))
    params, x64 = _params64(ref_layer), x.double().requires_grad_()
    ref = dense_reference(ref_layer, x64, params)
    ref.backward(dy.double())
    assert y.dtype == dtype and rel_err(y, ref) < tol
    assert rel_err(xl.grad, x64.grad) < tol
    for key, p in layer.peft_parameters().items():
        assert p.grad.dtype == dtype and rel_err(p.grad, params[key].grad) < tol, key


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kw", [{}, {"decompose_both": True}], ids=["full-w1", "low-rank-w1"])
def test_fp32_master_weights_with_bf16_activations(path, kw):
    torch.manual_seed(0)
    base = nn.Linear(96, 64).bfloat16().requires_grad_(False)
    layer = LokrLayer(base, 2, 2.0, init_weights=False, path=path, adapter_dtype=torch.float32, **kw)
    x = torch.randn(10, 96).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, dtype=torch.float64)  # not a sum: its all-ones gradient cancels badly in bf16
    y.backward(dy.bfloat16())
    params = _params64(layer)
    dense_reference(layer, x.double(), params).backward(dy)
    for key, p in layer.peft_parameters().items():
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, params[key].grad) < BF16_TOL, key


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("conv", [False, True])
def test_saves_only_x_weight_and_parameters(path, conv):
    torch.manual_seed(0)
    base = (nn.Conv2d(16, 32, 3, padding=1) if conv else nn.Linear(96, 64)).bfloat16().requires_grad_(False)
    layer = LokrLayer(base, 2, 2.0, init_weights=False, path=path, rank_dropout=0.3, decompose_both=True).train()
    x = torch.randn((2, 16, 5, 5) if conv else (4, 9, 96)).bfloat16().requires_grad_()
    packed = []
    with saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        layer(x)
    allowed = {x.data_ptr(), base.weight.data_ptr(), *(p.data_ptr() for p in layer.parameters())}
    assert {t.data_ptr() for t in packed} <= allowed and x.data_ptr() in {t.data_ptr() for t in packed}
    if path == "structured":  # never a tensor as large as the weight (x and y are smaller here)
        with MaxAllocation() as mode:
            layer(x).float().sum().backward()
        assert mode.largest < base.weight.numel()


@pytest.mark.parametrize("frozen", [None, "lokr_w2_a", "lokr_w1"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_structured_conv_backward_calls_one_delta_convolution(frozen, x_grad):
    """The structured convolution's backward: one convolution backward call for the base (x's gradient), one for w2's
    convolution (its input and weight gradients together, at input w1 X) — as many as PEFT's dense delta
    convolution — and the float64 reference's gradients, also with x or a factor frozen."""
    _, make, shape, kw = CASES[6]
    layer = _layer(make, kw, "structured")
    layer.base_layer.requires_grad_(False)
    if frozen:
        getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=x_grad)
    y = layer(x)
    dy = torch.randn_like(y)
    with CountOps() as ops:
        y.backward(dy)
    assert ops.calls["convolution_backward"] == 1 + x_grad  # the base's only for x's gradient (W is frozen)
    params, x64 = _params64(layer), x.detach().clone().requires_grad_(x_grad)
    dense_reference(layer, x64, params).backward(dy)
    if x_grad:
        assert rel_err(x.grad, x64.grad) < 1e-10
    for key, p in layer.peft_parameters().items():
        assert (p.grad is None) == (key == frozen), key
        if p.grad is not None:
            assert rel_err(p.grad, params[key].grad) < 1e-10, key


@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[9], CASES[12], CASES[13]],
                         ids=["linear", "conv", "tucker", "conv1d-full", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(case, dtype):
    _, make, shape, kw = case
    layer = _layer(make, kw, "auto", dtype=dtype)
    check_merge_round_trip(layer, torch.randn(shape).to(dtype))


@pytest.mark.parametrize("init,zero", [(True, "lokr_w1"), ("lycoris", "lokr_w2")])
def test_init_gives_zero_update(init, zero):
    base = nn.Linear(16, 16)
    layer = LokrLayer(base, 8, 8.0, init_weights=init)
    x = torch.randn(3, 16)
    assert torch.count_nonzero(getattr(layer, zero)) == 0 and torch.equal(layer(x), base(x))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [False, True])
def test_training_dropout_matches_peft(path, scale):
    peft = pytest.importorskip("peft")
    kw = dict(r=2, alpha=3, target_modules=["fc", "conv"], rank_dropout=0.4, module_dropout=0.3,
              rank_dropout_scale=scale, use_effective_conv2d=True, init_weights=False)
    check_training_dropout_matches_peft(peft.LoKrConfig(**kw), LokrConfig(path=path, **kw), fc=(24, 40),
                                        conv=(16, 32))


def test_path_chooser():
    # Llama-3.2-3B projections at r=32: the structured Kronecker path, by a wide margin
    for d_in, d_out in [(3072, 3072), (3072, 8192), (8192, 3072), (3072, 1024)]:
        (a_out, b_out), (a_in, b_in) = factorization(d_out), factorization(d_in)
        costs = lokr_costs(2048, a_out, a_in, b_out, b_in, 2, True)
        assert costs["structured"].score() < 0.7 * costs["folded"].score()
    # a tiny layer fed very many tokens: forming the 16x16 weight once is cheaper
    assert choose_path(lokr_costs(10**6, 4, 4, 4, 4, 4, True)) == "folded"
    layer = LokrLayer(nn.Conv1d(4, 8, 3), 4, 4.0)  # PEFT's Conv1d full-w2 layout: folded only
    layer.path = "structured"
    layer(torch.randn(1, 4, 5))
    assert layer.last_path == "folded"


def test_bad_values():
    with pytest.raises(slimtune.ConfigError, match="init_weights"):
        LokrConfig(target_modules=["0"], init_weights="gaussian")
    with pytest.raises(slimtune.ConfigError, match="decompose_factor"):
        LokrConfig(target_modules=["0"], decompose_factor=2.5)
    with pytest.raises(slimtune.ConfigError, match="module_dropout"):
        LokrConfig(target_modules=["0"], module_dropout=-0.1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kw", [dict(r=2), dict(r=2, decompose_both=True, decompose_factor=4), dict(r=8)],
                         ids=["lowrank-w2", "decompose-both", "full-w2"])
def test_quantized_base_matches_dense(path, kw, fake_quant):
    dense, quant = quantized_pair(LokrLayer, dict(alpha=3.0, init_weights=False, **kw))
    assert quant.w1_shape == dense.w1_shape and quant.w2_shape == dense.w2_shape
    assert {k: p.shape for k, p in quant.peft_parameters().items()} == {
        k: p.shape for k, p in dense.peft_parameters().items()}
    check_quantized_matches_dense(dense, quant, path)


def test_merge_on_quantized_base_refuses(fake_quant):
    _, quant = quantized_pair(LokrLayer, dict(r=2, alpha=2.0, init_weights=False))
    with pytest.raises(slimtune.SlimtuneError, match="dequantize"):
        quant.merge()


@pytest.mark.parametrize("make,bad", [(lambda: nn.Linear(96, 64), (3, 95)), (lambda: nn.Linear(96, 64), ()),
                                      (lambda: nn.Conv2d(8, 16, 3, groups=2), (2, 7, 9, 9)),
                                      (lambda: nn.Conv2d(8, 16, 3), (2, 8, 9)),
                                      (lambda: nn.Conv1d(4, 8, 3), (2, 4, 9, 9))],
                         ids=["linear-width", "scalar", "conv-channels", "conv-unbatched-channels", "conv-rank"])
@pytest.mark.parametrize("cls", ["loha", "lokr"])
def test_wrong_input_shapes_name_the_layer(make, bad, cls):
    from slimtune.methods.loha import LohaLayer

    layer = (LohaLayer if cls == "loha" else LokrLayer)(make().requires_grad_(False), 2, 2.0)
    with pytest.raises(ValueError, match=rf"{type(layer).__name__} .*expects inputs .*got {re.escape(str(bad))}"):
        layer(torch.randn(bad))
