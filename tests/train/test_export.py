"""``slimtune export``: a run (or an adapter directory and its base) merged into a plain model that transformers /
diffusers load by themselves, computing what the adapted model computes; and the refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.cli import main
from slimtune.models.presets import build_model
from slimtune.models.text_tasks import docstring_task, write_jsonl
from slimtune.quant import quantize
from slimtune.train.export import RECORD_NAME

from ..helpers import FP32_TOL, perturb_adapters, rel_err
from .conftest import TINY, run_train
from .test_tasks import minilm  # noqa: F401 (the fixture)

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[3, 17, 101, 42, 7, 250, 9, 64]])


def export(args: list[str], capsys) -> tuple[int, str]:
    code = main(["export", *args])
    return code, capsys.readouterr().err


def lm_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A finished tiny-llama LoRA run of three steps (its B factors moved away from zero)."""
    from .conftest import lm_records, write_lines

    tmp = tmp_path_factory.mktemp("run")
    data = write_lines(tmp / "lm.jsonl", lm_records(24))
    out = tmp / "run"
    assert main(["train", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "3"]) == 0
    return out


def test_a_run_exports_to_a_plain_model(lora_run, tmp_path, capsys):
    code, err = export([str(lora_run), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = slimtune.load_adapter(build_model("tiny-llama", seed=0), lora_run)
    assert rel_err(lm_logits(merged), lm_logits(adapted)) < FP32_TOL
    assert not any("lora" in name for name, _ in merged.named_parameters())
    record = json.loads((tmp_path / "merged" / RECORD_NAME).read_text())
    assert record["method"] == "LORA" and record["adapted_layers"] == 28 and record["check"]["relative_error"] < 1e-5
    assert record["check"]["adapter_effect"] > 1e3 * record["check"]["relative_error"]
    # a checkpoint of the run exports the same way (its run.json is one directory up); in bf16 the merge and its
    # check still run in float32, and each weight is rounded once at the end
    checkpoint = max(lora_run.glob("checkpoint-*"))
    code, err = export([str(checkpoint), "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")], capsys)
    assert code == 0, err
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16
    assert all(torch.equal(p.to(torch.bfloat16), q) for p, q in zip(merged.parameters(), half.parameters()))


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "hra"])
def test_every_method_from_an_adapter_directory(method, tmp_path, capsys):
    from slimtune.models.workload import make_adapter_config

    model = build_model("tiny-llama", seed=0)
    slimtune.adapt(model, make_adapter_config(method, 4, 8.0, ["q_proj", "v_proj", "down_proj"]))
    perturb_adapters(model, std=0.05)
    slimtune.save_adapter(model, tmp_path / "adapter")
    code, err = export([str(tmp_path / "adapter"), "--preset", "tiny-llama", "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert rel_err(lm_logits(merged), lm_logits(model)) < FP32_TOL


def test_a_qlora_run_merges_onto_either_base(tmp_path, capsys):
    from .conftest import lm_records, write_lines

    data = write_lines(tmp_path / "lm.jsonl", lm_records(24))
    run = tmp_path / "run"
    assert main(["train", *TINY, "--quant", "nf4", "--data", str(data), "--out", str(run), "--max-steps", "3"]) == 0
    capsys.readouterr()
    trained = build_model("tiny-llama", seed=0)  # what training computed: the NF4 base with the adapter
    quantize(trained, "nf4", compute_dtype=torch.float32)
    slimtune.load_adapter(trained, run)
    logits = {}
    for base in ("dequantized", "original"):
        code, err = export([str(run), "--base", base, "--out", str(tmp_path / base)], capsys)
        assert code == 0, err
        logits[base] = lm_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / base))
    assert rel_err(logits["dequantized"], lm_logits(trained)) < FP32_TOL
    assert rel_err(logits["original"], lm_logits(trained)) > 10 * FP32_TOL  # the NF4 rounding, kept apart


