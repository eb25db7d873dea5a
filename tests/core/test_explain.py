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


ALL_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _compiled_explanation(model: nn.Module) -> dict[str, tuple]:
    """Layer 0's choices with the layers marked compiled (what ``profile --explain --compile`` does), by name."""
    from slimtune.core.tracing import mark_compiled
    from slimtune.models.layers import layer_stack

    for layer in layer_stack(model):
        mark_compiled(layer)
    with adapter_inputs(model) as seen, torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 5)))
    return {row.name.split("layers.0.")[-1]: row.choices for row in explain_layers(model, seen)
            if "layers.0." in row.name}


def test_compiled_layers_report_how_their_chains_stack():
    """Marked compiled, each LoRA layer says how the compiled layer runs its chain from step 2: q/k/v on stacked
    rows, gate/up wide, o and down stacked alone; the same FLOPs every way, and no eager siblings row."""
    from tests.toy_models import tiny_llama

    rows = _compiled_explanation(slimtune.adapt(tiny_llama(), slimtune.LoraConfig(r=8,
                                                                                  target_modules=ALL_LLAMA_TARGETS)))
    chosen = {name: choices[-1].chosen for name, choices in rows.items()}
    assert chosen == {**{f"self_attn.{p}_proj": "stacked rows: q_proj, k_proj, v_proj" for p in "qkv"},
                      "self_attn.o_proj": "stacked rows: o_proj", "mlp.gate_proj": "wide rows: gate_proj, up_proj",
                      "mlp.up_proj": "wide rows: gate_proj, up_proj", "mlp.down_proj": "stacked rows: down_proj"}
    for choices in rows.values():
        assert [c.what for c in choices] == ["backward dA/dB (rank 8)", "compiled (from step 2)"]
        assert len({v.flops for v in choices[-1].options}) == 1 and choices[-1].options[0].flops > 0


def test_compiled_chains_that_cannot_stack_report_their_own_function():
    """A chain over biased weights does not stack (core.stacked_rows.stackable): it runs its one Function compiled,
    and a biased layer in no chain runs alone; a rank that is not a multiple of 8 keeps gate/up on rows."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      attention_bias=True)
    rows = _compiled_explanation(slimtune.adapt(transformers.LlamaForCausalLM(config).eval(),
                                                slimtune.LoraConfig(r=4, target_modules=ALL_LLAMA_TARGETS)))
    assert rows["self_attn.k_proj"][-1].chosen == "one Function: q_proj, k_proj, v_proj"
    assert rows["self_attn.o_proj"][-1].chosen == "alone"
    assert rows["mlp.up_proj"][-1].chosen == "stacked rows: gate_proj, up_proj"  # r=4: not aligned for wide rows


def test_compiled_dora_says_the_partitioner_decides_what_it_keeps():
    from tests.toy_models import tiny_llama

    rows = _compiled_explanation(slimtune.adapt(tiny_llama(), slimtune.LoraConfig(
        r=8, use_dora=True, target_modules=ALL_LLAMA_TARGETS)))
    kept = {name: next(c for c in choices if c.what == "kept for dm").chosen for name, choices in rows.items()}
    assert set(kept.values()) == {"compiled: the graph's partitioner decides what is kept"}
    assert rows["mlp.gate_proj"][-1].chosen == "stacked rows: gate_proj, up_proj"  # DoRA stacks rows, never wide


def test_compiled_layers_without_sibling_fusion_stack_each_layer_alone():
    from tests.toy_models import tiny_llama

    slimtune.set_sibling_fusion(False)
    try:
        rows = _compiled_explanation(slimtune.adapt(tiny_llama(), slimtune.LoraConfig(
            r=8, target_modules=ALL_LLAMA_TARGETS)))
    finally:
        slimtune.set_sibling_fusion(True)
    assert rows["self_attn.k_proj"][-1].chosen == "stacked rows: k_proj"
    assert rows["mlp.up_proj"][-1].chosen == "stacked rows: up_proj"


def test_compiled_chains_off_their_rows_are_reported_as_they_run():
    """Dropout in training: each member runs alone (the chain is not runnable as one). DoRA in fp16: its stacked
    Function needs an output that stands in for z, so the chain runs its grouped Function or alone, by its routes."""
    from tests.toy_models import tiny_llama

    rows = _compiled_explanation(slimtune.adapt(tiny_llama().train(), slimtune.LoraConfig(
        r=8, lora_dropout=0.1, target_modules=ALL_LLAMA_TARGETS)))
    assert {choices[-1].chosen for choices in rows.values()} == {"alone"}
    rows = _compiled_explanation(slimtune.adapt(tiny_llama().half(), slimtune.LoraConfig(
        r=8, use_dora=True, target_modules=ALL_LLAMA_TARGETS)))
    assert rows["self_attn.k_proj"][-1].chosen == (
        "one Function or alone, by the members' routes (kept for dm): q_proj, k_proj, v_proj")
    assert rows["self_attn.o_proj"][-1].chosen == "alone"
