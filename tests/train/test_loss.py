"""The causal-LM loss without full logits, against float64 references and against the model's own logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.train.data import IGNORE
from slimtune.train.loop import cosine_schedule
from slimtune.train.loss import LinearCrossEntropy, fused_causal_lm_loss
from slimtune.train.tasks import CausalLMObjective, fused_loss_supported

from ..helpers import BF16_TOL, FP32_TOL, perturb_adapters, rel_err
from ..toy_models import tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_float64(dtype):
    torch.manual_seed(0)
    n, h, v = 37, 24, 50
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight, bias = (torch.randn(v, h) * 0.3).to(dtype), torch.randn(v).to(dtype)
    labels = torch.randint(0, v, (n,))
    loss = LinearCrossEntropy.apply(hidden, weight, bias, labels, 8)  # five chunks, the last one short
    loss.backward(torch.tensor(0.7))
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, weight.double(), bias.double()), labels, reduction="sum")
    (ref * 0.7).backward()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < tol and rel_err(hidden.grad, h64.grad) < tol


def test_fused_objective_equals_the_logits_objective():
    model = tiny_llama()
    import slimtune

    slimtune.adapt(model, slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model)
    assert fused_loss_supported(model)
    ids = torch.randint(0, 128, (2, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE  # a prompt
    labels[1, 9:] = IGNORE  # padding
    results = []
    for fused in (True, False):
        model.zero_grad()
        loss, _ = CausalLMObjective(model, fused=fused)(ids, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in slimtune.trainable_parameters(model)]))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results
    assert rel_err(fused_loss, ref_loss) < FP32_TOL
    assert all(rel_err(a, b) < FP32_TOL for a, b in zip(fused_grads, ref_grads))
    mean = model(input_ids=ids, labels=labels).loss  # transformers' own loss: the mean over the same targets
    count = int((labels[:, 1:] != IGNORE).sum())
    assert rel_err(fused_loss / count, mean) < FP32_TOL


def test_fused_loss_needs_a_plain_head():
    model = tiny_llama()
    assert fused_loss_supported(model)  # a trained head too (its gradient accumulates chunk by chunk)
    model.requires_grad_(False)
    assert fused_loss_supported(model)
    assert not fused_loss_supported(model.model)  # no head
    hidden = torch.randn(1, 4, 64, requires_grad=True)
    labels = torch.full((1, 4), IGNORE)
    labels[0, 2] = 3
    loss = fused_causal_lm_loss(hidden, model.lm_head, labels)  # one target: position 1 predicts label 3
    ref = F.cross_entropy(model.lm_head(hidden[0, 1:2]), torch.tensor([3]), reduction="sum")
    assert rel_err(loss, ref) < FP32_TOL


def test_the_cosine_schedule():
    """transformers' ``get_cosine_schedule_with_warmup`` (the same factors; checked against it bit for bit when
    written), without importing it: linear warm-up, then half a cosine down to 0."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    schedule = cosine_schedule(optimizer, 2, 10)  # warm-up 2 steps, cosine over the other 8
    lrs = []
    for _ in range(11):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == [0.0, 0.05, 0.1] and lrs[-1] == 0.0
    assert lrs[6] == pytest.approx(0.05) and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
