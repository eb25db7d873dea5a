"""The allocated config: exact per-layer keys that slimtune and PEFT read the same way, the scale rule, and every
method whose rank means the same."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune
from slimtune.ranks.plan import allocate_from, allocated_config, pattern_key
from slimtune.ranks.sensitivity import estimate_sensitivity

from ..toy_models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama_batches(n: int = 2):
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 128, (2, 12), generator=gen) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


@pytest.fixture(scope="module")
def llama_allocation():
    model = tiny_llama()
    cfg = slimtune.LoraConfig(r=8, alpha=16, target_modules=TARGETS)
    sens = estimate_sensitivity(model, _llama_batches(), cfg, "gradient")
    return model, cfg, sens, allocate_from(model, cfg, sens, granule=4, min_rank=4)


def _slimtune_ranks(model: nn.Module, cfg) -> dict[str, tuple[int, float]]:
    return {name: (a.r, a.scaling) for name, a in slimtune.adapter_modules(slimtune.adapt(model, cfg))}


def _peft_ranks(model: nn.Module, cfg) -> dict[str, tuple[int, float]]:
    peft = pytest.importorskip("peft")
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules,
                           rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern)
    wrapped = peft.get_peft_model(model, pcfg)
    return {name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
            for name, m in wrapped.named_modules() if isinstance(getattr(m, "r", None), dict) and m.r}


def test_rank_pattern_loads_in_peft_with_the_same_ranks(llama_allocation):
    _, cfg, _, plan = llama_allocation
    ranks = plan.ranks()
    assert len(set(ranks.values())) > 1, "the allocation should not be uniform on this model"
    ours = _slimtune_ranks(tiny_llama(), plan.config)
    theirs = _peft_ranks(tiny_llama(), plan.config)
    assert ours == pytest.approx(theirs)
    assert {name: r for name, (r, _) in ours.items()} == ranks
    assert [s for _, s in ours.values()] == pytest.approx([cfg.alpha / cfg.r] * len(ours))  # the scale rule kept
    assert sum(r * (a.in_features + a.out_features) for (r, _), (_, a) in
               zip(ours.values(), slimtune.adapter_modules(slimtune.adapt(tiny_llama(), plan.config)))) == plan.used


def test_pattern_keys_are_exact():
    names = ["", "layers.1.q", "layers.11.q", "x.layers.1.q", "blk(1).q", "layers.1.q.base"]
    assert pattern_key("layers.11.q", names) == "layers.11.q"
    assert pattern_key("layers.1.q", names) == r"^layers\.1\.q"  # the plain name would match x.layers.1.q too
    assert pattern_key("blk(1).q", names) == r"^blk\(1\)\.q"
    model = nn.Sequential()
    model.add_module("layers", nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    model.add_module("x", nn.Module())
    model.x.add_module("layers", nn.ModuleList([nn.Linear(4, 4)]))
    cfg = slimtune.LoraConfig(r=2, alpha=4, target_modules=["layers.0", "layers.1"])
    names = [n for n, _ in model.named_modules()]
    new = allocated_config(cfg, {"layers.0": 4, "x.layers.0": 6, "layers.1": 2}, names)
    assert new.rank_for("layers.0") == 4 and new.rank_for("x.layers.0") == 6 and new.rank_for("layers.1") == 2
    assert new.alpha_for("x.layers.0") == 12 and new.alpha_for("layers.0") == 8 and new.alpha_for("layers.1") == 4
    assert len(new.alpha_pattern) == 2  # rank 2 keeps the config's alpha: no entry


@pytest.mark.parametrize("cfg", [
    slimtune.LoraConfig(r=8, alpha=8, target_modules=TARGETS, use_dora=True),
    slimtune.LoraConfig(r=8, alpha=8, target_modules=TARGETS, rslora=True),
    slimtune.LohaConfig(r=4, alpha=4, target_modules=TARGETS),
    slimtune.LokrConfig(r=4, alpha=4, target_modules=TARGETS),
    slimtune.HraConfig(r=8, target_modules=TARGETS),
], ids=["dora", "rslora", "loha", "lokr", "hra"])
def test_other_methods(llama_allocation, cfg):
    model, _, sens, _ = llama_allocation
    plan = allocate_from(model, cfg, sens, granule=2, min_rank=2)
    adapted = slimtune.adapt(tiny_llama(), plan.config)
    trainable = sum(p.numel() for p in slimtune.trainable_parameters(adapted))
    assert trainable == plan.params <= plan.budget.amount
    for name, adapter in slimtune.adapter_modules(adapted):
        assert adapter.r == plan.ranks()[name]
        if isinstance(cfg, slimtune.HraConfig):
            assert not plan.config.alpha_pattern
        elif getattr(cfg, "rslora", False):
            assert adapter.scaling == pytest.approx(cfg.alpha / cfg.r ** 0.5)
        else:
            assert adapter.scaling == pytest.approx(cfg.alpha / cfg.r)
    if not isinstance(cfg, slimtune.LokrConfig):  # LoKr's count plateaus: its ranks may all stay small
        assert len(set(plan.ranks().values())) > 1


def test_sensitivities_must_match_the_model(llama_allocation):
    model, cfg, sens, _ = llama_allocation
    with pytest.raises(slimtune.ConfigError, match="do not belong"):
        allocate_from(model, slimtune.LoraConfig(r=8, target_modules=["q_proj"]), sens)
