"""``slimtune profile --explain``: a preset's layers explained on the meta device, and the command line."""
from __future__ import annotations

import json

import pytest

from slimtune.cli import main
from slimtune.models.explain import explain_preset


def test_every_targeted_layer_of_a_preset_is_explained():
    rows = explain_preset("tiny-llama", "loha", rank=4, alpha=None, batch=2, seq=16, dtype="float32")
    assert len(rows) == 28 and all(row.input_shape[:2] == (2, 16) for row in rows)
    assert all(row.choices[0].what == "path (fwd+bwd)" for row in rows)


def test_profile_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--explain", "--json", "--method", "dora", "--seq", "16", "--rank", "4"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert layers[0]["adapter"] == "DoraLinear"
    assert [c["what"] for c in layers[0]["choices"]] == ["backward dA/dB (rank 4)", "kept for dm",
                                                         "siblings (same input, from step 2)"]  # q with k, v


def test_profile_explain_table_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--explain", "--method", "lora", "--seq", "16"]) == 0
    assert "recompute" in capsys.readouterr().out
    assert main(["profile", "--explain", "--method", "none"]) == 2
    assert "--explain" in capsys.readouterr().err


def test_profile_explain_shows_a_runs_timed_choices(tmp_path, capsys, monkeypatch) -> None:
    """``--timings FILE`` (what a ``train --variant-criterion timed`` run saves): the measured winners replace the
    counted choices for the shapes the file holds, named as timed; without --explain it is refused."""
    import torch

    import slimtune
    from slimtune.core import timed
    from slimtune.models.presets import build_model
    from slimtune.models.workload import default_targets, forward_loss, make_adapter_config, make_inputs

    args = ["profile", "--explain", "--json", "--method", "lora", "--rank", "4", "--seq", "16", "--batch", "2",
            "--dtype", "float32"]
    assert main(args) == 0
    counted = json.loads(capsys.readouterr().out)["layers"]
    # a timed run on the CPU over the same shapes, where the variant the count did not pick measures faster
    model = build_model("tiny-llama", "cpu", torch.float32, seed=0)
    slimtune.adapt(model, make_adapter_config("lora", 4, None, default_targets("tiny-llama", "lora")))
    model.train()
    slimtune.set_variant_criterion("timed")
    calls = []
    monkeypatch.setattr(timed, "_seconds_of", lambda run, device: calls.append(run) or (len(calls) % 2))
    try:
        timed.clear_timings()
        forward_loss("tiny-llama", model, make_inputs("tiny-llama", model, 2, 16, "cpu", torch.float32))[0].backward()
        slimtune.save_timings(tmp_path / "timings.json")
    finally:
        slimtune.set_variant_criterion("flops")
        timed.clear_timings()
    records = json.loads((tmp_path / "timings.json").read_text())
    measured = {(r["key"][0], r["key"][1], r["key"][2]): r["winner"] for r in records}
    assert measured and main([*args, "--timings", str(tmp_path / "timings.json")]) == 0
    shown = json.loads(capsys.readouterr().out)["layers"]
    for before, after in zip(counted, shown):
        choice = after["choices"][0]
        assert choice["what"] == "backward dA/dB (rank 4), timed on cpu"
        tokens, d_in = 32, after["input_shape"][-1]
        winners = {w for (t, i, _), w in measured.items() if (t, i) == (tokens, d_in)}
        assert choice["chosen"] in winners
    assert any(a["choices"][0]["chosen"] != b["choices"][0]["chosen"] for a, b in zip(shown, counted))
    timed.clear_timings()
    assert main(["profile", "--timings", str(tmp_path / "timings.json"), "--method", "lora"]) == 2
    assert "goes with --explain" in capsys.readouterr().err


def test_compiled_explanation_matches_the_stacks_a_compiled_model_builds():
    """``profile --explain --compile`` against the real thing: tiny-llama with LoRA r=8 through ``compile_layers``
    (aot_eager) for two training steps; every layer's stack (rows, wide rows, or none) is the one explained."""
    import torch

    import slimtune
    from slimtune.core import stacked_rows as sr
    from slimtune.models.layers import compile_layers
    from slimtune.models.presets import build_model
    from slimtune.models.workload import default_targets, forward_loss, make_adapter_config, make_inputs

    explained = {row.name: row.choices[-1].chosen for row in
                 explain_preset("tiny-llama", "lora", rank=8, alpha=None, batch=2, seq=16, dtype="float32",
                                compiled=True)}
    model = build_model("tiny-llama", "cpu", torch.float32, seed=0)
    slimtune.adapt(model, make_adapter_config("lora", 8, None, default_targets("tiny-llama", "lora")))
    model.train()
    compile_layers(model, backend="aot_eager")
    inputs = make_inputs("tiny-llama", model, 2, 16, "cpu", torch.float32)
    for _ in range(2):
        forward_loss("tiny-llama", model, inputs)[0].backward()
    names = {m: n for n, m in model.named_modules()}
    built = {}
    for name, module in model.named_modules():
        head = module.__dict__.get(sr.HEAD)
        if head is None or not head.modules():
            built[name] = "not stacked"
            continue
        first = head.modules()[0]
        together = ", ".join(names[m].rpartition(".")[2] for m in first.__dict__[sr.MEMBERS].modules())
        built[name] = f"{'wide rows' if first.__dict__[sr.ROWS].dim() == 1 else 'stacked rows'}: {together}"
    assert explained and {name: built[name] for name in explained} == explained
    assert {c.split(":")[0] for c in explained.values()} == {"stacked rows", "wide rows"}


def test_profile_explain_compile_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--explain", "--compile", "--json", "--method", "dora", "--seq", "16", "--rank", "8"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [c["what"] for c in layers[0]["choices"]] == ["backward dA/dB (rank 8)", "kept for dm",
                                                         "compiled (from step 2)"]
    assert layers[0]["choices"][-1]["chosen"] == "stacked rows: q_proj, k_proj, v_proj"
