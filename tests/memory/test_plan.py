"""The planner: sizes, the budget, the search's rows against direct estimates, the command line."""
from __future__ import annotations

import json

import pytest

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.memory import plan
from slimtune.memory.estimate import estimate_memory
from slimtune.models import ModelPreset

MICRO = ModelPreset("micro-llama", "1-layer tiny Llama for tests", hidden_size=64, intermediate_size=160,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                    tie_word_embeddings=False, max_position_embeddings=128)
GiB = 2**30


@pytest.mark.parametrize("text, expected", [("16GB", 16 * GiB), ("24GiB", 24 * GiB), ("80G", 80 * GiB),
                                            ("16384MB", 16 * GiB), ("1.5 GB", int(1.5 * GiB)), ("12", 12 * GiB),
                                            ("512KiB", 512 * 1024), ("1024B", 1024)])
def test_parse_size(text: str, expected: int) -> None:
    assert plan.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "sixteen", "-4GB", "16XB"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError):
        plan.parse_size(text)


def test_budget_keeps_a_margin() -> None:
    assert plan.usable_bytes(16 * GiB) == int((16 * GiB - plan.CONTEXT_BYTES) * (1 - plan.FRAGMENTATION))
    assert plan.usable_bytes(plan.CONTEXT_BYTES // 2) == 0


def card_for(peak: int) -> int:
    """A card whose budget is exactly ``peak``."""
    return int(peak / (1 - plan.FRAGMENTATION)) + plan.CONTEXT_BYTES + 2


@pytest.fixture(scope="module")
def card() -> int:
    # a budget that some configurations of the grid fit and some do not
    return card_for(estimate_memory(MICRO, "lora", 8, batch=1, seq=64).peak_bytes)


@pytest.fixture(scope="module")
def rows(card: int) -> plan.PlanResult:
    return plan.search(MICRO, card, methods=["lora", "none"], ranks=[4, 8], quants=["none"], batches=[1, 4],
                       seqs=[16, 64, 128], grad_checkpointing=[False, True])


def test_search_returns_only_fitting_configurations_first(rows: plan.PlanResult, card: int) -> None:
    budget = plan.usable_bytes(card)
    fitting = [r for r in rows if r.fits]
    assert fitting and len(fitting) < len(rows)
    assert rows[:len(fitting)] == fitting  # fitting ones first
    for row in fitting:
        assert row.estimate.peak_bytes <= budget
    for row in rows[len(fitting):]:
        assert row.estimate.peak_bytes > budget
    speeds = [r.tokens_per_s for r in fitting]
    assert speeds == sorted(speeds, reverse=True) and fitting[0].relative_speed == 1.0
    assert len(rows) == 2 * 2 * 6 + 2 * 6  # lora: 2 ranks x 2 ckpt x 6 shapes; full fine-tune: 2 x 6
    assert not rows.skipped


def test_search_rows_agree_with_direct_estimates(rows: plan.PlanResult) -> None:
    """Interpolated shapes and corrected ranks stay within 2% of the simulation of that very configuration."""
    cases = [("lora", 4, 1, 64, False), ("lora", 8, 4, 16, True), ("none", None, 4, 64, False)]
    for method, rank, batch, seq, gc in cases:
        row = next(r for r in rows if (r.point.method, r.point.rank, r.point.batch, r.point.seq,
                                       r.point.grad_checkpointing) == (method, rank, batch, seq, gc))
        direct = estimate_memory(MICRO, method, rank or 8, batch=batch, seq=seq, grad_checkpointing=gc)
        assert row.estimate.peak_bytes == pytest.approx(direct.peak_bytes, rel=0.02)
        assert row.estimate.breakdown["adapter_weights"] == direct.breakdown["adapter_weights"]
        assert row.estimate.breakdown["optimizer_state"] == direct.breakdown["optimizer_state"]


def test_cli_single_configuration_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model", "tiny-llama", "--method", "lora", "--rank", "4", "--batch", "1", "--seq", "16",
                 "--gpu-mem", "1GB", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["fits"] is True and data["preset"] == "tiny-llama"
    assert data["peak_bytes"] == sum(data["breakdown"].values())


def test_cli_search_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model", "tiny-llama", "--gpu-mem", "1GB", "--methods", "lora", "--quant", "none",
                 "--batch", "1,2", "--seq", "16", "--grad-ckpt", "off"])
    out = capsys.readouterr().out
    assert code == 0
    assert "What fits 1 GiB" in out and "lora" in out and "fastest" in out


