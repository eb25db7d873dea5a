"""What each lean frozen layer and recipe scope costs, one layer at a time: fwd+bwd per call, plain against lean.

At the Stable Diffusion 1.5 shapes of its highest-resolution blocks (batch 4, 64x64 latents: 320 channels, 4,096
tokens) the GPU decides a call's time; at a tiny shape (batch 1, 8x8) the host does. So the two columns split a lean
layer's price into the GPU's work (an extra norm pass, a gather) and the host's (a Python autograd node where
PyTorch's is C++, saved-tensor hooks). Each case builds one module, and a copy with ``slimtune.core.lean_layers``
installed (blocks: with an adapter, the block's recipe scope on or off), and times ``module(x).sum().backward()``.

    python benchmarks/lean_layer_cost.py          # CUDA (bf16) if available, else the CPU (float32, tiny shape only)
    python benchmarks/lean_layer_cost.py --tiny-channels 32   # the CPU: 32 channels, mostly the host's work
    python benchmarks/lean_layer_cost.py --tiny-channels 32 --before DIR   # and an earlier copy's lean variant

The variants of a case take turns, ``--rounds`` rounds of ``reps`` calls each (a shared box drifts; each variant's
time is its median over rounds, and the ``- plain`` column the median of the per-round differences). ``--before DIR``:
DIR holds an earlier copy of the package as ``slimtune_before`` (as ``paired_steps.py`` takes it); each case is built
by it too, and its lean variant joins the rounds as ``lean at before``.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
from types import ModuleType
from typing import Callable

from _common import environment_line, markdown_table, write_out_text
from host_cost import run_us

import torch
from torch import nn

import slimtune
from slimtune.core import lean_layers


def _cases(device: torch.device, dtype: torch.dtype, tiny: bool, tiny_channels: int = 320,
           package: ModuleType = slimtune) -> dict[str, tuple[nn.Module, Callable]]:
    """name -> (plain module, call(module) running one fwd+bwd); the tiny shape with ``tiny_channels`` channels (a
    multiple of 32: SD-1.5's GroupNorm groups and 8 heads); blocks adapted by ``package`` (this checkout's slimtune, or
    an earlier copy's)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    batch, side = (1, 8) if tiny else (4, 64)
    tokens = side * side
    c = tiny_channels if tiny else 320

    def image() -> torch.Tensor:
        return torch.randn(batch, c, side, side, device=device, dtype=dtype, requires_grad=True)

    def sequence() -> torch.Tensor:
        return torch.randn(batch, tokens, c, device=device, dtype=dtype, requires_grad=True)

    x_img, x_seq = image(), sequence()
    context = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    temb = torch.randn(batch, 1280, device=device, dtype=dtype)
    torch.manual_seed(0)
    block = BasicTransformerBlock(c, 8, c // 8, cross_attention_dim=768)
    package.adapt(block, package.LoraConfig(r=16, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                  "ff.net.0.proj", "ff.net.2"]))
    resnet = ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=1280)
    package.adapt(resnet, package.LoraConfig(r=16, target_modules=["conv1", "conv2"]))
    return {
        "conv 3x3": (nn.Conv2d(c, c, 3, padding=1), lambda m: m(x_img).sum().backward()),
        "GroupNorm + SiLU": (nn.Sequential(nn.GroupNorm(32, c), nn.SiLU()), lambda m: m(x_img).sum().backward()),
        "GEGLU": (GEGLU(c, 4 * c), lambda m: m(x_seq).sum().backward()),
        "transformer block, LoRA": (block, lambda m: m(x_seq, encoder_hidden_states=context).sum().backward()),
        "ResNet block, LoCon": (resnet, lambda m: m(x_img, temb).sum().backward()),
        "ResNet block, frozen (LoRA's)": (ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=1280),
                                          lambda m: m(x_img, temb).sum().backward()),
        "Attention call": (Attention(c, heads=8, dim_head=c // 8, cross_attention_dim=768),
                           lambda m: m(x_seq, context).sum().backward()),
    }


def _variants(plain: nn.Module, device: torch.device, dtype: torch.dtype,
              lean_layers: ModuleType = lean_layers) -> dict[str, nn.Module]:
    """plain, every lean layer, and (blocks) every lean layer but the block's recipe scope, or (a frozen ResNet block)
    its layers lean one by one instead of the block as one Function. Blocks come adapted (``slimtune.adapt`` froze
    them and installed their lean layers); single layers and frozen blocks are frozen and installed here (by
    ``lean_layers``: this checkout's, or an earlier copy's)."""
    plain = plain.to(device, dtype)
    if not any(lean_layers.installed(m) for m in plain.modules()):
        plain.requires_grad_(False)
        lean_layers.install(plain)
    lean = copy.deepcopy(plain)
    for m in plain.modules():
        if lean_layers.installed(m):
            del m.forward
    out = {"plain": plain, "lean": lean}
    top = type(lean.__dict__.get("forward")).__name__
    if top in ("_LeanBlockForward", "_LeanResnetForward"):
        without = copy.deepcopy(lean)
        del without.forward
        adapted = any(p.requires_grad for p in lean.parameters())  # a block with an adapter: its recipes go too
        out["lean, layer by layer, no recipes" if adapted else "lean, layer by layer"] = without
    return out


def interleaved_us(calls: dict[str, Callable[[], object]], device: torch.device, reps: int, rounds: int
                   ) -> dict[str, list[float]]:
    """Each call's µs per run in every round: the calls take turns, ``reps`` runs each per round (after a warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds + 1):
        for name, call in calls.items():
            us = run_us(call, device, reps)
            if round_index:  # the first round warms up
                times[name].append(us)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-channels", type=int, default=320,
                        help="channels at the tiny shape (32 on the CPU: the host's work, little arithmetic)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="a directory holding an earlier copy of the package as slimtune_before")
    args = parser.parse_args(argv)
    packages = [(slimtune, lean_layers)]
    if args.before:
        sys.path.insert(0, args.before)
        before = importlib.import_module("slimtune_before")
        packages.append((before, importlib.import_module("slimtune_before.core.lean_layers")))
    for _, module in packages:
        module.UNET_LEAN_BYTES = 0  # each layer's own cost at both shapes (a UNet applies them from 4 MiB)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    for tiny in (False, True) if device.type == "cuda" else (True,):  # the CPU: the tiny shape alone (minutes else)
        built = [_cases(device, dtype, tiny, args.tiny_channels, package) for package, _ in packages]
        for name, (module, call) in built[0].items():
            models = _variants(module, device, dtype)
            if len(built) > 1:
                models["lean at before"] = _variants(built[1][name][0], device, dtype, packages[1][1])["lean"]
            times = interleaved_us({k: (lambda m=m: call(m)) for k, m in models.items()}, device,
                                   reps=5 if not tiny else 40, rounds=args.rounds)
            base = statistics.median(times["plain"])
            for variant, us in times.items():
                median = statistics.median(us)
                diff = statistics.median(a - b for a, b in zip(us, times["plain"]))
                rows.append([name, "tiny (host)" if tiny else "SD-1.5 64² (GPU)", variant, f"{median:.1f}",
                             f"{diff:+.1f}", f"{median / base:.3f}"])
                print(rows[-1], flush=True)
    text = environment_line() + "\n\n" + markdown_table(
        ["layer", "shape", "variant", "us per fwd+bwd (median of rounds)", "- plain (median of paired rounds)",
         "÷ plain"], rows)
    write_out_text("lean_layer_cost.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
