"""Each adapter's ``explain``: the choices it reports are the ones its choosers make, with both options' counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune
from slimtune.core.costs import choose_path
from slimtune.core.explain import adapter_inputs, explain_layers, explanation_table
from slimtune.core.lowrank import backward_flops, choose_backward
from slimtune.core.module import AdapterModule


def _explained(config, x: torch.Tensor):
    torch.manual_seed(0)
    model = slimtune.adapt(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False)), config)
    with adapter_inputs(model) as seen, torch.no_grad():
        model(x)
    assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, AdapterModule))  # hooks gone
    return model, explain_layers(model, seen)


@pytest.mark.parametrize("tokens", [8, 100_000])
def test_lora_reports_its_backward_order(tokens):
    x = torch.randn(tokens, 64)
    _, rows = _explained(slimtune.LoraConfig(r=4, target_modules=["0", "2"]), x)
    assert [row.name for row in rows] == ["0", "2"] and rows[1].input_shape == (tokens, 96)
    (choice,) = rows[0].choices
    assert choice.chosen == choose_backward(tokens, 64, 96, 4)
    assert {v.name: v.flops for v in choice.options} == {
        v: backward_flops(v, tokens, 64, 96, 4) for v in ("recompute", "gram")}


def test_dora_reports_what_it_keeps():
    _, rows = _explained(slimtune.LoraConfig(r=4, use_dora=True, dora_recompute=False, target_modules=["0", "2"]),
                         torch.randn(10, 64))
    kept = [row.choices[-1] for row in rows]
    assert [c.chosen for c in kept] == ["z", "output"]  # a bias: z; bias-free fp32: its own output
    assert {v.name: v.bytes for v in kept[1].options}["output"] == 10 * 32 * 4


def test_structured_layers_report_their_path():
    x = torch.randn(3, 64)
    model, rows = _explained(slimtune.LokrConfig(r=2, target_modules=["0"]), x)
    (choice,) = rows[0].choices
    assert choice.chosen == choose_path(model[0].costs(x, True))
    _, rows = _explained(slimtune.LohaConfig(r=2, target_modules=["0"], path="structured"), x)
    assert rows[0].choices[0].chosen == "structured (16 launches)"
    assert rows[0].choices[1].what == "backward dA/dB (rank 4)"  # r² = 4


def test_a_loaded_timing_replaces_the_counted_path(tmp_path):
    """A structured layer's path as a timings file holds it (``profile --explain --timings``), named as timed."""
    import json

    from slimtune.core import timed

    x = torch.randn(3, 64)
    model, rows = _explained(slimtune.LokrConfig(r=2, target_modules=["0"]), x)
    counted = rows[0].choices[0].chosen
    other = "structured" if counted.startswith("folded") else "folded"
    decision, key = model[0]._path_decision(x, True)
    (tmp_path / "t.json").write_text(json.dumps([{"decision": decision, "device": "NVIDIA H200", "key": list(key),
                                                   "winner": other}]))
    try:
        timed.load_timings(tmp_path / "t.json")
        _, rows = _explained(slimtune.LokrConfig(r=2, target_modules=["0"]), x)
    finally:
        timed.clear_timings()
    assert rows[0].choices[0].chosen.startswith(other)
    assert rows[0].choices[0].what == "path (fwd+bwd), timed on NVIDIA H200"


def test_table_and_json_rows():
    _, rows = _explained(slimtune.HraConfig(r=4, target_modules=["0", "2"]), torch.randn(5, 64))
    assert explanation_table(rows).row_count == 2
    assert rows[0].to_dict()["choices"][0]["chosen"] in ("recompute", "gram")


def test_lora_siblings_that_read_one_input_are_reported_together():
    from tests.toy_models import tiny_llama

    model = slimtune.adapt(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj", "gate_proj", "up_proj"]))
    ids = torch.randint(0, 128, (2, 5))
    with adapter_inputs(model) as seen, torch.no_grad():
        model(input_ids=ids)
    rows = {row.name.split("layers.0.")[-1]: row for row in explain_layers(model, seen) if "layers.0." in row.name}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        choice = rows[name].choices[-1]
        assert choice.what.startswith("siblings") and choice.chosen == "one Function: q_proj, k_proj, v_proj (21 launches)"
        assert {v.name for v in choice.options} == {choice.chosen, "alone (29 launches)"}
        assert len({v.flops for v in choice.options}) == 1  # the same arithmetic either way
    assert rows["mlp.up_proj"].choices[-1].chosen == "one Function: gate_proj, up_proj (16 launches)"
    assert [c.what for c in rows["self_attn.o_proj"].choices] == ["backward dA/dB (rank 4)"]


def test_dora_siblings_are_reported_together_with_their_norm_flops():
    from tests.toy_models import tiny_llama

    targets = ["q_proj", "k_proj", "v_proj"]
    rows = {}
    for dora in (False, True):
        model = slimtune.adapt(tiny_llama(), slimtune.LoraConfig(r=4, use_dora=dora, target_modules=targets))
        with adapter_inputs(model) as seen, torch.no_grad():
            model(input_ids=torch.randint(0, 128, (2, 5)))
        rows[dora] = {row.name: row.choices[-1] for row in explain_layers(model, seen) if "layers.0." in row.name}
    name = next(n for n in rows[True] if n.endswith("k_proj"))
    dora, lora = rows[True][name], rows[False][name]
    assert dora.chosen == "one Function: q_proj, k_proj, v_proj"
    assert {v.name for v in dora.options} == {dora.chosen, "alone"}
    assert dora.options[0].flops > lora.options[0].flops  # + W Aᵀ and A Aᵀ per member
