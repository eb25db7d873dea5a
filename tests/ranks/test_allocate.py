"""Allocation under a budget: known answers, the budget met within one granule, clear errors for bad budgets,
and exact parameter counts per method."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import slimtune
from slimtune.ranks.allocate import Candidate, closed_form, continuous_ranks, greedy
from slimtune.ranks.budget import Budget, parse_budget
from slimtune.ranks.costs import LayerCosts, layer_costs
from slimtune.ranks.layers import find_layers
from slimtune.ranks.plan import allocate_from, plan_ranks

from .problems import TwoLayers, regression_problem

CFG_AB = slimtune.LoraConfig(r=16, alpha=32, target_modules=["a", "b"])


@pytest.mark.parametrize("method", ["gradient", "data"])
def test_the_layer_with_the_higher_rank_update_gets_more_rank(method):
    """Layer a must learn a rank-2 update, b a rank-30 one of the same norm: at the uniform budget (16 + 16) the
    rank-2 layer needs no more than the minimum, and b gets the rest."""
    model, data, loss_fn = regression_problem(d=64, ranks=(2, 30))
    plan = plan_ranks(model, data, CFG_AB, method=method, loss_fn=loss_fn)
    assert plan.ranks() == {"a": 8, "b": 24}
    assert plan.used == plan.budget.amount == 2 * 16 * 128
    assert plan.config.alpha_pattern == {"a": 16, "b": 48}  # alpha / r = 2 kept
    model, data, loss_fn = regression_problem(d=64, ranks=(30, 2))  # the other way round
    assert plan_ranks(model, data, CFG_AB, method=method, loss_fn=loss_fn).ranks() == {"a": 24, "b": 8}


def _random_candidates(n: int, seed: int, spectra: bool) -> list[Candidate]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d_out, d_in = rng.choice([32, 64, 96]), rng.choice([32, 64, 128])
        ranks = [8] + list(range(16, min(d_out, d_in) + 1, 8))
        costs = LayerCosts(f"l{i}", ranks, [r * (d_out + d_in) for r in ranks], 4)
        spectrum = torch.tensor(sorted((rng.random() ** 4 for _ in range(min(d_out, d_in))), reverse=True))
        out.append(Candidate(costs, float(spectrum.sum()) * rng.random(), spectrum if spectra else None))
    return out


@pytest.mark.parametrize("allocator", [greedy, closed_form])
@pytest.mark.parametrize("spectra", [True, False])
def test_budget_is_met_within_one_granule(allocator, spectra):
    for seed in range(5):
        cands = _random_candidates(12, seed, spectra)
        least = sum(c.costs.params[0] for c in cands)
        most = sum(c.costs.params[-1] for c in cands)
        for amount in (least, least + 1000, (least + most) // 2, most - 7, most):
            budget = Budget(amount)
            ranks = allocator(cands, budget)
            used = sum(c.costs.params_at(r) for c, r in zip(cands, ranks))
            step = max(8 * (c.costs.params[1] - c.costs.params[0]) // 8 for c in cands)  # one granule's cost
            assert used <= amount
            assert amount - used < step or all(r == c.costs.ranks[-1] for c, r in zip(cands, ranks))
            assert all(r in c.costs.ranks for c, r in zip(cands, ranks))


def test_closed_form_is_lorambo_rule_without_clipping():
    """r_i = P · √(s_i / c_i) / Σ_j √(s_j c_j) when no rank hits its bounds."""
    costs = [LayerCosts("x", list(range(1, 1001)), [c * r for r in range(1, 1001)], 4) for c in (100, 200, 400)]
    scores = [1.0, 4.0, 9.0]
    cands = [Candidate(c, s) for c, s in zip(costs, scores)]
    budget = Budget(60_000)
    got = continuous_ranks(cands, budget)
    cs = [100, 200, 400]
    norm = sum((s * c) ** 0.5 for s, c in zip(scores, cs))
    want = [budget.amount * (s / c) ** 0.5 / norm for s, c in zip(scores, cs)]
    assert got == pytest.approx(want, rel=1e-9)


def test_budget_strings():
    assert parse_budget("12M") == Budget(12_000_000)
    assert parse_budget("1.5k") == Budget(1500)
    assert parse_budget(4096) == Budget(4096)
    assert parse_budget("48MB") == Budget(48 * 2**20, "bytes")
    assert parse_budget("2 GiB") == Budget(2 * 2**30, "bytes")


@pytest.mark.parametrize("budget, message", [
    (0, "must be positive"), (-5, "must be positive"), ("-1M", "must be positive"), ("0", "must be positive"),
    ("twelve", "cannot read the budget"), (True, "must be a number"),
    ("1G", "larger than fine-tuning the 2 targeted weights fully"),
    (1000, "smaller than the 2 layers need at the minimum rank 8"),
])
def test_bad_budgets_give_clear_errors(budget, message):
    model, data, loss_fn = regression_problem(d=64, batches=1)
    with pytest.raises(slimtune.ConfigError, match=message):
        plan_ranks(model, data, CFG_AB, budget=budget, loss_fn=loss_fn)


def test_bytes_budget_counts_the_adapter_dtype():
    model, data, loss_fn = regression_problem(d=64, batches=1)
    sens = slimtune.ranks.estimate_sensitivity(model, data, CFG_AB, loss_fn=loss_fn)
    by_params = allocate_from(model, CFG_AB, sens, 4096)
    by_bytes = allocate_from(model, CFG_AB, sens, "16KiB")  # fp32 adapters: 4 bytes a parameter
    assert by_params.ranks() == by_bytes.ranks() and by_bytes.used == 4 * by_params.used
    bf16 = slimtune.LoraConfig(r=16, target_modules=["a", "b"], adapter_dtype=torch.bfloat16)
    assert allocate_from(model, bf16, sens, "8KiB").used == 2 * by_params.used


def test_parameter_counts_per_method():
    model = TwoLayers(64)
    layers = find_layers(model, CFG_AB)
    (lora, _) = layer_costs(CFG_AB, layers, 8, 32, 8)
    assert lora.ranks == [8, 16, 24, 32] and lora.params == [r * 128 for r in lora.ranks]
    (dora, _) = layer_costs(slimtune.LoraConfig(target_modules=["a", "b"], use_dora=True), layers, 8, 32, 8)
    assert dora.params == [r * 128 + 64 for r in dora.ranks]
    (loha, _) = layer_costs(slimtune.LohaConfig(target_modules=["a", "b"]), layers, 8, 32, 8)
    assert loha.params == [2 * r * 128 for r in loha.ranks]
    (lokr, _) = layer_costs(slimtune.LokrConfig(target_modules=["a", "b"]), layers, 2, 32, 2)
    assert len(lokr.ranks) < 16 and lokr.params == sorted(set(lokr.params))  # grows, then plateaus: cut there
    (hra, _) = layer_costs(slimtune.HraConfig(target_modules=["a", "b"]), layers, 8, None, 8)
    assert hra.ranks[-1] == 64 and hra.params == [r * 64 for r in hra.ranks]


def test_conv_layers_are_counted_as_locon():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3))
    cfg = slimtune.LoraConfig(r=4, target_modules=["0", "2"])
    first, second = layer_costs(cfg, find_layers(model, cfg), 2, None, 2)
    assert first.ranks == [2, 4, 6, 8] and first.params == [r * (27 + 8) for r in first.ranks]
    assert second.params[0] == 2 * (72 + 16)
