"""``slimtune train`` refuses bad input before any work: one line on stderr naming the problem, exit status 2,
no traceback, nothing written."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.train import TrainConfig

from .conftest import TINY, run_train, write_lines


def _files(tmp: Path) -> dict[str, str]:
    """The inputs the cases refer to, by name."""
    files = {
        "good": write_lines(tmp / "good.jsonl", [{"text": "hello there"}, {"prompt": "a", "completion": "b"}]),
        "empty": write_lines(tmp / "empty.jsonl", ["", "   "]),
        "broken": write_lines(tmp / "broken.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated']),
        "list": write_lines(tmp / "list.jsonl", [{"text": "ok"}, [1, 2]]),
        "keys": write_lines(tmp / "keys.jsonl", [{"text": "ok"}, {"prompt": "no completion"}]),
        "long": write_lines(tmp / "long.jsonl", [{"text": "ok"}, {"text": "x" * 200}]),
        "ranks": write_lines(tmp / "ranks.json", ["[1, 2]"]),
    }
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("not a run")
    other = tmp / "other"
    other.mkdir()
    recorded = TrainConfig(out=str(other), data=str(files["good"]), preset="tiny-llama", lr=0.5).resolved(False)
    (other / "run.json").write_text(json.dumps({"config": recorded.to_dict()}))
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 8}))
    encoder = tmp / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                     "max_position_embeddings": 512}))
    return {**{k: str(v) for k, v in files.items()}, "model": str(model), "encoder": str(encoder), "tmp": str(tmp)}


CASES = [  # (arguments, text the error must contain)
    (["--data", "{tmp}/missing.jsonl"], "--data {tmp}/missing.jsonl: no such file"),
    (["--data", "{empty}"], "is empty: no JSON lines"),
    (["--data", "{broken}"], "broken.jsonl:3: not valid JSON"),
    (["--data", "{list}"], "list.jsonl:2: expected a JSON object, got list"),
    (["--data", "{keys}"], "keys.jsonl:2: a causal-lm record needs \"text\", or \"prompt\" and \"completion\""),
    (["--data", "{long}"], "long.jsonl:2: 202 tokens, longer than --seq 64; pass --truncate"),
    (["--data", "{good}", "--seq", "4096"], "--seq 4096 is longer than the model's context (2048 positions)"),
    (["--data", "{good}", "--out", "{tmp}/other"], "holds another run (run.json): pass --resume"),
    (["--data", "{good}", "--out", "{tmp}/other", "--resume"], "the settings differ from the run"),
    (["--data", "{good}", "--out", "{tmp}/foreign"], "is not empty and holds no slimtune run"),
    (["--data", "{good}", "--out", "{good}"], "exists and is not a directory"),
    (["--data", "{good}", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--data", "{good}", "--micro-batch", "3"], "--micro-batch 3 does not divide"),
    (["--data", "{good}", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--data", "{good}", "--eval-fraction", "0.9"], "--eval-fraction must be >= 0 and <= 0.5, got 0.9"),
    (["--data", "{good}", "--eval-every", "2"], "--eval-every needs held-out data"),
    (["--data", "{good}", "--method", "lorax"], "unknown method 'lorax'"),
    (["--data", "{good}", "--memory", "huge"], "unknown --memory setting 'huge'; choose from fast, balanced, max-fit"),
    (["--data", "{good}", "--memory", "balanced", "--grad-ckpt"], "--memory balanced already checkpoints every"),
    (["--data", "{good}", "--plain-layers", "2"], "--plain-layers 2 needs --memory balanced or max-fit"),
    (["--data", "{good}", "--memory", "balanced", "--plain-layers", "-1"],
     "plain_layers must be a non-negative integer, got -1"),
    (["--task", "diffusion", "--preset", "tiny-unet", "--max-steps", "1", "--memory", "max-fit"],
     "--memory='max-fit' offloads a language model's checkpointed layers; a diffusion model takes 'fast' or"),
    (["--task", "diffusion", "--preset", "tiny-unet", "--max-steps", "1", "--compile"],
     "--compile compiles a transformer's layers (causal-lm, classification), not a diffusion model"),
    (["--data", "{good}", "--dtype", "int8"], "unsupported dtype 'int8'"),
    (["--data", "{good}", "--ranks", "{tmp}/nope.json"], "--ranks {tmp}/nope.json: no such file"),
    (["--data", "{good}", "--ranks", "{ranks}"], "expected a JSON object of module-name pattern -> rank"),
    (["--data", "{good}", "--distributed", "fsdp"], "--distributed fsdp needs several processes: start the run"),
    (["--data", "{good}", "--task", "classification"], "--task classification needs a pretrained encoder"),
    (["--data", "{good}", "--task", "diffusion"], "reads precomputed latents and text embeddings from a .safetensors"),
    (["--data", "{good}", "--preset", "tiny-unet", "--task", "causal-lm"], "is a diffusion model: use --task"),
    (["--task", "diffusion", "--preset", "tiny-unet"], "give --max-steps"),
    (["--data", "{good}", "--model", "{tmp}/no-such-model"], "give exactly one of --model DIR"),
    (["--data", "{good}", "--model", "{tmp}/no-such-model", "--preset", None], "does not exist"),
    (["--data", "{good}", "--model", "{model}", "--preset", None], "--seq 64 is longer than the model's context (8"),
    (["--data", "{good}", "--model", "{model}", "--preset", None, "--seq", "8"], "has no tokenizer files"),
    (["--data", "{good}", "--model", "{encoder}", "--preset", None], "is a BertModel, not a causal language model"),
    (["--data", "{good}", "--memory", "balanced", "--plain-layers", "auto"], "it needs a CUDA device"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[m[:40] for _, m in CASES])
def test_bad_input_is_refused_before_any_work(args, message, tmp_path, capsys):
    files = _files(tmp_path)
    out = tmp_path / "out"
    argv = [*TINY, "--out", str(out)]
    items = [a.format(**files) if isinstance(a, str) else a for a in args]
    while items:
        flag = items.pop(0)
        value = items.pop(0) if items and not (isinstance(items[0], str) and items[0].startswith("--")) else ""
        if flag in argv:  # replace a value TINY gives (value None: drop it)
            i = argv.index(flag)
            del argv[i:i + 2]
        if value is not None:
            argv += [flag, value] if value else [flag]
    code, _, err = run_train(argv, capsys)
    assert code == 2, err
    assert message.format(**files) in err
    assert err.startswith("slimtune: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was written


CAPTURE_CASES = [  # (arguments after TINY's, text the error must contain): what a CUDA graph cannot hold
    (["--capture"], "--capture replays CUDA graphs: it needs a CUDA device, not cpu"),
    (["--capture", "--no-pack"], "--capture replays one step of fixed shapes: --task causal-lm needs --pack"),
    (["--capture", "--compile"], "--capture and --compile: give one"),
    (["--capture", "--grad-ckpt"], "it runs --memory fast without --grad-ckpt"),
    (["--capture", "--memory", "balanced"], "it runs --memory fast without --grad-ckpt"),
    (["--capture", "--variant-criterion", "timed"], "the timed criterion measures eager steps"),
]


@pytest.mark.parametrize("args,message", CAPTURE_CASES, ids=[m[:40] for _, m in CAPTURE_CASES])
def test_capture_refuses_what_a_graph_cannot_hold(args, message, lm_data, tmp_path, capsys):
    code, _, err = run_train([*TINY, "--data", str(lm_data), "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_capture_run_checks_processes_and_micro_batches():
    """One process, one micro-batch per step (checked where the device and the processes are known)."""
    from slimtune.train.distributed import Environment
    from slimtune.train.run import check_capture_run

    cfg = TrainConfig(out="x", preset="tiny-llama", data=None, capture=True, batch=8)
    cuda = torch.device("cuda")
    check_capture_run(cfg, Environment(rank=0, world=1, local_rank=0), cuda)
    with pytest.raises(ConfigError, match="--capture runs one process, not 2"):
        check_capture_run(cfg, Environment(rank=0, world=2, local_rank=0), cuda)
    with pytest.raises(ConfigError, match="drop --micro-batch 4"):
        check_capture_run(dataclasses.replace(cfg, micro_batch=4), Environment(rank=0, world=1, local_rank=0), cuda)


def test_a_setting_added_since_a_run_was_recorded_reads_as_its_default(tmp_path):
    """A run recorded before ``capture`` existed resumes: the missing setting had its default."""
    cfg = TrainConfig(out=str(tmp_path), preset="tiny-llama", task="diffusion", max_steps=1).resolved(False)
    recorded = cfg.to_dict()
    del recorded["capture"]
    assert cfg.changes_from(recorded) == []
    assert dataclasses.replace(cfg, capture=True).changes_from(recorded) == ["capture: False -> True"]
