"""Two processes (torchrun, gloo on the CPU): DDP and FSDP2, eager and compiled, follow the one-process run with the
same global batch, and a run saved by two processes resumes on one.

The one-process run accumulates two micro-batches of 2 rows per step; each of the two processes runs one micro-
batch of 2 rows. Tolerance: per-step losses within 1e-5 and the final adapter within 1e-4 relative (float32: the
only difference is the order of floating-point sums; on this CPU the results are bit for bit the same).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from slimtune.cli import main
from slimtune.memory.subproc import child_env

from ..helpers import FP32_TOL
from .conftest import TINY, lm_records, read_log, run_train, write_lines

STEPS = 4
LOSS_TOL = 1e-5


def _args(data: Path, out: Path) -> list[str]:
    return [*TINY, "--data", str(data), "--out", str(out), "--max-steps", str(STEPS), "--save-every", "2",
            "--eval-fraction", "0.1"]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "slimtune", "train", *args]
    return subprocess.run(cmd, env=dict(child_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)


def _failure(result: subprocess.CompletedProcess, out: Path) -> str:
    """What a failed torchrun printed, and how far the run got (its log's last lines)."""
    log = out / "log.jsonl"
    tail = log.read_text().splitlines()[-3:] if log.is_file() else ["(no log.jsonl)"]
    return "\n".join([result.stderr[-3000:], "--- stdout:", result.stdout[-1500:], "--- log.jsonl:", *tail])


def _losses(out: Path) -> tuple[list[float], list[float]]:
    log = read_log(out)
    return [r["loss"] for r in log if "loss" in r], [r["eval_loss"] for r in log if "eval_loss" in r]


def _adapter_rel_err(a: Path, b: Path) -> float:
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    num = sum(float(((ta[k].double() - tb[k].double()) ** 2).sum()) for k in ta)
    den = sum(float((tb[k].double() ** 2).sum()) for k in tb)
    return (num / den) ** 0.5


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= LOSS_TOL * abs(w) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The data and the one-process run (two micro-batches of 2 rows per step)."""
    tmp = tmp_path_factory.mktemp("reference")
    data = write_lines(tmp / "lm.jsonl", lm_records())
    out = tmp / "out"
    assert main(["train", *_args(data, out), "--micro-batch", "2"]) == 0
    return data, out


@pytest.mark.parametrize("mode, compiled", [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)])
def test_two_processes_match_one(mode, compiled, reference, tmp_path, capsys):
    """Compiled (``--compile``: each layer's LoRA chains stacked, core.stacked_rows) too: FSDP all-gathers the
    parameters into buffers of its own before each forward, so a stack there would go stale after the first update
    (the losses of steps 3-4 differed before stacked_rows.sharded)."""
    data, ref = reference
    out = tmp_path / mode
    memory = ["--memory", "max-fit"] if mode == "fsdp" else []  # sharded layers, checkpointed: the same steps
    result = _torchrun([*_args(data, out), "--distributed", mode, *memory, *(["--compile"] if compiled else [])])
    assert result.returncode == 0, _failure(result, out)
    losses, eval_losses = _losses(out)
    ref_losses, ref_eval = _losses(ref)
    assert len(losses) == STEPS and _close(losses, ref_losses) and _close(eval_losses, ref_eval)
    assert _adapter_rel_err(out, ref) < FP32_TOL
    assert (out / "adapter_config.json").read_text() == (ref / "adapter_config.json").read_text()
    if mode == "fsdp" and not compiled:  # the run saved by two processes at step 2 continues on one
        resumed = tmp_path / "resumed"
        shutil.copytree(out, resumed)
        shutil.rmtree(resumed / f"checkpoint-{STEPS:06d}")
        code, events, err = run_train([*_args(data, resumed), "--resume"], capsys)
        assert code == 0, err
        assert events[0]["start_step"] == 2 and "resumed on 1 processes from 2" in err
        assert _close(_losses(resumed)[0], ref_losses)
        assert _adapter_rel_err(resumed, ref) < FP32_TOL
