"""slimtune.capture_step: what a CUDA graph cannot hold is refused with a message that names the fix (CPU); on a
GPU, replays give the eager steps' losses and parameters, and capturing leaves model and optimizer as they were."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import slimtune
from slimtune.errors import ConfigError

from ..helpers import perturb_adapters

CUDA = torch.cuda.is_available()


def _model(dropout: float = 0.0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4)).to(device)
    slimtune.adapt(model, slimtune.LoraConfig(r=4, target_modules=["0", "3"], lora_dropout=dropout))
    perturb_adapters(model)
    return model.train()


def _adamw(model: nn.Module, lr=None, **kwargs) -> torch.optim.Optimizer:
    return torch.optim.AdamW(slimtune.trainable_parameters(model), lr=1e-2 if lr is None else lr, **kwargs)


def _loss_fn(model: nn.Module):
    return lambda batch: nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def _batch(device: str = "cpu", seed: int = 0, rows: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(rows, 16, generator=gen).to(device),
            "y": torch.randint(0, 4, (rows,), generator=gen).to(device)}


@pytest.mark.parametrize("make_optimizer, kwargs, message", [
    (lambda m: torch.optim.SGD(slimtune.trainable_parameters(m), lr=0.1), {}, "not SGD"),
    (lambda m: _adamw(m), {}, "construct it with AdamW(..., capturable=True)"),
    (lambda m: _adamw(m, capturable=True), {}, "float learning rate (0.01), which a CUDA graph replays"),
    (lambda m: _adamw(m, lr=torch.tensor(1e-2), capturable=True), {"warmup_steps": 0}, "warmup_steps must be"),
    (lambda m: _adamw(m, lr=torch.tensor(1e-2), capturable=True), {"max_grad_norm": 0.0}, "max_grad_norm must"),
    (lambda m: _adamw(m, capturable=True), {"fixed_lr": True}, "example_batch['x'] is on cpu"),
])
def test_refusals_name_the_fix(make_optimizer, kwargs, message):
    model = _model()
    with pytest.raises(ConfigError, match=re.escape(message)):
        slimtune.capture_step(model, make_optimizer(model), _loss_fn(model), _batch(), **kwargs)


def test_adapter_dropout_is_refused():
    model = _model(dropout=0.1)
    with pytest.raises(ConfigError, match="lora_dropout / rank_dropout / module_dropout"):
        slimtune.capture_step(model, _adamw(model, capturable=True), _loss_fn(model), _batch(), fixed_lr=True)
    model.eval()  # no dropout in eval mode: the check passes and the CPU batch is what is refused
    with pytest.raises(ConfigError, match="is on cpu"):
        slimtune.capture_step(model, _adamw(model, capturable=True), _loss_fn(model), _batch(), fixed_lr=True)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_replays_are_the_eager_steps():
    model = _model(device="cuda")
    twin = copy.deepcopy(model)
    lr = torch.tensor(1e-2, device="cuda")
    opt, twin_opt = _adamw(model, lr=lr, capturable=True), _adamw(twin, lr=lr.clone(), capturable=True)
    before = [p.detach().clone() for p in slimtune.trainable_parameters(model)]
    rng = torch.cuda.get_rng_state()
    step = slimtune.capture_step(model, opt, _loss_fn(model), _batch("cuda"), max_grad_norm=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, slimtune.trainable_parameters(model)))
    assert torch.equal(rng, torch.cuda.get_rng_state())
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    replayed, norms = [], []
    for i in range(4):  # the base model's dropout draws from the global generator: the eager twin starts from the
        replayed.append(step(_batch("cuda", seed=i)))  # same state, after the replays
        norms.append(step.grad_norm())
    torch.cuda.set_rng_state(rng)
    for i in range(4):
        twin_opt.zero_grad(set_to_none=True)
        loss = _loss_fn(twin)(_batch("cuda", seed=i))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(slimtune.trainable_parameters(twin), 1.0, foreach=True)
        twin_opt.step()
        assert torch.allclose(replayed[i], loss.detach(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(norms[i], norm, rtol=1e-4)
    for a, b in zip(slimtune.trainable_parameters(model), slimtune.trainable_parameters(twin)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"batch\['x'\] is \(7, 16\)"):
        step(_batch("cuda", rows=7))
