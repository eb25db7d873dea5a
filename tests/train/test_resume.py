"""Checkpoints and ``--resume``: a run killed with SIGKILL mid-run and resumed ends with the very bytes of an
uninterrupted run's adapter; the adapter is PEFT's format (PEFT and slimtune load it); a finished run resumes as
complete."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.memory.subproc import child_env
from slimtune.models.presets import build_model
from slimtune.train.checkpoint import checkpoints

from .conftest import TINY, read_log, run_train

STEPS = 12


def _args(data: Path, out: Path) -> list[str]:
    return [*TINY, "--data", str(data), "--out", str(out), "--max-steps", str(STEPS), "--save-every", "2",
            "--micro-batch", "2", "--warmup-steps", "2", "--eval-fraction", "0.1"]


def _kill_mid_run(args: list[str], out: Path) -> int:
    """Start ``slimtune train`` in a new process, SIGKILL it once its second-step checkpoint exists; the step of
    the newest checkpoint left behind."""
    env = dict(child_env(), OMP_NUM_THREADS=str(torch.get_num_threads()))  # the same arithmetic as this process
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    return checkpoints(out)[-1][0]


def test_kill_and_resume_is_bit_identical(lm_data, tmp_path, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    code, events, err = run_train(_args(lm_data, whole), capsys)
    assert code == 0, err
    step = _kill_mid_run(_args(lm_data, killed), killed)
    assert 2 <= step < STEPS and not (killed / "adapter_model.safetensors").exists()  # killed mid-run

    code, resumed, err = run_train([*_args(lm_data, killed), "--resume"], capsys)
    assert code == 0, err
    assert resumed[0]["event"] == "start" and resumed[0]["start_step"] == step
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert [r["loss"] for r in read_log(killed) if "loss" in r] == [r["loss"] for r in read_log(whole) if "loss" in r]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == list(range(2, STEPS + 1, 2))
    assert len(checkpoints(whole)) == 2  # --keep 2

    # the files are what slimtune.save_adapter writes (PEFT's format) for the trained adapter
    model = slimtune.load_adapter(build_model("tiny-llama", seed=0), whole)
    slimtune.save_adapter(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_model.safetensors").read_bytes() == \
        (whole / "adapter_model.safetensors").read_bytes()

    # a finished run resumes as complete
    code, events, err = run_train([*_args(lm_data, whole), "--resume"], capsys)
    assert code == 0 and "complete" in err and events[-1]["steps"] == STEPS


def test_a_checkpoint_holds_tensor_learning_rates_as_numbers(tmp_path):
    """``--capture`` keeps the learning rate as a tensor (the graph reads it; the scheduler writes it in place): the
    checkpoint's JSON holds numbers where the optimizer's groups and the scheduler's state hold tensors."""
    from slimtune.train import checkpoint
    from slimtune.train.loop import cosine_schedule

    model = slimtune.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), slimtune.LoraConfig(r=2, target_modules=["0"]))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(named.values()), lr=1e-3)
    scheduler = cosine_schedule(optimizer, 2, 10)
    optimizer.param_groups[0]["lr"] = torch.tensor(float(optimizer.param_groups[0]["lr"]))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    lr = float(optimizer.param_groups[0]["lr"])
    assert isinstance(scheduler.state_dict()["_last_lr"][0], torch.Tensor)
    optim = {"state": {}, "param_groups": [dict(optimizer.param_groups[0], params=list(named))]}
    params = {n: p.detach().clone() for n, p in named.items()}
    path = checkpoint.save(tmp_path, 3, {"step": 3, "scheduler": scheduler.state_dict()}, params, optim,
                           [{"cpu": torch.get_rng_state()}], checkpoint.peft_tensors(model, model, params), model,
                           keep=1)
    record = checkpoint.read_state(path)
    assert record["optimizer_groups"][0]["lr"] == pytest.approx(lr)
    assert record["scheduler"]["_last_lr"] == pytest.approx([lr])


def test_a_compiled_run_resumes_with_its_stacks_and_optimizer_state(lm_data, tmp_path, capsys):
    """``--compile`` at rank 8 stacks gate/up wide (core.wide_rows: B column-major, a view of the stack): the
    checkpoint holds its trainable tensors row-major (safetensors takes no other), and a run resumed from step 4
    re-lays AdamW's state as B is and ends where the uninterrupted run does (within fp32 rounding: a resumed run's
    first step runs unstacked)."""
    from safetensors.torch import load_file

    args = [*TINY, "--rank", "8", "--compile", "--data", str(lm_data), "--max-steps", "6", "--save-every", "2",
            "--micro-batch", "2", "--warmup-steps", "2", "--eval-fraction", "0.1"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torch.compiler.reset()
    code, _, err = run_train([*args, "--out", str(whole)], capsys)
    assert code == 0, err
    resumed.mkdir()
    for name in ("run.json", "log.jsonl"):
        (resumed / name).write_bytes((whole / name).read_bytes())
    four = next(path for step, path in checkpoints(whole) if step == 4)
    import shutil

    shutil.copytree(four, resumed / four.name)
    code, events, err = run_train([*args, "--out", str(resumed), "--resume"], capsys)
    assert code == 0, err
    assert events[0]["event"] == "start" and events[0]["start_step"] == 4
    want, got = (load_file(d / "adapter_model.safetensors") for d in (whole, resumed))
    assert want.keys() == got.keys() and any("gate_proj" in k for k in want)
    assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in want)
