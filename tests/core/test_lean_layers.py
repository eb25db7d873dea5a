"""Lean frozen layers (slimtune.core.lean_layers): the same values and gradients as PyTorch's own layers, bit for
bit, with fewer tensors saved for backward; the plain path wherever the lean one does not apply."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune
from slimtune.core import lean_layers, lean_resnet
from slimtune.core.lean_layers import FrozenConvFunction, NormSiluFunction
from slimtune.memory.accounting import SavedTensorMeter
from slimtune.models import workload
from slimtune.models.diffusion import DIFFUSION_PRESETS, UNET_ATTENTION_TARGETS, UNET_CONV_TARGETS

from ..helpers import adapted_pair, perturb_adapters, rel_err


def _saved_bytes(fn, model: nn.Module) -> tuple[object, int]:
    """``(fn(), bytes of the distinct storages saved for backward while it ran, model's parameters aside)``."""
    meter = SavedTensorMeter(exclude=model.parameters())
    with meter.record():
        out = fn()
    return out, meter.bytes


@pytest.mark.parametrize("dims, kwargs, batched", [
    (2, {"stride": 2, "padding": 1}, True),
    (2, {"padding": (0, 2), "dilation": 2, "groups": 2}, True),
    (1, {"padding": 1, "stride": 3}, True),
    (3, {"padding": 1}, True),
    (2, {"padding": 1}, False),
])
def test_frozen_conv_function_matches_autograd(dims, kwargs, batched):
    torch.manual_seed(0)
    conv = getattr(nn, f"Conv{dims}d")(4, 6, 3, **kwargs).double().requires_grad_(False)
    shape = (2, 4, *(9,) * dims) if batched else (4, *(9,) * dims)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref = conv(x)
    (dref,) = torch.autograd.grad(ref, x, torch.ones_like(ref) + ref)
    x2 = x.detach().clone().requires_grad_(True)
    got, saved = _saved_bytes(lambda: FrozenConvFunction.apply(x2, conv.weight, conv.bias, conv.stride,
                                                               conv.padding, conv.dilation, conv.groups), conv)
    (dgot,) = torch.autograd.grad(got, x2, torch.ones_like(ref) + ref)
    assert torch.equal(got, ref)
    assert torch.allclose(dgot, dref, rtol=1e-12, atol=1e-12)
    assert saved == 0  # the weight alone (a parameter): never the input


def test_norm_silu_function_gradients_are_the_plain_ones():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8).requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    ref = F.silu(norm(x))
    (dref,) = torch.autograd.grad(ref, x, torch.cos(ref))
    h = norm(x)
    got = NormSiluFunction.apply(h, x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    (dgot,) = torch.autograd.grad(got, x, torch.cos(ref))
    assert torch.equal(got, ref) and torch.equal(dgot, dref)


class Block(nn.Module):
    """A ResNet-style block: GroupNorm → SiLU → conv, a second norm whose output is changed in place before its
    SiLU (must run plainly), a strided conv, and a trained adapter target."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(4, 8), nn.GroupNorm(4, 8)
        self.act = nn.SiLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        g = self.norm2(h)
        g += t  # in place on the norm's output: the fused path would rebuild the wrong tensor
        h = self.conv2(self.act(g))
        return self.proj(h.mean(dim=(2, 3)))


def _block_step(model: nn.Module, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 6, 6, generator=gen, requires_grad=True)
    t = torch.randn(2, 8, 1, 1, generator=gen)
    out, saved = _saved_bytes(lambda: model(x, t), model)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad for p in slimtune.trainable_parameters(model)]
    return out.detach(), grads, saved


def test_adapt_installs_lean_layers_with_identical_results():
    torch.manual_seed(0)
    plain, lean = adapted_pair(Block(), slimtune.LoraConfig(r=4, target_modules=["proj"]))
    assert not any(lean_layers.installed(m) for m in plain.modules())
    assert all(lean_layers.installed(m) for m in (lean.norm1, lean.norm2, lean.act, lean.conv1, lean.conv2))
    out_p, grads_p, saved_p = _block_step(plain)
    out_l, grads_l, saved_l = _block_step(lean)
    assert torch.equal(out_p, out_l)
    assert all(torch.equal(a, b) for a, b in zip(grads_p, grads_l))
    # conv1's and conv2's inputs (SiLU outputs) and norm1's output are not kept
    assert saved_l <= saved_p - 2 * 2 * 8 * 6 * 6 * 4 - 2 * 8 * 6 * 6 * 4


def test_trained_or_adapted_layers_run_plainly():
    torch.manual_seed(0)
    block = Block()
    model = slimtune.adapt(block, slimtune.LoraConfig(r=4, target_modules=["conv1"]))
    assert not lean_layers.installed(model.conv1.base_layer)  # inside an adapter: the adapter's business
    model.conv2.weight.requires_grad_(True)  # trained by the user: its weight gradient needs the input
    _block_step(model)
    assert model.conv2.weight.grad is not None


def test_unload_and_deepcopy():
    torch.manual_seed(0)
    model = slimtune.adapt(Block(), slimtune.LoraConfig(r=4, target_modules=["proj"]))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.conv1.weight.mul_(2)
    assert twin.conv1.forward.module is twin.conv1  # the copy's wrapper runs the copy's weights
    assert not torch.equal(_block_step(model)[0], _block_step(twin)[0])
    slimtune.unload(model)
    assert not any(lean_layers.installed(m) for m in model.modules())


def test_a_deleted_model_frees_its_lean_layers_without_the_garbage_collector():
    """The instance forwards hold their modules weakly: no cycle keeps a deleted UNet's weights alive until a
    collection."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = slimtune.adapt(Block(), slimtune.LoraConfig(r=4, target_modules=["proj"]))
    assert lean_layers.installed(model.conv1)
    refs = [weakref.ref(model.conv1), weakref.ref(model.conv1.weight)]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert all(ref() is None for ref in refs)
    finally:
        if enabled:
            gc.enable()


def test_no_grad_and_bf16_autocast():
    torch.manual_seed(0)
    plain, lean = adapted_pair(Block(), slimtune.LoraConfig(r=4, target_modules=["proj"]))
    x, t = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 1, 1)
    with torch.no_grad():
        assert torch.equal(plain(x, t), lean(x, t))
    results = []
    for model in (plain, lean):
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xg, t)
        out.float().square().sum().backward()
        results.append((out, xg.grad, [p.grad for p in slimtune.trainable_parameters(model)]))
    (op, xp, gp), (ol, xl, gl) = results
    assert torch.equal(op, ol) and torch.equal(xp, xl) and all(torch.equal(a, b) for a, b in zip(gp, gl))


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"],
                                     list(UNET_ATTENTION_TARGETS + UNET_CONV_TARGETS)], ids=["lora", "locon"])
