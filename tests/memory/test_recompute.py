"""Per-layer checkpointing and CPU offload (the ``memory`` switch): the same loss and gradients as a plain step
for every adapter method, and the switch's checks."""
from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.core import lean_layers
from slimtune.errors import ConfigError
from slimtune.memory.accounting import SavedTensorMeter
from slimtune.memory.chunked_loss import model_causal_lm_loss
from slimtune.memory.offload import CpuOffload
from slimtune.memory.options import ProfileOptions
from slimtune.memory.recompute import checkpoint_layers, feed_forward_projections, installed
from slimtune.memory.setting import MEMORY_SETTINGS, apply_memory_setting, memory_setting
from slimtune.models import workload
from slimtune.models.diffusion import DIFFUSION_PRESETS
from slimtune.models.layers import layer_stack

from ..helpers import FP32_TOL, perturb_adapters, rel_err
from ..toy_models import tiny_llama

CONFIGS = {
    "lora": lambda: slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "dora": lambda: slimtune.LoraConfig(r=4, use_dora=True, target_modules="all-linear"),
    "hra": lambda: slimtune.HraConfig(r=4, target_modules="all-linear"),
    "loha": lambda: slimtune.LohaConfig(r=4, alpha=4, target_modules="all-linear"),
    "lokr": lambda: slimtune.LokrConfig(r=4, alpha=4, target_modules="all-linear"),
}


def _adapted(method: str) -> torch.nn.Module:
    model = tiny_llama().train()
    if method.startswith("nf4-"):
        slimtune.quantize(model, "nf4", compute_dtype=torch.float32)
    slimtune.adapt(model, CONFIGS[method.removeprefix("nf4-")]())
    perturb_adapters(model)
    return model


def _step(model: torch.nn.Module, ids: torch.Tensor, chunked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if chunked:
        loss = model_causal_lm_loss(model, ids, ids, reduction="mean")
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in slimtune.trainable_parameters(model)]


@pytest.mark.parametrize("method", [*CONFIGS, "nf4-dora"])
def test_every_setting_gives_the_plain_gradients(method):
    model = _adapted(method)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _step(model, ids, chunked=False)
    assert all(g.abs().sum() > 0 for g in ref_grads)
    for memory in ("balanced", "max-fit"):
        handle = apply_memory_setting(model, memory)
        assert installed(model) and handle.layers == list(model.model.layers)
        loss, grads = _step(model, ids, chunked=memory_setting(memory).chunked_loss)
        handle.remove()
        assert not installed(model)
        assert rel_err(loss, ref_loss) < FP32_TOL
        assert all(rel_err(g, r) < FP32_TOL for g, r in zip(grads, ref_grads)), memory


