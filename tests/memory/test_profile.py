"""slimtune.memory.profile on the tiny-llama preset, on the CPU (accounted memory)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.memory import accounting
from slimtune.memory.profile import (CPU_MEMORY, ProfileOptions, ProfileResult, TrainingSession, median_step_time,
                                     profile_options, profile_training)
from slimtune.memory.setting import MEMORY_SETTINGS
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


def test_train_step_trains_the_adapter_and_clears_gradients() -> None:
    session = TrainingSession.prepare(ProfileOptions(rank=4, **SMALL))
    before = [p.detach().clone() for p in session.trainable]
    loss = session.train_step()
    assert torch.isfinite(loss) and not loss.requires_grad
    assert any(not torch.equal(b, p) for b, p in zip(before, session.trainable))  # B starts at zero, A moves
    assert all(p.grad is None for p in session.trainable)


def test_median_step_time_skips_warmup() -> None:
    assert median_step_time([9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]) == 3.0  # steps 4-8
    assert median_step_time([9.0, 1.0, 2.0]) == 1.5  # fewer than 4 steps: all but the first
    assert median_step_time([2.0]) == 2.0
    assert median_step_time([]) is None


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "rank"), ("batch", -1, "batch"), ("seq", 0, "seq"), ("steps", 0, "steps"),
    ("method", "qlora-xl", "unknown method"), ("backend", "hf", "unknown backend"), ("dtype", "int8", "dtype"),
    ("device", "tpu", "device"), ("memory", "max", "unknown memory setting 'max'"),
])
def test_bad_options_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProfileOptions(**{**SMALL, field: value}).resolved()


def test_compile_applies_to_language_models() -> None:
    with pytest.raises(ConfigError, match="compile applies to language models"):
        ProfileOptions(preset="tiny-unet", compile=True).resolved()


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(PresetError, match="tiny-llama.*llama-3.2-3b"):
        ProfileOptions(preset="llama-9").resolved()


@pytest.mark.parametrize("extra", [{}, {"quant": "nf4"}, {"memory": "max-fit", "grad_checkpointing": False,
                                                          "backend": "slimtune", "plain_layers": 2},
                                   {"compile": True}])
def test_options_round_trip_through_argv(extra: dict) -> None:
    options = ProfileOptions(**{"rank": 8, "alpha": 16, "grad_checkpointing": True, "backend": "peft-bf16", **SMALL,
                                **extra}).resolved()
    import argparse

    from slimtune.cli import add_profile_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    assert options_from_args(parser.parse_args(options.to_argv())).resolved() == options


def test_runner_prints_exactly_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["profile-child", "--rank", "2", "--batch", "1", "--seq", "8", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["status"] == "ok" and data["rank"] == 2 and data["memory_kind"] == CPU_MEMORY


def test_runner_reports_bad_options_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile-child", "--preset", "nope", "--device", "cpu"]) == 2
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


# -- the breakdown (issue 7) --------------------------------------------------------------------------
def test_breakdown_parts_add_up(lora_result: ProfileResult) -> None:
    r, parts = lora_result, lora_result.breakdown
    assert set(parts) == {"base_weights", "adapter_weights", "gradients", "optimizer_state", "activations",
                          "temporary"}
    assert parts["temporary"] is None  # no allocator peak on the CPU
    assert parts["base_weights"] + parts["adapter_weights"] == r.mem_created_bytes
    assert parts["adapter_weights"] == parts["gradients"] == 4 * r.params_trainable
    assert parts["activations"] == r.cpu_breakdown["saved_activations"] == sum(r.activations_by_module.values())
    assert {"linear", "attention", "norm", "activation", "loss"} <= set(r.activations_by_module)
    assert r.peak_first_step_bytes == r.peak_bytes  # the accounted sum is the same every step
    assert r.mem_after_step_bytes == r.mem_created_bytes + parts["optimizer_state"]
    assert r.quant == "none" and r.model_dir is None and r.device_memory_bytes > 0 and r.setup_time_s > 0


def test_module_kinds() -> None:
    from torch import nn

    kinds = {type(m).__name__: accounting.module_kind(m) for m in (
        nn.Linear(2, 2), nn.Conv2d(2, 2, 1), nn.LayerNorm(2), nn.GroupNorm(1, 2), nn.SiLU(), nn.Embedding(3, 2),
        nn.Sequential())}
    assert kinds == {"Linear": "linear", "Conv2d": "conv", "LayerNorm": "norm", "GroupNorm": "norm",
                     "SiLU": "activation", "Embedding": "embedding", "Sequential": "other"}
    assert set(kinds.values()) <= set(accounting.ACTIVATION_KINDS)


def test_meter_attributes_saves_to_the_innermost_module() -> None:
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x):
            return torch.sigmoid(self.norm(self.fc(x)))  # the sigmoid is the block's own code: "other"

    model = nn.Sequential(Block(), nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    meter = accounting.SavedTensorMeter(exclude=[*model.parameters()], model=model)
    with meter.record():
        y = model(x)
        loss = (y * y).sum()  # outside every module: "loss"
    assert set(meter.by_kind) == {"linear", "norm", "other", "loss"}
    assert sum(meter.by_kind.values()) == meter.bytes
    loss.backward()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_checkpointed_inputs_have_their_own_kind() -> None:
    r = profile_training(rank=4, grad_checkpointing=True, **SMALL)
    assert r.ok and r.activations_by_module["checkpoint"] > 0
    assert r.breakdown["activations"] < profile_training(rank=4, **SMALL).breakdown["activations"]


@pytest.mark.skipif(not hasattr(__import__("slimtune"), "quantize"), reason="slimtune.quantize not available yet")
def test_nf4_base_weights_are_smaller(lora_result: ProfileResult) -> None:
    r = profile_training(rank=4, quant="nf4", **SMALL)
    assert r.ok and r.quant == "nf4"
    assert r.breakdown["adapter_weights"] == lora_result.breakdown["adapter_weights"]
    assert r.breakdown["base_weights"] < 0.6 * lora_result.breakdown["base_weights"]


def test_peft_qlora_uses_bitsandbytes_linear4bit() -> None:
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    from slimtune.memory.profile import bnb_quantize_linears
    from slimtune.models import build_model

    model = build_model("tiny-llama", "cpu", "bfloat16")
    dense = accounting.module_state_bytes(model)
    count = bnb_quantize_linears(model, torch.bfloat16, skip=[model.lm_head])
    assert count == 4 * 7 and type(model.lm_head) is torch.nn.Linear
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.bnb_quantized
    assert layer.weight.quant_type == "nf4" and layer.weight.compress_statistics
    assert accounting.module_state_bytes(model) < 0.6 * dense  # quant states counted, still far smaller
    r = profile_training(rank=4, backend="peft", quant="nf4", dtype="bfloat16", **SMALL)
    assert r.ok and r.quant == "nf4" and r.peft_version and math.isfinite(r.final_loss)


def test_nf4_needs_an_adapter() -> None:
    with pytest.raises(ConfigError, match="4-bit weights cannot be trained"):
        ProfileOptions(method="none", quant="nf4", **SMALL).resolved()
    with pytest.raises(ConfigError, match="unknown quant"):
        ProfileOptions(quant="int3", **SMALL).resolved()


def _tiny_llama_dir(tmp_path, weights: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    if weights:
        torch.manual_seed(7)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    else:
        config.save_pretrained(tmp_path)
    return tmp_path


def test_model_directory_without_weights(tmp_path) -> None:
    path = _tiny_llama_dir(tmp_path, weights=False)
    r = profile_training(model_dir=str(path), method="lora", rank=2, preset="ignored-when-model-dir",
                         **{k: v for k, v in SMALL.items() if k != "preset"})
    assert r.ok and r.model_dir == str(path) and r.preset == str(path)
    assert 0 < r.params_trainable < r.params_total  # all-linear: the seven projections of both layers
    assert r.breakdown["adapter_weights"] == 4 * r.params_trainable


def test_model_directory_weights_are_loaded(tmp_path) -> None:
    from slimtune.memory.profile import build_from_dir

    path = _tiny_llama_dir(tmp_path, weights=True)
    saved = __import__("transformers").LlamaForCausalLM.from_pretrained(path).state_dict()
    model = build_from_dir(str(path), "cpu", "float32", seed=0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_bad_model_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ProfileOptions(model_dir=str(tmp_path / "nope"), **SMALL).resolved()
    with pytest.raises(ConfigError, match="no config.json"):
        ProfileOptions(model_dir=str(tmp_path), **SMALL).resolved()


def test_diffusion_preset_adapts_the_unet() -> None:
    pytest.importorskip("diffusers")
    lora = profile_training(preset="tiny-unet", method="lora", rank=4, batch=1, steps=1, device="cpu")
    locon = profile_training(preset="tiny-unet", method="locon", rank=4, batch=1, steps=1, device="cpu")
    assert lora.ok and locon.ok and 0 < lora.params_trainable < locon.params_trainable  # LoCon adds the convs
    assert lora.activations_by_module["conv"] > 0 and lora.activations_by_module["attention"] > 0
    assert lora.breakdown["base_weights"] + lora.breakdown["adapter_weights"] == lora.mem_created_bytes


def test_memory_settings_give_the_same_losses_with_fewer_activations() -> None:
    """``balanced`` (chunked loss, per-layer checkpointing) and ``max-fit`` (and offload: nothing to move on the
    CPU) train the same steps as ``fast`` and keep fewer activations for backward."""
    results = {m: profile_options(ProfileOptions(**{**SMALL, "steps": 2, "memory": m})) for m in MEMORY_SETTINGS}
    fast = results["fast"]
    for memory in ("balanced", "max-fit"):
        got = results[memory]
        assert got.ok and got.losses == pytest.approx(fast.losses, rel=1e-5)
        assert got.breakdown["activations"] < fast.breakdown["activations"] / 4
        assert got.breakdown["gradients"] == fast.breakdown["gradients"]


@pytest.mark.parametrize("extra, message", [
    ({"backend": "peft"}, "use it with the slimtune backend"), ({"grad_checkpointing": True}, "without grad_che"),
    ({"preset": "tiny-unet", "memory": "max-fit"}, "a diffusion model takes 'fast' or 'balanced'"),
    ({"preset": "tiny-unet", "plain_layers": 1}, "plain_layers=1 applies to a language model's layer stack"),
])
def test_memory_setting_conflicts_are_named(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProfileOptions(**{**SMALL, "memory": "balanced", **extra}).resolved()
