"""``slimtune train --capture`` on a GPU: the replayed steps train as the eager ones do (losses, gradient norms and
the adapter within float32 rounding: the first eager step runs sibling LoRA layers alone, the graph holds them
fused), a packed causal-lm run and a diffusion run, and a captured run's checkpoints resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.train.checkpoint import checkpoints

from ..helpers import rel_err
from .conftest import read_log, run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

FP32_TOL = 1e-4


def _runs(args: list[str], tmp_path: Path, capsys) -> list[tuple[list[dict], dict[str, torch.Tensor]]]:
    """The eager run and the captured one of ``args``: (step records, adapter tensors) each."""
    out = []
    for name, extra in (("eager", []), ("captured", ["--capture"])):
        code, _, err = run_train([*args, "--out", str(tmp_path / name), *extra], capsys)
        assert code == 0, err
        steps = [r for r in read_log(tmp_path / name) if "loss" in r and "event" not in r]
        out.append((steps, load_file(str(tmp_path / name / "adapter_model.safetensors"))))
    return out


@pytest.mark.parametrize("task", ["causal-lm", "diffusion"])
def test_captured_steps_train_as_eager_steps_do(task, lm_data, tmp_path, capsys):
    common = ["--device", "cuda", "--dtype", "float32", "--rank", "4", "--lr", "1e-3", "--batch", "4",
              "--max-steps", "5", "--warmup-steps", "2", "--json"]
    if task == "causal-lm":
        args = ["--preset", "tiny-llama", "--seq", "64", "--data", str(lm_data), *common]
    else:
        pytest.importorskip("diffusers")
        args = ["--task", "diffusion", "--preset", "tiny-unet", *common]
    (eager, eager_adapter), (captured, captured_adapter) = _runs(args, tmp_path, capsys)
    assert len(eager) == len(captured) == 5
    for a, b in zip(eager, captured):
        assert abs(a["loss"] - b["loss"]) <= FP32_TOL * abs(a["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"]
        assert abs(a["lr"] - b["lr"]) <= 1e-6 * a["lr"]  # the graph reads a float32 tensor
    assert eager_adapter.keys() == captured_adapter.keys()
    for key in eager_adapter:
        assert rel_err(captured_adapter[key], eager_adapter[key]) < 1e-3, key


def test_a_captured_run_saves_and_resumes(lm_data, tmp_path, capsys):
    """Its checkpoints hold the learning rate as a number (the graph's tensor is the loop's); a copy of the run
    without its last checkpoint resumes from step 2 to the same losses and adapter."""
    args = ["--preset", "tiny-llama", "--seq", "64", "--data", str(lm_data), "--device", "cuda", "--dtype",
            "float32", "--rank", "4", "--batch", "4", "--max-steps", "4", "--save-every", "2", "--keep", "3",
            "--capture", "--json"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    code, _, err = run_train([*args, "--out", str(whole)], capsys)
    assert code == 0, err
    shutil.copytree(whole, resumed)
    shutil.rmtree(checkpoints(resumed)[-1][1])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (resumed / name).unlink()
    code, events, err = run_train([*args, "--out", str(resumed), "--resume"], capsys)
    assert code == 0, err
    assert events[0]["event"] == "start" and events[0]["start_step"] == 2
    losses = [[r["loss"] for r in read_log(run) if "loss" in r and "event" not in r] for run in (whole, resumed)]
    assert len(losses[1]) == 4 and all(abs(a - b) <= FP32_TOL * abs(a) for a, b in zip(*losses))
    done, again = (load_file(str(run / "adapter_model.safetensors")) for run in (whole, resumed))
    assert all(rel_err(again[k], done[k]) < 1e-3 for k in done)
