"""Memory (issue 17, item 4): measuring sensitivity needs no more than a LoRA training step of the same model plus
one layer's weight gradient — measured with the profiler's accounting (``slimtune.memory.accounting``)."""
from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.memory.accounting import SavedTensorMeter, gradient_bytes, module_state_bytes, optimizer_state_bytes
from slimtune.ranks import hessian, sensitivity
from slimtune.ranks.sensitivity import estimate_sensitivity

from ..toy_models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = slimtune.LoraConfig(r=8, target_modules=TARGETS)


def _batch():
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _lora_step_bytes() -> tuple[int, int]:
    """``(accounted peak, saved for backward)`` of one LoRA step (AdamW) on the tiny Llama."""
    model = slimtune.adapt(tiny_llama(), CFG)
    params = slimtune.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()], model=model)
    with meter.record():
        loss = model(**_batch()).loss
    loss.backward()
    opt.step()
    return module_state_bytes(model) + gradient_bytes(params) + optimizer_state_bytes(opt) + meter.bytes, meter.bytes


@pytest.mark.parametrize("method", ["gradient", "data", "hessian"])
def test_sensitivity_needs_a_lora_step_plus_one_weight_gradient(method, monkeypatch):
    lora_peak, lora_saved = _lora_step_bytes()
    model = tiny_llama()
    reduced: list[int] = []
    reduce = sensitivity.gram
    monkeypatch.setattr(sensitivity, "gram", lambda m: reduced.append(m.numel() * m.element_size()) or reduce(m))
    meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()], model=model)
    passes: list[int] = []
    run_pass = sensitivity.backward_loss

    def measured_pass(*args, **kwargs):  # each forward + backward on its own (the Hessian runs two per probe)
        with meter.record():
            run_pass(*args, **kwargs)
        passes.append(meter.bytes)

    monkeypatch.setattr(sensitivity, "backward_loss", measured_pass)
    monkeypatch.setattr(hessian, "backward_loss", measured_pass)
    estimate_sensitivity(model, [_batch()], CFG, method, probes=1)
    saved = max(passes)
    assert len(passes) == (2 if method == "hessian" else 1)
    one_gradient = max(m.weight.numel() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))) * 4
    assert gradient_bytes(model.parameters()) == 0  # no weight gradient was accumulated anywhere
    assert saved <= lora_saved  # the layer inputs, as a LoRA step saves them
    assert max(reduced, default=0) <= one_gradient  # the one weight-sized tensor a layer's backward reduces
    assert module_state_bytes(model) + saved + one_gradient <= lora_peak + one_gradient