def test_a_classification_run_keeps_its_head_labels_and_tokenizer(minilm, tmp_path, capsys):  # noqa: F811
    records = [{"text": r["text"], "label": ["alpha", "beta", "gamma", "delta"][r["label"]]}
               for r in docstring_task()[:32]]
    run = tmp_path / "run"
    code, _, err = run_train(["--task", "classification", "--model", str(minilm), "--data",
                              str(write_jsonl(records, tmp_path / "t.jsonl")), "--out", str(run), "--rank", "4",
                              "--batch", "8", "--max-steps", "2", "--seq", "32", "--truncate", "--lr", "1e-2",
                              "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    code, err = export([str(run), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    labels = sorted({r["label"] for r in records})
    assert merged.config.id2label == dict(enumerate(labels))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tokenizer(["Return the gamma function."], return_tensors="pt")["input_ids"]
    adapted = transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=len(labels))
    slimtune.load_adapter(adapted, run)
    with torch.no_grad():
        assert rel_err(merged.eval()(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits) < FP32_TOL


def test_a_diffusion_run_exports_its_denoiser(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    run = tmp_path / "run"
    code, _, err = run_train(["--task", "diffusion", "--preset", "tiny-unet", "--out", str(run), "--batch", "2",
                              "--max-steps", "2", "--rank", "4", "--lr", "1e-2", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    code, err = export([str(run), "--out", str(tmp_path / "unet")], capsys)
    assert code == 0, err
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    adapted = build_model("tiny-unet", seed=0).denoiser
    slimtune.load_adapter(adapted, run)
    from slimtune.models.workload import make_inputs

    inputs = make_inputs("tiny-unet", None, 1, 0, "cpu", torch.float32, torch.Generator().manual_seed(0))
    inputs.pop("target", None)
    with torch.no_grad():
        got, want = merged.eval()(**inputs).sample, adapted.eval()(**inputs).sample
    assert rel_err(got, want) < FP32_TOL


def _unfinished(run: Path, tmp_path: Path) -> list[str]:
    copy = tmp_path / "unfinished"
    copy.mkdir()
    (copy / "run.json").write_text((run / "run.json").read_text())
    return [str(copy)]


def _adapter_only(run: Path, tmp_path: Path) -> Path:
    """The run's final adapter files alone, in a directory outside any run."""
    copy = tmp_path / "adapter"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, copy / name)
    return copy


def _another_base(run: Path, tmp_path: Path) -> list[str]:
    """The adapter with a Llama directory of other widths as its base."""
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    config.save_pretrained(tmp_path / "other")
    return [str(_adapter_only(run, tmp_path)), "--model", str(tmp_path / "other")]


def _drawn_on_cuda(run: Path, tmp_path: Path) -> list[str]:
    copy = tmp_path / "cuda-run"
    shutil.copytree(run, copy)
    record = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**record, "device": "cuda"}))
    return [str(copy)]


def _device_unrecorded(run: Path, tmp_path: Path) -> list[str]:
    copy = tmp_path / "old-run"
    shutil.copytree(run, copy)
    record = json.loads((copy / "run.json").read_text())
    record.pop("device")
    (copy / "run.json").write_text(json.dumps(record))
    return [str(copy)]


def _corrupt(run: Path, tmp_path: Path) -> list[str]:
    copy = _adapter_only(run, tmp_path)
    (copy / "adapter_config.json").write_text("{not json")
    return [str(copy), "--preset", "tiny-llama"]


@pytest.mark.parametrize("case, message", [
    ("out not empty", "not an empty directory"),
    ("unfinished run", "has not finished"),
    ("adapter without base", "names no base model"),
    ("run with a base", "drop --model / --preset"),
    ("another base", "an adapter of this base model"),
    ("dense run, dequantized base", "for a QLoRA run"),
    ("drawn on cuda", "drawn again only there"),
    ("device not recorded", "pass --device as the run trained"),
    ("corrupt config", "cannot read it"),
])
def test_refusals_name_the_problem(case, message, lora_run, tmp_path, capsys):
    out = tmp_path / "out"
    source = {
        "out not empty": lambda: [str(lora_run)],
        "unfinished run": lambda: _unfinished(lora_run, tmp_path),
        "adapter without base": lambda: [str(_adapter_only(lora_run, tmp_path))],
        "run with a base": lambda: [str(lora_run), "--preset", "tiny-llama"],
        "another base": lambda: _another_base(lora_run, tmp_path),
        "dense run, dequantized base": lambda: [str(lora_run), "--base", "dequantized"],
        "drawn on cuda": lambda: _drawn_on_cuda(lora_run, tmp_path),
        "device not recorded": lambda: _device_unrecorded(lora_run, tmp_path),
        "corrupt config": lambda: _corrupt(lora_run, tmp_path),
    }[case]()
    target = lora_run if case == "out not empty" else out
    code, err = export([*source, "--out", str(target)], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_an_adapter_naming_its_base_directory_needs_no_model_option(tmp_path, capsys):
    base = build_model("tiny-llama", seed=0)
    base.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    slimtune.adapt(model, slimtune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model, std=0.05)
    slimtune.save_adapter(model, tmp_path / "adapter")  # records base_model_name_or_path = tmp_path / "base"
    code, err = export([str(tmp_path / "adapter"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert rel_err(lm_logits(merged), lm_logits(model)) < FP32_TOL