def test_cli_needs_a_budget_or_a_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny-llama"]) == 2
    assert "--gpu-mem" in capsys.readouterr().err


def test_fit_plain_layers_reads_the_card(monkeypatch):
    """The count of trailing layers left plain grows with the card, up to the depth; -1 when nothing fits; and
    ``slimtune train --plain-layers auto`` takes it for the GPU it runs on."""
    import torch

    from slimtune.memory.plan import CONTEXT_BYTES, FRAGMENTATION, fit_plain_layers, usable_bytes
    from slimtune.train import TrainConfig
    from slimtune.train.distributed import Environment
    from slimtune.train.run import auto_plain_layers

    args = ("tiny-llama", "lora", 8, 2, 64, "none", "bfloat16", "balanced")
    _, (none, one, two) = fit_plain_layers(*args, gpu_mem=2**40)
    assert none.peak_bytes < one.peak_bytes < two.peak_bytes
    step = two.peak_bytes - one.peak_bytes
    def card(peak: int) -> int:  # a card whose usable bytes just hold `peak`
        return int((peak + 100) / (1 - FRAGMENTATION)) + CONTEXT_BYTES

    assert 0 <= usable_bytes(card(one.peak_bytes + step)) - (one.peak_bytes + step) < step
    assert fit_plain_layers(*args, gpu_mem=2**40)[0] == 4  # tiny-llama's depth
    assert fit_plain_layers(*args, gpu_mem=card(one.peak_bytes + step))[0] == 2
    assert fit_plain_layers(*args, gpu_mem=2**20)[0] == -1

    notes = []
    reporter = type("R", (), {"note": lambda self, text: notes.append(text)})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 2**40}))
    cfg = TrainConfig(out="x", preset="tiny-llama", rank=8, batch=2, memory="balanced", plain_layers="auto",
                      dtype="bfloat16")
    assert auto_plain_layers(cfg, 64, Environment(world=1), torch.device("cuda"), reporter) == 4
    assert "4 of 4 layers stay un-checkpointed" in notes[-1]


def test_search_leaves_as_many_layers_plain_as_fit() -> None:
    """A fitting balanced row keeps the count of plain layers that ``fit_plain_layers`` gives for its shape, with
    the peak still in the budget and a faster modelled step; ``plain_layer_search=False`` (``plan
    --no-plain-layers``) keeps every layer checkpointed."""
    args = ("tiny-llama", "lora", 8, 2, 64, "none", "bfloat16", "balanced")
    _, (none, one, two) = plan.fit_plain_layers(*args, gpu_mem=2**40)
    gpu = card_for(one.peak_bytes + (two.peak_bytes - one.peak_bytes) + 100)  # room for two plain layers, not three
    count, _ = plan.fit_plain_layers(*args, gpu_mem=gpu)
    assert count == 2

    def search(plain: bool) -> plan.PlanRow:
        rows = plan.search("tiny-llama", gpu, methods=["lora"], ranks=[8], quants=["none"], batches=[2], seqs=[64],
                           memories=["balanced"], plain_layer_search=plain)
        (row,) = rows
        return row

    with_plain, without = search(True), search(False)
    assert without.point.plain_layers == 0 and without.estimate.peak_bytes == none.peak_bytes
    assert with_plain.point.plain_layers == count and with_plain.fits
    assert with_plain.estimate.peak_bytes == two.peak_bytes <= plan.usable_bytes(gpu)
    assert with_plain.estimate.flops < without.estimate.flops  # two layers' recompute less
    table = plan.search_table([with_plain], gpu, 5, False)
    assert "plain" not in table.columns[4].header and "+2" in list(table.columns[4].cells)[0]
    assert "un-checkpointed" in str(table.caption)
