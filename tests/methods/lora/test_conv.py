"""LoCon (LoRA on Conv1d/Conv2d) vs float64 reference, merge, grouped convs."""
import pytest
import torch
from torch import nn

import slimtune
from slimtune.methods.lora import LoraConv, locon_reference
from tests.helpers import BF16_TOL, FP32_TOL, check_merge_round_trip, perturb_adapters, rel_err

CASES = [
    (nn.Conv2d, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1)),
    (nn.Conv2d, dict(in_channels=6, out_channels=8, kernel_size=3, stride=2)),
    (nn.Conv2d, dict(in_channels=6, out_channels=8, kernel_size=1)),
    (nn.Conv2d, dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2)),
    (nn.Conv2d, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, groups=2)),
    (nn.Conv1d, dict(in_channels=6, out_channels=8, kernel_size=5, padding=2, stride=2)),
]


def _input(cls, dtype):
    shape = (2, 6, 9, 11) if cls is nn.Conv2d else (2, 6, 17)
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_conv_matches_float64_reference(cls, kw, dtype, tol):
    torch.manual_seed(0)
    base = cls(**kw).to(dtype)
    lora = LoraConv(base, r=4, alpha=6)
    perturb_adapters(lora)
    x = _input(cls, dtype).requires_grad_()
    y = lora(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    base64 = cls(**kw).double()
    base64.load_state_dict(base.state_dict())
    x64 = x.detach().double().requires_grad_()
    a64, b64 = (p.detach().double().requires_grad_() for p in (lora.lora_A, lora.lora_B))
    ref = locon_reference(x64, base64, a64, b64, lora.scaling)
    ref.backward(dy.double())
    assert rel_err(y, ref) < tol
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(lora.lora_A.grad, a64.grad) < tol and rel_err(lora.lora_B.grad, b64.grad) < tol


@pytest.mark.parametrize("cls,kw", [c for c in CASES if c[1].get("groups", 1) == 1])
def test_conv_merge_round_trip(cls, kw):
    torch.manual_seed(1)
    base = cls(**kw)
    lora = LoraConv(base, r=4, alpha=4)
    perturb_adapters(lora)
    check_merge_round_trip(lora, _input(cls, torch.float32))


def test_grouped_conv_merge_is_refused_and_rank_must_divide_groups():
    base = nn.Conv2d(6, 8, 3, groups=2)
    lora = LoraConv(base, r=4, alpha=4)
    with pytest.raises(slimtune.SlimtuneError, match="groups"):
        lora.merge()
    assert not lora.merged
    with pytest.raises(slimtune.ConfigError, match="divisible"):
        LoraConv(base, r=3, alpha=3)


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_conv_function_is_the_composition_bit_for_bit(cls, kw, dtype, adapter_dtype):
    """The training path (one Function, ``LowRankConvFunction``) gives the plain composition's output and gradients
    bit for bit (fp32 adapters over a bf16 base included) and keeps less: not ``h = down(x)``."""
    from slimtune.memory.accounting import SavedTensorMeter

    torch.manual_seed(0)
    lora = LoraConv(cls(**kw).to(dtype), r=4, alpha=6, adapter_dtype=adapter_dtype)
    lora.base_layer.requires_grad_(False)
    perturb_adapters(lora)
    results, x0 = [], _input(cls, dtype)
    for run in (lora, lora._composed):
        x = x0.clone().requires_grad_()
        meter = SavedTensorMeter(exclude=lora.parameters())
        with meter.record():
            y = run(x)
        y.backward(torch.ones_like(y) + y.detach())
        results.append((y.detach(), x.grad, lora.lora_A.grad, lora.lora_B.grad, meter.bytes))
        lora.lora_A.grad = lora.lora_B.grad = None
    (*function, kept), (*composed, kept_composed) = results
    assert all(torch.equal(a, b) for a, b in zip(function, composed))
    assert kept < kept_composed


def test_conv_with_dropout_or_unbatched_input_runs_the_composition():
    torch.manual_seed(0)
    lora = LoraConv(nn.Conv2d(6, 8, 3, padding=1), r=4, alpha=4, dropout=0.5)
    perturb_adapters(lora)
    x = torch.randn(6, 9, 11, requires_grad=True)  # unbatched, as nn.Conv2d takes it
    lora.eval()
    assert torch.equal(lora(x), lora(x.unsqueeze(0)).squeeze(0))
    lora.train()
    y = lora(x.unsqueeze(0))
    assert y.grad_fn is not None and "LowRankConv" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert lora.lora_A.grad is not None and x.grad is not None