def test_tiny_unet_lora_same_gradients_less_saved(targets):
    """A diffusers UNet (tiny-unet), LoRA on its attention (the ResNet blocks frozen, each one Function), or LoCon's
    default targets (LoCon on every ResNet, shortcut and resampling convolution and LoRA on the time projections:
    the ResNet blocks one Function with the adapters inside): loss and every gradient bit for bit over two steps, and
    what backward keeps drops (the ResNet and resampling convolutions' inputs, the GroupNorm outputs SiLU kept)."""
    diffusers = pytest.importorskip("diffusers")

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = diffusers.UNet2DConditionModel(**DIFFUSION_PRESETS["tiny-unet"].config)
    batch = workload.make_inputs("tiny-unet", None, 2, 0, "cpu", torch.float32, torch.Generator().manual_seed(1))
    target = batch.pop("target")
    plain, lean = adapted_pair(base, slimtune.LoraConfig(r=4, target_modules=targets), strip=True)  # both group q/k/v
    if len(targets) > 4:
        assert any(type(m.__dict__.get("forward")).__name__ == "_LeanResnetForward" and lean_resnet.adapted_layers(m)
                   for m in lean.modules())
    for step in range(2):
        results = []
        for model in (plain, lean):
            out, saved = _saved_bytes(lambda m=model: m(**batch, return_dict=False)[0], model)
            loss = (out - target).square().mean()
            loss.backward()
            params = list(slimtune.trainable_parameters(model))
            results.append((loss.detach(), [p.grad.clone() for p in params], saved))
            for p in params:
                p.grad = None
        (lp, gp, sp), (ll, gl, sl) = results
        assert torch.equal(lp, ll) and all(torch.equal(a, b) for a, b in zip(gp, gl))
        assert sl < 0.9 * sp


