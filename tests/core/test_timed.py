"""The optional timed criterion of the variant choosers (:mod:`slimtune.core.timed`): a new shape is measured once
and its winner kept; the counting choice where nothing can be timed; the cache saved and loaded; the global random
state untouched; both variants give the same gradients."""
from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.core import timed
from slimtune.core.lowrank import choose_backward, factor_grads, pick_backward
from tests.helpers import FP32_TOL, rel_err


@pytest.fixture(autouse=True)
def fresh():
    timed.clear_timings()
    yield
    slimtune.set_variant_criterion("flops")
    timed.clear_timings()


def operands(tokens=64, d_in=32, d_out=48, r=4):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=gen) for shape in ((tokens, d_out), (tokens, d_in), (r, d_in), (d_out, r)))


def test_the_measured_winner_is_used_and_kept(monkeypatch):
    dy, xd, down, up = operands()
    counted = choose_backward(64, 32, 48, 4)
    other = "gram" if counted == "recompute" else "recompute"
    measured = []

    def fake_seconds(run, device):  # the counted variant made to look slower
        measured.append(run)
        return 2.0 if len(measured) % 2 == (0 if counted == "gram" else 1) else 1.0

    monkeypatch.setattr(timed, "_seconds_of", fake_seconds)
    assert pick_backward(dy, xd, down) == counted  # the default criterion counts
    slimtune.set_variant_criterion("timed")
    state = torch.get_rng_state()
    assert pick_backward(dy, xd, down) == other and len(measured) == 2
    assert pick_backward(dy, xd, down) == other and len(measured) == 2  # cached: measured once per shape
    assert torch.equal(torch.get_rng_state(), state)  # the operands come from a private generator
    (record,) = timed.timings()
    assert record["winner"] == other and record["key"] == [64, 32, 48, 4, "torch.float32"] and record["device"] == "cpu"


def test_timings_persist_and_pin_the_choice(tmp_path, monkeypatch):
    dy, xd, down, _ = operands()
    slimtune.set_variant_criterion("timed")
    winner = pick_backward(dy, xd, down)
    slimtune.save_timings(tmp_path / "t.json")
    timed.clear_timings()
    monkeypatch.setattr(timed, "_seconds_of", lambda run, device: pytest.fail("a loaded choice is not measured"))
    assert slimtune.load_timings(tmp_path / "t.json") == 1
    assert pick_backward(dy, xd, down) == winner
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(slimtune.ConfigError, match="not a slimtune timings file"):
        slimtune.load_timings(tmp_path / "bad.json")
    with pytest.raises(slimtune.ConfigError, match="unknown variant criterion"):
        slimtune.set_variant_criterion("fastest")


def test_nothing_is_timed_while_compiling_or_on_meta(monkeypatch):
    """Tracing for compile, and the meta device (the planner's simulation, ``profile --explain``: nothing runs there,
    so a "measurement" would pick at random), take the counting choice and cache nothing."""
    dy, xd, down, _ = operands()
    slimtune.set_variant_criterion("timed")
    monkeypatch.setattr(timed, "_seconds_of", lambda run, device: pytest.fail("timed while compiling or on meta"))
    assert pick_backward(*(t.to("meta") for t in (dy, xd, down))) == choose_backward(64, 32, 48, 4)
    monkeypatch.setattr(timed, "compiling", lambda: True)
    assert pick_backward(dy, xd, down) == choose_backward(64, 32, 48, 4)
    assert timed.timings() == []


@pytest.mark.parametrize("variant", ["recompute", "gram"])
def test_either_variant_gives_the_reference_gradients(variant, monkeypatch):
    dy, xd, down, up = operands()
    monkeypatch.setattr("slimtune.core.lowrank.pick_backward", lambda *args: variant)
    d_down, d_up = factor_grads(dy, xd, down, up, 0.5, True, True)
    h = xd.double() @ down.double().t()
    assert rel_err(d_up, 0.5 * dy.double().t() @ h) < FP32_TOL
    assert rel_err(d_down, (0.5 * dy.double() @ up.double()).t() @ xd.double()) < FP32_TOL


def test_a_structured_layer_takes_the_measured_path_and_its_parameters_stay_untouched(monkeypatch):
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 64))
    slimtune.adapt(model, slimtune.LohaConfig(r=4, alpha=8, target_modules=["0"]))
    layer = model[0]
    x = torch.randn(8, 64, requires_grad=True)
    counted = layer.choose(x, True)
    other = "folded" if counted == "structured" else "structured"
    monkeypatch.setattr(timed, "_seconds_of", lambda run, device: 1.0 if getattr(run, "path", None) == other else 2.0)
    real_path_runs = type(layer)._path_runs

    def labelled(self, x, backward):  # tag each run with its path, so the fake clock can tell them apart
        runs = real_path_runs(self, x, backward)
        for path, run in runs.items():
            run.path = path
        return runs

    monkeypatch.setattr(type(layer), "_path_runs", labelled)
    slimtune.set_variant_criterion("timed")
    y = model(x)
    assert layer.last_path == other
    assert all(p.grad is None for p in layer.parameters())  # the timing ran on copies
    y.sum().backward()
    assert all(p.grad is not None for p in slimtune.trainable_parameters(model))
