"""slimtune.core.lean_resnet (a frozen diffusers ResnetBlock2D as one autograd Function): the plain block's values and
gradients bit for bit, less kept for backward, and the plain forward wherever the form or the call differ."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimtune
from slimtune.core import lean_layers, lean_resnet
from slimtune.memory.accounting import SavedTensorMeter
from tests.helpers import adapted_pair

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
    (y, grad, *_), saved, name = _run_adapted(block, x, temb)
    return y, grad, saved, name


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


_LOCON_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def _block(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return ResnetBlock2D(temb_channels=16, groups=4, **kwargs)


def _run_adapted(block: nn.Module, x: torch.Tensor, temb: torch.Tensor | None) -> tuple[list[torch.Tensor], int, str]:
    """Output, the gradients of x and of every trainable parameter, bytes saved (parameters aside), grad_fn name."""
    meter = SavedTensorMeter(exclude=block.parameters())
    with meter.record():
        y = block(x, temb)
    params = [p for p in slimtune.trainable_parameters(block)]
    dy = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y).to(y.dtype)
    grads = torch.autograd.grad(y, [x, *params], dy, allow_unused=True)  # a disabled adapter's factors: None
    return [y.detach(), *grads], meter.bytes, type(y.grad_fn).__name__


@pytest.mark.parametrize("kwargs", [dict(in_channels=8, out_channels=8), dict(in_channels=8, out_channels=16),
                                    dict(in_channels=8, out_channels=8, skip_time_act=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_block_with_locon_runs_as_one_function_bit_for_bit(kwargs, dtype):
    """LoCon on conv1, conv2 (and the shortcut, where the channels change) and LoRA on the time projection: the block
    runs as one Function with the adapters inside, with the plain adapted block's output and gradients (x and every
    factor) bit for bit and less kept (no norm or SiLU output, no scaled up weight)."""
    plain, lean = adapted_pair(_block(**kwargs), slimtune.LoraConfig(r=4, target_modules=_LOCON_TARGETS), strip=True)
    plain, lean = plain.to(dtype), lean.to(dtype)
    assert "forward" in lean.__dict__ and lean_resnet.adapted_layers(lean)
    x = torch.randn(2, 8, 6, 5, dtype=dtype, requires_grad=True)
    temb = torch.randn(2, 16, dtype=dtype)
    got, saved, name = _run_adapted(lean, x, temb)
    want, saved_plain, _ = _run_adapted(plain, x, temb)
    assert name == "ResnetBlockFunctionBackward"
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and saved < saved_plain


def test_a_block_with_locon_steps_aside_for_a_disabled_merged_or_dropping_adapter():
    """Where an adapter is disabled, merged or drops out in training, or is not LoRA, the block runs its own forward
    in its recipe scope (the lean layers inside as before), with the plain adapted block's results."""
    config = slimtune.LoraConfig(r=4, target_modules=_LOCON_TARGETS)
    plain, lean = adapted_pair(_block(in_channels=8, out_channels=8), config, strip=True)
    x, temb = torch.randn(2, 8, 6, 5, requires_grad=True), torch.randn(2, 16)
    def setting(name: str, value: object):
        return lambda: setattr(lean.conv1, name, value)

    for change, undo in [(setting("disabled", True), setting("disabled", False)), (lean.conv2.merge, lean.conv2.unmerge),
                         (setting("dropout_p", 0.5), setting("dropout_p", 0.0))]:
        change()
        assert _run_adapted(lean, x, temb)[2] != "ResnetBlockFunctionBackward"
        undo()
    assert _run_adapted(lean, x, temb)[2] == "ResnetBlockFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the compositions' casts follow autocast there
        assert _run_adapted(lean, x, temb)[2] != "ResnetBlockFunctionBackward"
    _, loha = adapted_pair(_block(in_channels=8, out_channels=8),
                           slimtune.LohaConfig(r=4, target_modules=["conv1", "conv2"]), strip=True)
    assert type(loha.__dict__["forward"]).__name__ == "_LeanBlockForward"
    got = _run_adapted(lean, x, temb)[0]
    assert all(torch.equal(a, b) for a, b in zip(got, _run_adapted(plain, x, temb)[0]))


@pytest.mark.parametrize("config", [None, slimtune.LoraConfig(r=4, target_modules=_LOCON_TARGETS)],
                         ids=["frozen", "locon"])
def test_a_deep_copy_of_a_block_runs_its_own_function(config):
    """``copy.deepcopy`` (an EMA copy, a pickled model) builds the instance forward before the copy has its layers:
    the copy's block runs its own Function, on its own weights, with the original's results."""
    block = _block(in_channels=8, out_channels=16)
    if config is None:
        lean = block.requires_grad_(False)
        lean_layers.install(lean)
    else:
        _, lean = adapted_pair(block, config, strip=True)
    twin = copy.deepcopy(lean)
    assert twin.forward.module is twin
    x, temb = torch.randn(2, 8, 6, 5, requires_grad=True), torch.randn(2, 16)
    got, _, name = _run_adapted(twin, x, temb)
    assert name == "ResnetBlockFunctionBackward"
    assert all(torch.equal(a, b) for a, b in zip(got, _run_adapted(lean, x, temb)[0]))