def test_compiled_step_runs_the_plain_layers_without_graph_break():
    """Under torch.compile the lean layers step aside (the partitioner decides what the graph saves): a
    fullgraph compile of the step traces and matches eager."""
    torch.manual_seed(0)
    model = slimtune.adapt(Block(), slimtune.LoraConfig(r=4, target_modules=["proj"]))
    perturb_adapters(model)
    x, t = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 1, 1)
    eager = model(x, t)
    torch.compiler.reset()
    compiled = torch.compile(lambda a, b: model(a, b), fullgraph=True, backend="aot_eager")(x, t)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


def test_diffusers_geglu_keeps_its_projection_output_only():
    """diffusers' GEGLU: the same output and gradients bit for bit, without the GELU output kept; diffusers' own
    arithmetic without gradients; the remover gives its forward back."""
    pytest.importorskip("diffusers")
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    plain = nn.Sequential(nn.LayerNorm(8), GEGLU(8, 16), nn.Linear(16, 8)).requires_grad_(False)
    lean = copy.deepcopy(plain)
    remove = lean_layers.install(lean)
    assert lean_layers.installed(lean[1]) and not lean_layers.installed(plain[1])
    results = []
    for model in (plain, lean):
        x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out, saved = _saved_bytes(lambda m=model, x=x: m(x), model)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, saved))
    (op, gp, sp), (ol, gl, sl) = results
    assert torch.equal(op, ol) and torch.equal(gp, gl)
    assert sl <= sp - 3 * 5 * 16 * 4  # gelu(gate), [3, 5, 16] float32, no longer kept
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), lean(x))
    remove()
    assert not lean_layers.installed(lean[1])


_BLOCK_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


@pytest.mark.parametrize("config", [
    slimtune.LoraConfig(r=4, target_modules=_BLOCK_TARGETS),
    slimtune.LoraConfig(r=4, target_modules=_BLOCK_TARGETS, use_dora=True),
    slimtune.LohaConfig(r=4, target_modules=_BLOCK_TARGETS),
    slimtune.LokrConfig(r=4, target_modules=_BLOCK_TARGETS),
    slimtune.HraConfig(r=4, target_modules=_BLOCK_TARGETS),
], ids=["lora", "dora", "loha", "lokr", "hra"])
def test_transformer_block_adapters_keep_recipes_for_the_norm_and_geglu_outputs(config):
    """diffusers' BasicTransformerBlock with adapters on its attention and feed-forward projections: the inputs those
    keep (norm1/2/3's outputs, the GEGLU's output) are rebuilt in backward from what the norms and the GEGLU keep —
    every method, the same output and gradients bit for bit; under checkpointing (whose hooks own what is saved)
    the plain saving, the same numbers again. (Each pair is fresh: a first step, before sibling layers group.)"""
    pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(8, 2, 4, cross_attention_dim=6)
    context = torch.randn(3, 4, 6)
    for checkpointed in (False, True):
        plain, lean = adapted_pair(block, config, strip=True)
        assert lean_layers.installed(lean) and all(lean_layers.installed(n)
                                                   for n in (lean.norm1, lean.norm2, lean.norm3))
        results = []
        for model in (plain, lean):
            x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
            run = lambda m=model, x=x: m(x, encoder_hidden_states=context)  # noqa: E731
            if checkpointed:
                out, saved = torch.utils.checkpoint.checkpoint(run, use_reentrant=False), 0
            else:
                out, saved = _saved_bytes(run, model)
            out.square().sum().backward()
            results.append((out.detach(), [x.grad, *(p.grad for p in slimtune.trainable_parameters(model))], saved))
        (op, gp, sp), (ol, gl, sl) = results
        assert torch.equal(op, ol) and all(torch.equal(a, b) for a, b in zip(gp, gl))
        # gelu(gate) [3, 5, 32], the GEGLU's output [3, 5, 32] and the three norms' outputs [3, 5, 8], float32
        assert checkpointed or sl <= sp - 4 * (3 * 5 * 32 * 2 + 3 * 5 * 8 * 3)


