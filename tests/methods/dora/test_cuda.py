"""DoRA's Linear layer through the compiled Triton kernels on a GPU, bf16 included (the CPU interpreter cannot check
bf16): every route, ranks on both sides of the one-launch forward's limit, against the float64 definition."""
from __future__ import annotations

import pytest
import torch

import slimtune

from ...helpers import dora_layer_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("rank", [8, 32, 64, 96])
@pytest.mark.parametrize("case", ["output", "recompute", "bias", "frozen_m"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
def test_dora_layer_on_the_gpu_matches_the_definition(rank, case, dtype, tol):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 1000, bias=case == "bias")).to("cuda", dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=rank, alpha=rank, target_modules=["0"], use_dora=True,
                                              dora_recompute=case == "recompute"))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
        layer.magnitude[3] = 0.0
    layer.magnitude.requires_grad_(case != "frozen_m")
    x = torch.randn(4, 700, 384, device="cuda", dtype=dtype, requires_grad=True)
    y = model(x)
    assert y.grad_fn.route == {"recompute": "recompute", "bias": "z", "frozen_m": None}.get(case, "output")
    dy = torch.randn_like(y)
    y.backward(dy)
    errors = dora_layer_errors(layer, x, y, dy)
    assert len(errors) == (4 if case == "frozen_m" else 5)
    assert all(e < tol for e in errors.values()), errors
