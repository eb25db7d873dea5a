"""slimtune.memory.profile on the tiny-llama preset, on the CPU (accounted memory)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.memory import accounting
from slimtune.memory.profile import (CPU_MEMORY, ProfileOptions, ProfileResult, TrainingSession, main,
                                     median_step_time, profile_training)
from slimtune.models import PRESETS, PresetError

SMALL = dict(preset="tiny-llama", batch=1, seq=16, steps=2, device="cpu")


@pytest.fixture(scope="module")
def lora_result() -> ProfileResult:
    return profile_training(rank=4, **SMALL)


def test_lora_profile_is_sane(lora_result: ProfileResult) -> None:
    r = lora_result
    assert r.status == "ok" and r.error is None
    assert r.backend == "slimtune" and r.method == "lora" and r.rank == 4 and r.alpha == 4
    assert r.memory_kind == CPU_MEMORY and r.dtype == "float32" and r.device == "cpu"
    assert 0 < r.params_trainable < r.params_total
    assert r.params_total > PRESETS["tiny-llama"].num_parameters()  # the adapters are counted too
    assert r.peak_bytes >= r.mem_created_bytes > 0
    assert r.step_time_s > 0 and len(r.step_times_s) == 2
    assert math.isfinite(r.final_loss)
    parts = r.cpu_breakdown
    assert parts["params_buffers"] == r.mem_created_bytes
    assert parts["gradients"] == 4 * r.params_trainable  # float32 grads of the adapters only
    assert parts["optimizer_state"] >= 2 * parts["gradients"]  # AdamW's two moments
    assert parts["saved_activations"] > 0
    assert sum(parts.values()) == r.peak_bytes


def test_full_finetune_trains_everything() -> None:
    r = profile_training(method="none", **SMALL)
    assert r.ok and r.rank is None
    assert r.params_trainable == r.params_total == PRESETS["tiny-llama"].num_parameters()
    assert r.cpu_breakdown["gradients"] == 4 * r.params_total
    assert r.peak_bytes >= 4 * r.mem_created_bytes  # weights + grads + two Adam moments


def test_peft_backend_adapts_the_same_parameters(lora_result: ProfileResult) -> None:
    pytest.importorskip("peft")
    r = profile_training(rank=4, backend="peft", **SMALL)
    assert r.ok and r.peft_version
    assert (r.params_total, r.params_trainable) == (lora_result.params_total, lora_result.params_trainable)


def test_out_of_memory_becomes_a_status(monkeypatch: pytest.MonkeyPatch) -> None:
    session = TrainingSession.prepare(ProfileOptions(rank=4, **SMALL))

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(session.model, "forward", oom)
    r = session.run()
    assert r.status == "OOM" and "out of memory" in r.error
    assert r.step_time_s is None and r.step_times_s == []


def test_median_step_time_skips_warmup() -> None:
    assert median_step_time([9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]) == 3.0  # steps 4-8
    assert median_step_time([9.0, 1.0, 2.0]) == 1.5  # fewer than 4 steps: all but the first
    assert median_step_time([2.0]) == 2.0
    assert median_step_time([]) is None


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "rank"), ("batch", -1, "batch"), ("seq", 0, "seq"), ("steps", 0, "steps"),
    ("method", "qlora-xl", "unknown method"), ("backend", "hf", "unknown backend"), ("dtype", "int8", "dtype"),
    ("device", "tpu", "device"),
])
def test_bad_options_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProfileOptions(**{**SMALL, field: value}).resolved()


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(PresetError, match="tiny-llama.*llama-3.2-3b"):
        ProfileOptions(preset="llama-9").resolved()


def test_options_round_trip_through_argv() -> None:
    options = ProfileOptions(rank=8, alpha=16, grad_checkpointing=True, backend="peft-bf16", **SMALL).resolved()
    import argparse

    from slimtune.memory.profile import add_profile_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    assert options_from_args(parser.parse_args(options.to_argv())).resolved() == options


def test_runner_prints_exactly_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--json", "--rank", "2", "--batch", "1", "--seq", "8", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["status"] == "ok" and data["rank"] == 2 and data["memory_kind"] == CPU_MEMORY


def test_runner_reports_bad_options_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--preset", "nope", "--device", "cpu"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "error" and "unknown preset" in data["error"]


def test_saved_tensor_meter_counts_unique_storages() -> None:
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    meter = accounting.SavedTensorMeter(exclude=[w])
    with meter.record():
        y = x @ w  # saves x and w (w excluded)
        z = (x * 2.0) * x  # saves x again (same storage) and x * 2
    assert meter.bytes == 2 * x.numel() * 4
    (y.sum() + z.sum()).backward()


def test_state_byte_counters() -> None:
    model = torch.nn.Linear(16, 8)
    assert accounting.module_state_bytes(model) == (16 * 8 + 8) * 4
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    assert accounting.gradient_bytes(model.parameters()) == (16 * 8 + 8) * 4
    opt.step()
    assert accounting.optimizer_state_bytes(opt) >= 2 * (16 * 8 + 8) * 4