def test_transformer_block_lora_keeps_recipes_without_hooks_once_its_siblings_run_together():
    """LoRA's Functions keep an offered input's recipe themselves (``keeps_recipes_itself``: no saved-tensor hooks
    around its forward). Over three steps — the first with every layer alone, then q/k/v as one Function — the
    outputs and gradients are the plain block's bit for bit, with the norms' and the GEGLU's outputs not kept."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock

    from slimtune.methods.dora.module import DoraLinear
    from slimtune.methods.lora.linear import LoraLinear

    assert LoraLinear.keeps_recipes_itself and not hasattr(LoraLinear.forward, "__wrapped__")
    assert hasattr(DoraLinear.forward, "__wrapped__")  # its own forward: the hooks again
    torch.manual_seed(0)
    block = BasicTransformerBlock(8, 2, 4, cross_attention_dim=6)
    context = torch.randn(3, 4, 6)
    plain, lean = adapted_pair(block, slimtune.LoraConfig(r=4, target_modules=_BLOCK_TARGETS), strip=True)
    for step in range(3):
        results = []
        for model in (plain, lean):
            x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(step), requires_grad=True)
            out, saved = _saved_bytes(lambda m=model, x=x: m(x, encoder_hidden_states=context), model)
            out.square().sum().backward()
            params = list(slimtune.trainable_parameters(model))
            results.append((out.detach(), [x.grad, *(p.grad.clone() for p in params)], saved))
            for p in params:
                p.grad = None
        (op, gp, sp), (ol, gl, sl) = results
        assert torch.equal(op, ol) and all(torch.equal(a, b) for a, b in zip(gp, gl))
        assert sl <= sp - 4 * (3 * 5 * 32 * 2 + 3 * 5 * 8 * 3)
    assert lean.attn1.to_q.siblings.state == "active"


_LOCON_BLOCK = slimtune.LoraConfig(r=4, target_modules=["conv1", "conv2"])


@pytest.mark.parametrize("config", [
    _LOCON_BLOCK,
    slimtune.LohaConfig(r=4, target_modules=["conv1", "conv2"]),
    slimtune.LokrConfig(r=4, target_modules=["conv1", "conv2"]),
], ids=["locon", "loha", "lokr"])
def test_resnet_block_adapted_convs_keep_recipes_for_the_norm_silu_outputs(config):
    """diffusers' ResnetBlock2D with its convolutions adapted: their inputs (each a GroupNorm + SiLU output) are rebuilt
    from the norms' inputs, which the norms keep — the same output and gradients bit for bit."""
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    plain, lean = adapted_pair(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4), config,
                                strip=True)
    assert lean_layers.installed(lean)
    results = []
    for model in (plain, lean):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 8, 6, 6, generator=gen, requires_grad=True)
        temb = torch.randn(2, 4, generator=gen)
        out, saved = _saved_bytes(lambda m=model, x=x, t=temb: m(x, t), model)
        out.square().sum().backward()
        results.append((out.detach(), [x.grad, *(p.grad for p in slimtune.trainable_parameters(model))], saved))
    (op, gp, sp), (ol, gl, sl) = results
    assert torch.equal(op, ol) and all(torch.equal(a, b) for a, b in zip(gp, gl))
    # the two norms' outputs (SiLU's saved inputs) and the two SiLU outputs the convs' adapters kept (LoCon's block as
    # one Function: nor the scaled up weights, which it scales again in backward)
    assert sp - sl == 4 * (2 * 8 * 6 * 6 * 4) + (2 * 8 * 4 * 4 if config is _LOCON_BLOCK else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lean_layers_on_the_gpu_are_the_plain_ones(dtype):
    """On CUDA (cuDNN's convolution backward given the input's shape alone; the blocks' recipes): a tiny UNet's
    LoRA step with and without the lean layers — bf16 bit for bit (RESULTS.md runs 66-67, H100); float32 within 2e-3:
    cuDNN runs float32 convolutions in TF32 by default and picks another backward algorithm for the placeholder
    input, so the two differ at TF32's precision (4.4e-4 measured in run 67)."""
    diffusers = pytest.importorskip("diffusers")

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = diffusers.UNet2DConditionModel(**DIFFUSION_PRESETS["tiny-unet"].config).to("cuda", dtype)
    batch = workload.make_inputs("tiny-unet", None, 2, 0, "cuda", dtype, torch.Generator("cuda").manual_seed(1))
    target = batch.pop("target")
    config = slimtune.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    results = []
    for model in adapted_pair(base, config, strip=True):
        loss = (model(**batch, return_dict=False)[0] - target).float().square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in slimtune.trainable_parameters(model)]))
    (lp, gp), (ll, gl) = results
    if dtype == torch.float32:
        assert torch.equal(lp, ll) and max(rel_err(a, b) for a, b in zip(gl, gp)) < 2e-3
    else:
        assert torch.equal(lp, ll) and all(torch.equal(a, b) for a, b in zip(gp, gl))


