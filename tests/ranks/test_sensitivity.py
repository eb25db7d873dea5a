"""Sensitivity estimators: each against a float64 reference computed another way, and known answers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune
from slimtune.ranks.hessian import probe_seed, rademacher
from slimtune.ranks.layers import find_layers
from slimtune.ranks.sensitivity import estimate_sensitivity

from ..helpers import rel_err
from ..toy_models import conv1d_net, conv2d_net
from .problems import regression_problem

CFG_AB = slimtune.LoraConfig(r=8, target_modules=["a", "b"])


def _autograd_weight_grads(model, batch, loss_fn):
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    loss_fn(model, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return grads


def test_gradient_spectrum_is_that_of_the_weight_gradient():
    model, data, loss_fn = regression_problem(d=32, batches=1)
    model.double()
    data = [x.double() for x in data]
    ref = _autograd_weight_grads(model, data[0], loss_fn)
    got = {s.name: s for s in estimate_sensitivity(model, data, CFG_AB, "gradient", loss_fn=loss_fn)}
    for name in ("a", "b"):
        expected = torch.linalg.svdvals(ref[f"{name}.weight"]).square()
        assert rel_err(got[name].spectrum, expected) < 1e-10
        assert got[name].score == pytest.approx(float(ref[f"{name}.weight"].square().sum()), rel=1e-10)


@pytest.mark.parametrize("tokens", [24, 96])  # fewer tokens than inputs (the X Xᵀ branch) and more (Xᵀ X)
def test_data_spectrum_is_the_whitened_gradient_spectrum(tokens):
    model, data, loss_fn = regression_problem(d=32, batches=1, tokens=tokens)
    model.double()
    x = data[0].double()
    damping = 0.05
    ref = _autograd_weight_grads(model, x, loss_fn)
    got = {s.name: s for s in estimate_sensitivity(model, [x], CFG_AB, "data", loss_fn=loss_fn, damping=damping)}
    cov = x.T @ x / tokens
    cov = cov + damping * cov.trace() / 32 * torch.eye(32, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    for name in ("a", "b"):
        expected = torch.linalg.svdvals(ref[f"{name}.weight"] @ inv_sqrt).square()
        assert rel_err(got[name].spectrum[: expected.numel()], expected) < 1e-8


def test_hessian_trace_of_a_least_squares_layer():
    """For ½·mean‖W x − t‖², the Hessian in W is I ⊗ C: its trace is d_out · tr(C)."""
    model, data, loss_fn = regression_problem(d=16, batches=2, tokens=128)
    got = {s.name: s.score for s in estimate_sensitivity(model, data, CFG_AB, "hessian", loss_fn=loss_fn,
                                                          probes=6)}
    exact = sum(16 * float((x.T @ x / x.shape[0]).trace()) for x in data) / len(data)
    for name in ("a", "b"):
        assert got[name] == pytest.approx(exact, rel=0.05)


def test_hessian_differences_match_exact_hessian_vector_products():
    """The central difference against double backward (float64), on the same Rademacher probes: the perturbation
    is ``ε_i v_i`` in layer i (``ε_i = eps · ‖W_i‖ / √numel``), layer i's estimate ``v_i · (H ε v)_i / ε_i``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    x, target = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)

    def loss_fn(m, batch):
        return ((m(batch) - target) ** 2).mean()

    cfg = slimtune.LoraConfig(r=2, target_modules=["0", "2"])
    got = {s.name: s.score for s in estimate_sensitivity(model, [x], cfg, "hessian", loss_fn=loss_fn, probes=3,
                                                          eps=1e-5, seed=7)}
    layers = find_layers(model, cfg)
    weights = [model[0].weight, model[2].weight]
    scales = [1e-5 * float(w.detach().norm()) / w.numel() ** 0.5 for w in weights]
    exact = [0.0, 0.0]
    for draw in range(3):
        probes = [rademacher(v.weight_shape, probe_seed(7, draw, i, 2), x.device, torch.float64)
                  for i, v in enumerate(layers)]
        for w in weights:
            w.requires_grad_(True)
        grads = torch.autograd.grad(loss_fn(model, x), weights, create_graph=True)
        hv = torch.autograd.grad(sum((g * v).sum() * e for g, v, e in zip(grads, probes, scales)), weights)
        for i in range(2):
            exact[i] += float((probes[i] * hv[i]).sum()) / scales[i] / 3
        for w in weights:
            w.requires_grad_(False)
    assert min(exact) > 0
    assert got["0"] == pytest.approx(exact[0], rel=1e-6)
    assert got["2"] == pytest.approx(exact[1], rel=1e-6)


@pytest.mark.parametrize("net", [conv2d_net, conv1d_net])
def test_convolution_weight_gradients(net):
    model = net().double()
    shape = (2, model[0].in_channels, 9, 9) if isinstance(model[0], nn.Conv2d) else (2, model[0].in_channels, 9)
    x = torch.randn(*shape, dtype=torch.float64)

    def loss_fn(m, batch):
        return m(batch).square().mean()

    ref = _autograd_weight_grads(model, x, loss_fn)
    cfg = slimtune.LoraConfig(r=2, target_modules=["0", "2"])
    got = {s.name: s.score for s in estimate_sensitivity(model, [x], cfg, "gradient", loss_fn=loss_fn)}
    for name in ("0", "2"):
        assert got[name] == pytest.approx(float(ref[f"{name}.weight"].square().sum()), rel=1e-9)
    grouped = model[2].groups != 1
    if grouped:
        with pytest.raises(slimtune.ConfigError, match="grouped convolution"):
            estimate_sensitivity(model, [x], cfg, "data", loss_fn=loss_fn)
    else:
        assert all(s.score > 0 for s in estimate_sensitivity(model, [x], cfg, "data", loss_fn=loss_fn))


def test_estimation_leaves_the_model_as_it_was():
    model, data, loss_fn = regression_problem(d=16, batches=1)
    model.train()
    model.b.weight.requires_grad_(False)
    for method in ("gradient", "data", "hessian"):
        estimate_sensitivity(model, data, CFG_AB, method, loss_fn=loss_fn, probes=1)
        assert model.training and model.a.training
        assert model.a.weight.requires_grad and not model.b.weight.requires_grad
        assert all(p.grad is None for p in model.parameters())


def test_clear_errors():
    model, data, loss_fn = regression_problem(d=16, batches=1)
    with pytest.raises(slimtune.ConfigError, match="unknown sensitivity method"):
        estimate_sensitivity(model, data, CFG_AB, "fisher", loss_fn=loss_fn)
    with pytest.raises(slimtune.ConfigError, match="no calibration batches"):
        estimate_sensitivity(model, [], CFG_AB, "gradient", loss_fn=loss_fn)
    with pytest.raises(slimtune.ConfigError, match="no scalar loss"):
        estimate_sensitivity(model, data, CFG_AB, "gradient")  # the model returns a tuple, no loss
    with pytest.raises(slimtune.ConfigError, match="float32 or float64"):
        estimate_sensitivity(model.bfloat16(), [data[0].bfloat16()], CFG_AB, "hessian",
                             loss_fn=lambda m, x: m(x)[0].float().square().mean())
