"""The estimator and the planner model each memory setting: the CPU estimate equals the CPU profile, the CUDA
estimates fall fast > balanced > max-fit, and ``slimtune plan`` lists what fits with each."""
from __future__ import annotations

import json

import pytest

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.memory import plan
from slimtune.memory.estimate import estimate_memory
from slimtune.memory.profile import profile_training
from slimtune.memory.setting import MEMORY_SETTINGS

from .test_plan import MICRO

SHAPE = dict(rank=4, batch=1, seq=16)


@pytest.mark.parametrize("memory", ["max-fit"])  # on the CPU nothing moves: balanced's figures (fast: test_estimate)
def test_cpu_estimate_is_the_cpu_profile(memory):
    est = estimate_memory("tiny-llama", dtype="float32", device="cpu", memory=memory, **SHAPE)
    got = profile_training("tiny-llama", steps=2, device="cpu", memory=memory, **SHAPE)
    assert est.memory == memory
    assert est.peak_bytes == pytest.approx(got.peak_bytes, rel=1e-4)
    assert est.breakdown["activations"] == pytest.approx(got.breakdown["activations"], rel=1e-3)


def test_cuda_estimates_fall_with_each_setting():
    # layer inputs of 4 x 512 x 256 bf16 = 1 MiB: offloaded (MIN_OFFLOAD_BYTES)
    peaks = [estimate_memory("tiny-llama", "lora", 8, batch=4, seq=512, memory=m, reduced_depth=True).peak_bytes
             for m in MEMORY_SETTINGS]
    assert peaks[0] > peaks[1] > peaks[2]


def test_search_has_a_row_per_setting():
    rows = plan.search(MICRO, 1 << 30, methods=["lora"], ranks=[8], quants=["none"], batches=[1], seqs=[64],
                       grad_checkpointing=[False], memories=MEMORY_SETTINGS)
    assert sorted(r.point.memory for r in rows) == sorted(MEMORY_SETTINGS)
    assert all(r.to_dict()["memory"] == r.point.memory for r in rows)
    with pytest.raises(ConfigError, match="unknown memory setting 'tight'"):
        plan.search(MICRO, 1 << 30, methods=["lora"], memories=["tight"])
    with pytest.raises(ConfigError, match="a diffusion model takes 'fast' or 'balanced'"):
        plan.search("tiny-unet", 1 << 30, methods=["lora"], memories=["max-fit"])


def test_cli_plan_reports_each_setting(capsys):
    code = main(["plan", "--model", "tiny-llama", "--gpu-mem", "1GB", "--methods", "lora", "--quant", "none",
                 "--batch", "1", "--seq", "16", "--grad-ckpt", "off", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and {r["memory"] for r in data["rows"]} == set(MEMORY_SETTINGS)
    assert main(["plan", "--model", "tiny-llama", "--method", "lora", "--memory", "max-fit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"] == "max-fit"
    assert main(["plan", "--model", "tiny-llama", "--gpu-mem", "1GB", "--memory", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown memory setting 'huge'" in err and "Traceback" not in err


def test_diffusion_balanced_is_predicted_below_fast():
    """The estimator simulates the feed-forward recompute of ``memory="balanced"`` on a UNet: a lower peak, more
    FLOPs (the projections again)."""

    fast, balanced = (estimate_memory("tiny-unet", "lora", 4, batch=2, memory=m) for m in ("fast", "balanced"))
    assert balanced.peak_bytes < fast.peak_bytes and balanced.flops > fast.flops
