"""Online re-allocation keeps the function: exactly where a layer grows, within the truncation bound where it
shrinks."""
from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.ranks.online import reallocate, transfer_ranks, truncation_bounds
from slimtune.ranks.plan import allocated_config

from ..helpers import perturb_adapters, rel_err
from .problems import regression_problem


def _adapted(use_dora: bool = False, perturb: bool = True):
    model, data, loss_fn = regression_problem(d=32, batches=2, tokens=64)
    model.double()
    data = [x.double() for x in data]
    cfg = slimtune.LoraConfig(r=8, alpha=16, target_modules=["a", "b"], use_dora=use_dora)
    slimtune.adapt(model, cfg)
    if perturb:
        perturb_adapters(model, std=0.3)
    return model, data, loss_fn, cfg


@pytest.mark.parametrize("use_dora", [False, True])
def test_growing_keeps_the_function_and_shrinking_stays_within_the_bound(use_dora):
    model, data, _, cfg = _adapted(use_dora)
    x = data[0]
    with torch.no_grad():
        before = model(x)
    new = allocated_config(cfg, {"a": 3, "b": 16}, [n for n, _ in model.named_modules()])
    bounds = truncation_bounds(model, new)
    assert bounds["b"] == 0 and bounds["a"] > 0
    magnitude = model.a.magnitude.detach().clone() if use_dora else None
    assert transfer_ranks(model, new) == ["a", "b"]
    with torch.no_grad():
        after = model(x)
    assert model.a.r == 3 and model.b.r == 16
    assert model.a.scaling == model.b.scaling == pytest.approx(2.0)
    assert rel_err(after[1], before[1]) < 1e-12  # b grew: ΔW kept exactly
    if use_dora:
        assert torch.equal(model.a.magnitude, magnitude)
    else:  # ‖Δy_t‖ ≤ σ_4(ΔW) ‖x_t‖ for every token
        change = (after[0] - before[0]).norm(dim=-1)
        assert bool((change <= bounds["a"] * x.norm(dim=-1) * (1 + 1e-9)).all())
        assert change.max() > 0
    assert (model.b.lora_A[8:].abs().sum(dim=1) > 0).all()  # the new ranks can learn ...
    assert not model.b.lora_B[:, 8:].any()  # ... and start with no effect
    assert all(p.requires_grad for p in slimtune.trainable_parameters(model))
    assert sum(p.numel() for p in slimtune.trainable_parameters(model)) == 3 * 64 + 16 * 64 + (64 if use_dora else 0)


def test_reallocate_after_warmup():
    model, data, loss_fn, cfg = _adapted(perturb=False)
    opt = torch.optim.SGD(slimtune.trainable_parameters(model), lr=1e-2)
    for x in data:  # a few warm-up steps
        loss_fn(model, x).backward()
        opt.step()
        opt.zero_grad()
    budget = sum(p.numel() for p in slimtune.trainable_parameters(model))
    plan = reallocate(model, data, method="data", loss_fn=loss_fn, granule=2, min_rank=2)
    assert plan.budget.amount == budget and plan.used <= budget
    assert {n: a.r for n, a in slimtune.adapter_modules(model)} == plan.ranks()
    assert plan.ranks()["b"] > plan.ranks()["a"]  # b's target has rank 30, a's rank 2
    assert slimtune.core.inject.CONFIG_ATTR and getattr(model, "slimtune_config") is plan.config
    loss_fn(model, data[0]).backward()  # trains on
    assert all(p.grad is not None for p in slimtune.trainable_parameters(model))


def test_refuses_what_it_cannot_keep():
    model, data, loss_fn = regression_problem(d=16, batches=1)
    with pytest.raises(slimtune.ConfigError, match="no slimtune adapters"):
        reallocate(model, data, loss_fn=loss_fn)
    slimtune.adapt(model, slimtune.LohaConfig(r=2, target_modules=["a", "b"]))
    with pytest.raises(slimtune.ConfigError, match="no such factors"):
        reallocate(model, data, loss_fn=loss_fn)
