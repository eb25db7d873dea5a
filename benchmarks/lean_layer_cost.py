"""What each lean frozen layer and recipe scope costs, one layer at a time: fwd+bwd per call, plain against lean.

At the Stable Diffusion 1.5 shapes of its highest-resolution blocks (batch 4, 64x64 latents: 320 channels, 4,096
tokens) the GPU decides a call's time; at a tiny shape (batch 1, 8x8) the host does. So the two columns split a lean
layer's price into the GPU's work (an extra norm pass, a gather) and the host's (a Python autograd node where
PyTorch's is C++, saved-tensor hooks). Each case builds one module, and a copy with ``slimtune.core.lean_layers``
installed (blocks: with an adapter, the block's recipe scope on or off), and times ``module(x).sum().backward()``.

    python benchmarks/lean_layer_cost.py          # CUDA (bf16) if available, else the CPU (float32, tiny shape only)
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

from _common import environment_line, markdown_table, write_out_text
from host_cost import per_call_us

import torch
from torch import nn

import slimtune
from slimtune.core import lean_layers


def _cases(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict[str, tuple[nn.Module, Callable]]:
    """name -> (plain module, call(module) running one fwd+bwd)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    batch, side = (1, 8) if tiny else (4, 64)
    tokens = side * side

    def image() -> torch.Tensor:
        return torch.randn(batch, 320, side, side, device=device, dtype=dtype, requires_grad=True)

    def sequence() -> torch.Tensor:
        return torch.randn(batch, tokens, 320, device=device, dtype=dtype, requires_grad=True)

    x_img, x_seq = image(), sequence()
    context = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    temb = torch.randn(batch, 1280, device=device, dtype=dtype)
    torch.manual_seed(0)
    block = BasicTransformerBlock(320, 8, 40, cross_attention_dim=768)
    slimtune.adapt(block, slimtune.LoraConfig(r=16, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                    "ff.net.0.proj", "ff.net.2"]))
    resnet = ResnetBlock2D(in_channels=320, out_channels=320, temb_channels=1280)
    slimtune.adapt(resnet, slimtune.LoraConfig(r=16, target_modules=["conv1", "conv2"]))
    return {
        "conv 3x3": (nn.Conv2d(320, 320, 3, padding=1), lambda m: m(x_img).sum().backward()),
        "GroupNorm + SiLU": (nn.Sequential(nn.GroupNorm(32, 320), nn.SiLU()), lambda m: m(x_img).sum().backward()),
        "GEGLU": (GEGLU(320, 1280), lambda m: m(x_seq).sum().backward()),
        "transformer block, LoRA": (block, lambda m: m(x_seq, encoder_hidden_states=context).sum().backward()),
        "ResNet block, LoCon": (resnet, lambda m: m(x_img, temb).sum().backward()),
    }


def _variants(plain: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """plain, every lean layer, and (blocks) every lean layer but the block's recipe scope. Blocks come adapted
    (``slimtune.adapt`` froze them and installed their lean layers); single layers are frozen and installed here."""
    plain = plain.to(device, dtype)
    if not any(lean_layers.installed(m) for m in plain.modules()):
        plain.requires_grad_(False)
        lean_layers.install(plain)
    lean = copy.deepcopy(plain)
    for m in plain.modules():
        if lean_layers.installed(m):
            del m.forward
    out = {"plain": plain, "lean": lean}
    if type(lean.__dict__.get("forward")).__name__ == "_LeanBlockForward":
        unscoped = copy.deepcopy(lean)
        del unscoped.forward
        out["lean, no recipes"] = unscoped
    return out


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for tiny in (False, True) if device.type == "cuda" else (True,):  # the CPU: the tiny shape alone (minutes else)
        for name, (module, call) in _cases(device, dtype, tiny).items():
            times = {k: per_call_us(lambda m=m: call(m), device, reps=50 if not tiny else 200)
                     for k, m in _variants(module, device, dtype).items()}
            base = times["plain"]
            for variant, us in times.items():
                rows.append([name, "tiny (host)" if tiny else "SD-1.5 64² (GPU)", variant, f"{us:.1f}",
                             f"{us / base:.3f}"])
                print(rows[-1], flush=True)
    text = environment_line() + "\n\n" + markdown_table(
        ["layer", "shape", "variant", "us per fwd+bwd", "÷ plain"], rows)
    write_out_text("lean_layer_cost.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