@pytest.mark.parametrize("memory", ["balanced", "max-fit"])
def test_plain_layers_are_the_last_ones_and_keep_the_gradients(memory):
    model = _adapted("dora")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _step(model, ids, chunked=False)
    layers = list(model.model.layers)
    handle = apply_memory_setting(model, memory, plain_layers=1)
    assert handle.layers == layers[:-1]
    calls = []
    layers[-1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = _step(model, ids, chunked=True)
    assert len(calls) == 1  # the plain last layer runs once: no recompute
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert all(rel_err(g, r) < FP32_TOL for g, r in zip(grads, ref_grads))
    handle.remove()
    assert apply_memory_setting(model, memory, plain_layers=len(layers)).layers == []


@pytest.mark.parametrize("plain, match", [(-1, "non-negative integer"), (1.5, "non-negative integer"),
                                          (True, "non-negative integer"), (3, "has 2 layers")])
def test_bad_plain_layers(plain, match):
    with pytest.raises(ConfigError, match=match):
        apply_memory_setting(tiny_llama(), "balanced", plain_layers=plain)


def test_plain_layers_need_a_checkpointing_setting():
    with pytest.raises(ConfigError, match="needs memory='balanced' or 'max-fit'"):
        apply_memory_setting(tiny_llama(), "fast", plain_layers=2)
    with pytest.raises(ConfigError, match="needs memory='balanced' or 'max-fit'"):
        ProfileOptions(preset="tiny-llama", memory="fast", plain_layers=2).resolved()


def test_checkpointing_recomputes_the_layers_in_backward():
    model = _adapted("lora")
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    handle = checkpoint_layers(model)
    ids = torch.randint(0, 128, (1, 8))
    _step(model, ids, chunked=True)
    assert len(calls) == 2  # forward, and again in backward
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 3  # no recompute without gradients
    handle.remove()


def test_the_layer_stack_and_double_checkpointing():
    model = tiny_llama()
    assert layer_stack(model) is model.model.layers
    handle = checkpoint_layers(model)
    with pytest.raises(ConfigError, match="already checkpoints"):
        checkpoint_layers(model)
    handle.remove()
    workload.enable_gradient_checkpointing("tiny-llama", model, adapted=False)  # transformers' own, any version
    with pytest.raises(ConfigError, match="already checkpoints"):
        apply_memory_setting(model, "balanced")
    with pytest.raises(ConfigError, match="no stack of layers"):
        layer_stack(torch.nn.Linear(2, 2))


def test_offload_keeps_cpu_tensors_in_place():
    hooks = CpuOffload(min_bytes=0)
    x = torch.randn(4, 4, requires_grad=True)
    assert not hooks.moves(x) and hooks.pack(x) is x and hooks.unpack(x) is x
    with hooks:
        y = (x * x).sum()
    y.backward()
    assert rel_err(x.grad, 2 * x.detach()) < FP32_TOL and hooks.offloaded_bytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_moves_cuda_tensors():
    hooks = CpuOffload(min_bytes=0)
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    with hooks:
        y = (x.sin() * x).sum()
    y.backward()
    ref = x.detach().cos() * x.detach() + x.detach().sin()
    assert hooks.offloaded_bytes > 0 and rel_err(x.grad, ref) < FP32_TOL


def test_the_switch():
    assert MEMORY_SETTINGS == ("fast", "balanced", "max-fit")
    assert memory_setting("fast") == memory_setting("fast") and not memory_setting("fast").checkpoint
    assert memory_setting("balanced").chunked_loss and not memory_setting("balanced").offload
    assert memory_setting("max-fit").offload and memory_setting("max-fit").checkpoint
    model = tiny_llama()
    assert apply_memory_setting(model, "fast") is None and not installed(model)
    with pytest.raises(ConfigError, match="unknown memory setting 'tiny'; choose from fast, balanced, max-fit"):
        memory_setting("tiny")
    assert slimtune.apply_memory_setting is apply_memory_setting


def denoiser_step(model: torch.nn.Module, batch: dict, target: torch.Tensor
                  ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """One MSE step of a diffusers denoiser: the loss, the trainable parameters' gradients, and the bytes saved for
    backward (parameters excluded)."""
    model.zero_grad(set_to_none=True)
    meter = SavedTensorMeter(exclude=model.parameters())
    with meter.record():
        loss = (model(**batch, return_dict=False)[0] - target).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in slimtune.trainable_parameters(model)], meter.bytes


def test_diffusion_balanced_recomputes_the_feed_forward_projections():
    """``memory="balanced"`` on a diffusers UNet (tiny-unet, LoRA on the attention): the feed-forward input
    projections (GEGLU) are checkpointed — the same loss and gradients bit for bit, fewer bytes saved — and
    ``remove`` gives the plain step back; diffusers' own checkpointing and max-fit are refused."""
    diffusers = pytest.importorskip("diffusers")

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**DIFFUSION_PRESETS["tiny-unet"].config)
    slimtune.adapt(unet, slimtune.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    perturb_adapters(unet)
    batch = workload.make_inputs("tiny-unet", None, 2, 0, "cpu", torch.float32, torch.Generator().manual_seed(1))
    target = batch.pop("target")
    assert {type(m).__name__ for m in feed_forward_projections(unet)} == {"GEGLU"}
    assert feed_forward_projections(tiny_llama()) == []

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        return denoiser_step(unet, batch, target)

    step()  # the first step learns which LoRA layers read one input (core.siblings); the next ones fuse them
    plain = step()
    handle = apply_memory_setting(unet, "balanced")
    assert installed(unet)
    recomputed = step()
    assert torch.equal(plain[0], recomputed[0]) and all(torch.equal(a, b) for a, b in zip(plain[1], recomputed[1]))
    assert recomputed[2] < 0.8 * plain[2]
    with pytest.raises(ConfigError, match="already checkpoints"):
        apply_memory_setting(unet, "balanced")
    handle.remove()
    assert not installed(unet) and step()[2] == plain[2]
    # the GEGLUs run their lean forward again (core.lean_layers), which a checkpointed call bypassed
    assert all(lean_layers.installed(m) for m in feed_forward_projections(unet))
    with pytest.raises(ConfigError, match="a diffusion model takes 'fast' or 'balanced'"):
        apply_memory_setting(unet, "max-fit")
    unet.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="already checkpoints"):
        apply_memory_setting(unet, "balanced")


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v"], ["to_q", "to_k", "to_v", "proj_mlp", "proj_out"]])
def test_dit_balanced_recomputes_the_single_blocks_mlp(targets, monkeypatch):
    """``memory="balanced"`` on a Flux-style DiT (tiny-dit-4b: three single-stream blocks): each single block's
    ``proj_mlp`` + ``act_mlp`` pair runs as one checkpointed call (with ``proj_mlp`` adapted too) — the same loss and
    gradients bit for bit, and each block's GELU input ``[tokens, 4·dim]`` no longer kept; ``remove`` restores
    both modules."""
    pytest.importorskip("diffusers")
    from slimtune.memory import recompute
    from slimtune.models.diffusion import build_parts

    torch.manual_seed(0)
    dit = build_parts(DIFFUSION_PRESETS["tiny-dit-4b"], text_encoders=False).denoiser.float()
    slimtune.adapt(dit, slimtune.LoraConfig(r=4, target_modules=targets))
    perturb_adapters(dit)
    batch = workload.make_inputs("tiny-dit-4b", None, 2, 0, "cpu", torch.float32, torch.Generator().manual_seed(1))
    target = batch.pop("target")
    pairs = recompute.split_mlps(dit)
    assert len(pairs) == 3 and recompute.split_mlps(tiny_llama()) == []

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        return denoiser_step(dit, batch, target)

    step()  # the first step learns which LoRA layers read one input (core.siblings); the next ones fuse them
    plain = step()
    with monkeypatch.context() as patch:  # the feed-forward modules alone, as before the single blocks were added
        patch.setattr(recompute, "split_mlps", lambda model: [])
        handle = apply_memory_setting(dit, "balanced")
        feed_forwards_only = step()
        handle.remove()
    handle = apply_memory_setting(dit, "balanced")
    both = step()
    for run in (feed_forwards_only, both):
        assert torch.equal(plain[0], run[0]) and all(torch.equal(a, b) for a, b in zip(plain[1], run[1]))
    proj = pairs[0][0]
    width = (proj.base_layer if hasattr(proj, "base_layer") else proj).out_features
    tokens = batch["hidden_states"].shape[1] + batch["encoder_hidden_states"].shape[1]
    gelu_inputs = 3 * 2 * tokens * width * 4  # three blocks, batch 2, float32
    assert feed_forwards_only[2] - both[2] >= gelu_inputs
    handle.remove()
    assert not installed(dit) and step()[2] == plain[2]
    assert all("forward" not in m.__dict__ for pair in pairs for m in pair)
