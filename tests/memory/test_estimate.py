"""The estimator against what a real CPU training step holds (tiny models, float32 unless said otherwise)."""
from __future__ import annotations

import pytest
import torch

from slimtune.core.inject import adapt
from slimtune.errors import ConfigError
from slimtune.memory import estimate as E
from slimtune.memory.accounting import SavedTensorMeter, gradient_bytes, module_state_bytes, optimizer_state_bytes
from slimtune.memory.plan import plain_layers_that_fit
from slimtune.models import ModelPreset, workload

BATCH, SEQ = 1, 16
#: tiny-llama's shape with one layer: the same code paths, a quarter of the simulated operations.
MICRO = ModelPreset("micro-llama", "1-layer tiny Llama for tests", hidden_size=64, intermediate_size=160,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                    tie_word_embeddings=False, max_position_embeddings=64)


def measure(preset: str | ModelPreset, method: str, rank: int = 4, quant: str = "none",
            dtype: torch.dtype = torch.float32, resolution: int | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """One real training step on the CPU: the profile's accounted parts and the activations by module kind."""
    model = workload.build_model(preset, "cpu", dtype, seed=0)
    part = getattr(model, "denoiser", model)
    if quant == "nf4":
        import slimtune

        slimtune.quantize(part, "nf4", compute_dtype=dtype)
    if method != "none":
        adapt(part, workload.make_adapter_config(method, rank, None, workload.default_targets(preset, method)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = workload.make_inputs(preset, model, BATCH, SEQ, "cpu", dtype, torch.Generator().manual_seed(0),
                                  resolution=resolution)
    meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()], model=model)
    with meter.record():
        loss = workload.training_loss(preset, model, inputs)
    loss.backward()
    grads = gradient_bytes(trainable)
    optimizer.step()
    parts = dict(params_buffers=module_state_bytes(model), gradients=grads,
                 optimizer_state=optimizer_state_bytes(optimizer), saved_activations=meter.bytes)
    return parts, dict(meter.by_kind)


CASES = [(MICRO, "lora"), (MICRO, "none"), (MICRO, "dora"), (MICRO, "hra"), (MICRO, "loha"), (MICRO, "lokr"),
         ("tiny-llama", "lora"), ("tiny-unet", "lora"), ("tiny-unet", "loha")]


@pytest.mark.parametrize("preset, method", CASES, ids=lambda v: getattr(v, "name", v))
def test_breakdown_matches_a_measured_step(preset: str | ModelPreset, method: str) -> None:
    unet = preset == "tiny-unet"
    if unet:
        pytest.importorskip("diffusers")
    resolution = 8 if unet else None
    measured, kinds = measure(preset, method, resolution=resolution)
    est = E.estimate_memory(preset, method, 4, batch=BATCH, seq=SEQ, resolution=resolution, dtype="float32",
                            device="cpu")
    predicted = est.cpu_breakdown()
    for key in ("params_buffers", "gradients", "optimizer_state"):  # exact, byte for byte
        assert predicted[key] == measured[key], key
    assert abs(predicted["saved_activations"] / measured["saved_activations"] - 1) <= 0.15
    assert sum(est.activations_by_module.values()) == predicted["saved_activations"]
    assert set(est.activations_by_module) == set(kinds)
    assert est.peak_bytes == sum(predicted.values())  # the CPU's accounted peak
    assert est.mem_created_bytes == measured["params_buffers"]


def test_nf4_base_weights_are_exact() -> None:
    measured, _ = measure(MICRO, "lora", quant="nf4", dtype=torch.bfloat16)
    est = E.estimate_memory(MICRO, "lora", 4, batch=BATCH, seq=SEQ, quant="nf4", dtype="bfloat16", device="cpu")
    predicted = est.cpu_breakdown()
    for key in ("params_buffers", "gradients", "optimizer_state"):
        assert predicted[key] == measured[key], key
    assert abs(predicted["saved_activations"] / measured["saved_activations"] - 1) <= 0.15
    dense = E.estimate_memory(MICRO, "lora", 4, batch=BATCH, seq=SEQ, dtype="bfloat16", device="cpu")
    linear = 4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 160  # the layer's Linear weights (q, o; k, v at 2 of 4 heads; MLP)
    assert dense.breakdown["base_weights"] - est.breakdown["base_weights"] > 0.7 * 2 * linear  # ~4.1 of 16 bits


def test_one_simulated_step_predicts_the_later_steps() -> None:
    for release in (False, True):
        model, spec = E.build_meta_model(MICRO, "lora", 4, dtype=torch.bfloat16)
        one = E._simulate(model, spec, "lora", 2, 32, None, torch.bfloat16, release, "cuda", steps=1)
        two = E._simulate(model, spec, "lora", 2, 32, None, torch.bfloat16, release, "cuda", steps=2)
        assert one.peak_live == two.peak_live and one.phase_peaks == two.phase_peaks


def test_reduced_depth_extrapolates_exactly() -> None:
    kwargs = dict(batch=2, seq=32, dtype="bfloat16", grad_checkpointing=False)
    full = E.estimate_memory("tiny-llama", "loha", 4, **kwargs)
    reduced = E.estimate_memory("tiny-llama", "loha", 4, reduced_depth=True, **kwargs)
    assert reduced.breakdown == full.breakdown and reduced.peak_bytes == full.peak_bytes
    assert reduced.params_total == full.params_total and reduced.flops == pytest.approx(full.flops)


def test_cuda_prediction_adds_the_transients_and_retained_outputs() -> None:
    kept = E.estimate_memory(MICRO, "lora", 4, batch=2, seq=32, dtype="bfloat16")
    released = E.estimate_memory(MICRO, "lora", 4, batch=2, seq=32, dtype="bfloat16", release_outputs=True)
    assert kept.peak_bytes == sum(kept.breakdown.values()) and kept.breakdown["temporary"] > 0
    logits = 2 * 32 * 256 * 2  # the previous step's bf16 logits, alive through the next forward
    assert kept.peak_bytes - released.peak_bytes == pytest.approx(logits, rel=0.05)
    checkpointed = E.estimate_memory(MICRO, "lora", 4, batch=2, seq=32, dtype="bfloat16", grad_checkpointing=True)
    assert checkpointed.peak_bytes < kept.peak_bytes and checkpointed.flops > kept.flops


def test_adapter_bytes_counts_without_adapting() -> None:
    base, _ = E.build_meta_model(MICRO, "none", dtype=torch.float32)
    for method in ("lora", "lokr"):
        est = E.estimate_memory(MICRO, method, 8, batch=1, seq=8, dtype="float32")
        assert E.adapter_bytes(base, MICRO, method, 8) == (est.breakdown["adapter_weights"], est.params_trainable)
    assert not any(p.requires_grad is False for p in base.parameters())  # base left unadapted


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="qlora"), "unknown method"), (dict(batch=0), "batch"), (dict(quant="int8"), "quant"),
    (dict(method="none", quant="nf4"), "4-bit"), (dict(device="tpu"), "device"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        E.estimate_memory(MICRO, **{"seq": 8, **kwargs})


def test_the_simulation_patches_nothing_in_torch():
    """The simulated step runs under a torch function mode and context variables scoped to the estimator's call:
    torch's own functions are the same objects during and after it, and attention outside the block runs torch's
    own kernel."""
    import torch.nn.functional as F
    from torch.nn.modules.module import register_module_forward_pre_hook

    originals = (F.scaled_dot_product_attention, torch.is_autocast_enabled, torch.nn.functional.linear)
    during = []
    handle = register_module_forward_pre_hook(
        lambda module, args: during.append((F.scaled_dot_product_attention, torch.is_autocast_enabled,
                                            torch.nn.functional.linear)))
    try:
        E.estimate_memory(MICRO, "lora", 4, batch=BATCH, seq=SEQ, dtype="float32", device="cpu")
    finally:
        handle.remove()
    assert during and all(seen == originals for seen in during)
    assert (F.scaled_dot_product_attention, torch.is_autocast_enabled, torch.nn.functional.linear) == originals
    q = torch.randn(1, 2, 4, 8)
    out = F.scaled_dot_product_attention(q, q, q)  # a real computation, not the simulation's stand-in
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    from slimtune.core import simulation

    simulation.count(dequant_bytes=1.0)  # outside a simulation: counted nowhere, no error


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_checkpointed_diffusion_steps_recompute_in_the_same_simulation(preset: str) -> None:
    """Recomputation runs where autograd runs it (on the meta device, another thread): it must take the forward's
    attention path (else torch.utils.checkpoint refuses the different tensors) and count into the same step."""
    plain, checkpointed = (E.simulate_points(preset, [(2, 0, None)], "lora", 4, grad_checkpointing=gc)[0]
                           for gc in (False, True))
    assert checkpointed.peak_live < plain.peak_live
    assert checkpointed.attention_flops > plain.attention_flops  # the recomputed forward's attention is counted


#: tiny-llama's width at six layers: deep enough to extrapolate from two and three layers with plain layers.
SIX = ModelPreset("six-llama", "6-layer tiny Llama for tests", hidden_size=64, intermediate_size=160,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  tie_word_embeddings=False, max_position_embeddings=64)


@pytest.mark.parametrize("memory, plain", [("balanced", 0), ("balanced", 2), ("max-fit", 1)])
def test_reduced_depth_extrapolates_the_memory_settings_exactly(memory: str, plain: int) -> None:
    kwargs = dict(batch=2, seq=32, dtype="bfloat16", memory=memory, plain_layers=plain)
    full = E.estimate_memory(SIX, "lora", 4, **kwargs)
    reduced = E.estimate_memory(SIX, "lora", 4, reduced_depth=True, **kwargs)
    assert reduced.peak_bytes == full.peak_bytes and reduced.breakdown == full.breakdown


def test_plain_layers_trade_memory_for_recompute() -> None:
    kwargs = dict(batch=2, seq=32, dtype="bfloat16", memory="balanced")
    peaks = [E.estimate_memory(SIX, "lora", 4, plain_layers=n, **kwargs).peak_bytes for n in (0, 2, 4)]
    assert peaks[0] < peaks[1] < peaks[2]


@pytest.mark.parametrize("memory", ["fast", "balanced"])
def test_unpadded_attention_takes_the_flash_path(memory: str) -> None:
    """The simulated inputs have no padding and no packed sequences, as on the GPU: transformers' mask checks
    (``.all()`` over the position ids' breaks; reached with ``use_cache=False``, as the chunked loss runs) must
    read "regular", so that attention is the unmasked flash kernel's (its FLOPs are counted) and no ``[S, S]``
    mask or score matrix is modelled."""
    sim = E.simulate_points(MICRO, [(2, 32, None)], "lora", 4, dtype="bfloat16", memory=memory)[0]
    assert sim.attention_flops > 0


def test_data_dependent_branches_take_the_regular_way() -> None:
    with E.meta_environment(), E._Allocator():
        flags = torch.zeros(4, dtype=torch.bool, device="meta")
        assert bool(flags.all()) is True and bool(flags.any()) is False
        assert int(torch.zeros(3, dtype=torch.long, device="meta").sum()) == 0


@pytest.mark.parametrize("cuda", [True, False])
def test_rms_norm_keeps_what_the_device_keeps(cuda: bool) -> None:
    """Mirroring CUDA, ``F.rms_norm`` saves what the fused kernel saves (the input and a float32 rstd per row;
    measured on an H200: a DiT's q/k norms, RESULTS.md run 43); otherwise PyTorch's decomposition as it runs."""
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []
    x = torch.empty(4, 8, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    weight = torch.empty(64, dtype=torch.bfloat16, device="meta")
    with E.meta_environment(cuda=cuda), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        y = torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    if cuda and E.FUSED_RMS_NORM_ON_CUDA:
        assert saved == [((4, 8, 64), torch.bfloat16), ((4, 8, 1), torch.float32), ((64,), torch.bfloat16)]
    else:
        assert ((4, 8, 64), torch.float32) in saved


def test_plan_counts_the_plain_layers_that_fit() -> None:
    """From the peaks with none, one and two plain layers, the count that fits a budget: checked against the
    estimates at that count and one more (the cost per plain layer is the same from the first on)."""
    kwargs = dict(batch=2, seq=32, dtype="bfloat16", memory="balanced", reduced_depth=True)
    peaks = [E.estimate_memory(SIX, "lora", 4, plain_layers=n, **kwargs).peak_bytes for n in range(6)]
    budget = (peaks[3] + peaks[4]) // 2
    assert plain_layers_that_fit((peaks[0], peaks[1], peaks[2]), budget, 6) == 3
    assert plain_layers_that_fit((peaks[0], peaks[1], peaks[2]), peaks[0] - 1, 6) == -1
    assert plain_layers_that_fit((peaks[0], peaks[1], peaks[2]), peaks[0], 6) == 0
    assert plain_layers_that_fit((peaks[0], peaks[1], peaks[2]), 10 * peaks[5], 6) == 6
