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