def test_a_unet_runs_under_inference_mode():
    """Under ``torch.inference_mode`` the lean layers' hand-offs see inference tensors (no version counter): the
    adapted UNet runs and gives what ``no_grad`` gives (before the fix, it raised)."""
    diffusers = pytest.importorskip("diffusers")

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = slimtune.adapt(diffusers.UNet2DConditionModel(**DIFFUSION_PRESETS["tiny-unet"].config),
                           slimtune.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    batch = workload.make_inputs("tiny-unet", None, 2, 0, "cpu", torch.float32, torch.Generator().manual_seed(1))
    batch.pop("target")
    with torch.no_grad():
        want = model(**batch, return_dict=False)[0]
    with torch.inference_mode():
        got = model(**batch, return_dict=False)[0]
    assert torch.equal(got, want)


def test_unet_lean_layers_apply_from_a_size(monkeypatch):
    """A UNet's lean convolution and GroupNorm + SiLU take their lean path only for tensors of at least
    ``UNET_LEAN_BYTES`` (below it their Python nodes cost more host time than they spare); with the size above every
    tensor a whole tiny UNet step is the plain one, what it saves included."""
    monkeypatch.setattr(lean_layers, "UNET_LEAN_BYTES", 4096)
    model = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1)).requires_grad_(False)
    lean_layers.install(model)
    for side, lean in ((4, False), (32, True)):  # float32 [1, 8, side, side]: 512 bytes, 32 KiB
        x = torch.randn(1, 8, side, side, requires_grad=True)
        h = model[1](model[0](x))
        assert (type(h.grad_fn).__name__ == "NormSiluFunctionBackward") is lean
        assert (type(model[2](h).grad_fn).__name__ == "FrozenConvFunctionBackward") is lean

    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    monkeypatch.setattr(lean_layers, "UNET_LEAN_BYTES", 2**40)
    torch.manual_seed(0)
    base = diffusers.UNet2DConditionModel(**DIFFUSION_PRESETS["tiny-unet"].config)
    batch = workload.make_inputs("tiny-unet", None, 2, 0, "cpu", torch.float32, torch.Generator().manual_seed(1))
    batch.pop("target")
    plain, lean = adapted_pair(base, slimtune.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    (out_p, saved_p), (out_l, saved_l) = (_saved_bytes(lambda m=m: m(**batch, return_dict=False)[0], m)
                                          for m in (plain, lean))
    assert torch.equal(out_p, out_l) and saved_l == saved_p



def test_a_methods_unet_lean_scale_multiplies_the_size(monkeypatch):
    """``install(size_scale=k)`` takes the lean paths from k times ``UNET_LEAN_BYTES``, in deep copies too; a LoKr
    model's frozen layers get LoKr's registered scale (4), a LoRA model's 1; a scale that is not a positive integer is
    refused."""
    monkeypatch.setattr(lean_layers, "UNET_LEAN_BYTES", 4096)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)  # float32: 8 KiB, between 4 and 16 KiB
    for scale, lean in ((1, True), (4, False)):
        model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).requires_grad_(False)
        lean_layers.install(model, size_scale=scale)
        for m in (model, copy.deepcopy(model)):
            assert (type(m[0](x).grad_fn).__name__ == "FrozenConvFunctionBackward") is lean
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="size_scale"):
            lean_layers.install(nn.Sequential(nn.Conv2d(8, 8, 3)), size_scale=bad)

    for config, lean in ((slimtune.LoraConfig(r=2, target_modules=["1"]), True),
                         (slimtune.LokrConfig(r=2, target_modules=["1"]), False)):
        model = slimtune.adapt(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)), config)
        assert (type(model[0](x).grad_fn).__name__ == "FrozenConvFunctionBackward") is lean
