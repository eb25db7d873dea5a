"""slimtune.core.lean_resnet (a frozen diffusers ResnetBlock2D as one autograd Function): the plain block's values and
gradients bit for bit, less kept for backward, and the plain forward wherever the form or the call differ."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtune.core import lean_layers
from slimtune.memory.accounting import SavedTensorMeter

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402


def _pair(**kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    block = ResnetBlock2D(temb_channels=16, groups=4, **kwargs).requires_grad_(False)
    lean = copy.deepcopy(block)
    lean_layers.install(lean)
    return block, lean


def _run(block: nn.Module, x: torch.Tensor, temb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """Output, input gradient, bytes saved for backward (parameters aside), the output's grad_fn name."""
    meter = SavedTensorMeter(exclude=block.parameters())
    with meter.record():
        y = block(x, temb)
    grad = torch.autograd.grad(y, x, torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y).to(y.dtype))[0]
    return y, grad, meter.bytes, type(y.grad_fn).__name__


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=8, out_channels=8), dict(in_channels=8, out_channels=16),
    dict(in_channels=8, out_channels=16, conv_shortcut=True),
    dict(in_channels=8, out_channels=8, output_scale_factor=2.0),
    dict(in_channels=8, out_channels=8, skip_time_act=True), dict(in_channels=8, out_channels=8, temb_channels=None),
    dict(in_channels=8, out_channels=16, conv_shortcut_bias=False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_block_function_is_the_plain_block_bit_for_bit(kwargs, dtype, device, deterministic_cudnn):
    """On CUDA under cuDNN's deterministic algorithms: its default ones do not repeat autograd's own convolution
    gradients bit for bit in float64 (RESULTS.md run 88)."""
    kwargs = dict(kwargs)
    temb_channels = kwargs.pop("temb_channels", 16)
    torch.manual_seed(0)
    block = ResnetBlock2D(temb_channels=temb_channels, groups=4, **kwargs).requires_grad_(False).to(device, dtype)
    lean = copy.deepcopy(block)
    lean_layers.install(lean)
    x = torch.randn(2, 8, 6, 5, dtype=dtype, device=device, requires_grad=True)
    temb = torch.randn(2, 16, dtype=dtype, device=device) if temb_channels else None
    y0, g0, saved0, _ = _run(block, x, temb)
    y1, g1, saved1, name = _run(lean, x, temb)
    assert name == "ResnetBlockFunctionBackward"
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert saved1 < 0.5 * saved0  # x and h1 of six activations (plus the norms' statistics)


def test_the_block_steps_aside_where_its_form_or_call_differ():
    block, lean = _pair(in_channels=8, out_channels=8, dropout=0.1)
    x, temb = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16)
    assert _run(lean, x, temb)[3] != "ResnetBlockFunctionBackward"  # dropout in training
    lean.eval()
    assert _run(lean, x, temb)[3] == "ResnetBlockFunctionBackward"  # dropout off in eval
    assert _run(lean, x, temb.requires_grad_())[3] != "ResnetBlockFunctionBackward"  # the embedding asks a gradient
    lean.conv1.weight.requires_grad_(True)
    assert _run(lean, x, temb.detach())[3] != "ResnetBlockFunctionBackward"  # a parameter asks a gradient
    lean.conv1.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(lean(x, temb.detach()).grad_fn).__name__ != "ResnetBlockFunctionBackward"
    with torch.no_grad():
        assert torch.equal(lean(x, temb.detach()), block.eval()(x, temb.detach()))
    with pytest.raises(TypeError):  # no time embedding for a block that projects one: diffusers' own error
        lean(x, None)
    _, down = _pair(in_channels=8, out_channels=8, down=True)  # downsampling inside: the block's own forward
    assert "forward" not in down.__dict__


def test_the_block_keeps_the_size_rule(monkeypatch):
    """Below ``UNET_LEAN_BYTES`` (its input, or conv1's wider output) the block runs plainly."""
    monkeypatch.setattr(lean_layers, "UNET_LEAN_BYTES", 2048)  # float32 [2, 16, 4, 4]
    _, lean = _pair(in_channels=8, out_channels=16)
    x, temb = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16)
    assert _run(lean, x, temb)[3] == "ResnetBlockFunctionBackward"  # conv1's output is 2 KiB
    _, narrow = _pair(in_channels=8, out_channels=8)
    assert _run(narrow, x, temb)[3] != "ResnetBlockFunctionBackward"  # 1 KiB each
