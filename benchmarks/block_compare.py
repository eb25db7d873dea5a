"""slimtune against PEFT one layer or UNet block at a time: fwd+bwd µs of the plain (frozen) module, slimtune's
adapted copy and PEFT's (bf16 adapters on a GPU, ``autocast_adapter_dtype=False``), in interleaved rounds.

At a tiny shape (batch 1, 8x8, ``--tiny-channels``) a call's time is the host's work — Python, dispatch, and on a GPU
each kernel's launch and cuDNN's per-call setup — so the ``- PEFT`` column says which block kinds a host-bound step
(SD-1.5's, RESULTS.md run 79) loses or wins in. On a GPU the SD-1.5 shape of the finest level (batch 4, 64x64, 320
channels) runs too: the GPU's side. Cases: a 3x3 convolution and a Linear alone, a diffusers ``ResnetBlock2D``
(conv1, conv2, time_emb_proj adapted: LyCORIS' default for the convolution methods) and a ``BasicTransformerBlock``
(attention and feed-forward Linears), each with LoCon / LoRA, LoKr and LoHa.

    python benchmarks/block_compare.py                         # CUDA (bf16) if available, else the CPU (float32)
    python benchmarks/block_compare.py --methods lokr --before DIR    # and an earlier copy's slimtune
    python benchmarks/block_compare.py --lean-off --profile    # slimtune without lean layers too; kernel tables

``--before DIR``: DIR holds an earlier copy of the package as ``slimtune_before`` (as ``paired_steps.py`` takes it);
its adapted copy joins the rounds. The UNet lean layers apply as a UNet applies them, from
``lean_layers.UNET_LEAN_BYTES`` (``--unet-lean-bytes 0``: at every size, as at SD-1.5's two finest levels).
``--lean-off`` adds slimtune's copy run with no lean layer (the threshold raised for its calls alone), and
``--profile`` one profiled fwd+bwd per variant at the SD-1.5 shape: GPU kernel ms and count, and the kernels that
differ most between slimtune and PEFT-bf16. Diagnostic only: the step ratios come from ``paired_steps.py``.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
from types import ModuleType
from typing import Callable

from _common import NO_LEAN_BYTES, environment_line, markdown_table, write_out_text
from lean_layer_cost import interleaved_us
from unet_step_profile import difference_table, kernel_times

import torch
from torch import nn

import slimtune
from slimtune.core import lean_layers

METHODS = ("lora", "lokr", "loha")
RESNET_TARGETS = ["conv1", "conv2", "time_emb_proj"]
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _config(package: ModuleType | None, method: str, rank: int, targets: list[str]):
    """slimtune's (``package``: this checkout's or an earlier copy's) or, for None, PEFT's config."""
    if package is None:
        import peft

        if method == "lora":
            return peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
        return {"lokr": peft.LoKrConfig, "loha": peft.LoHaConfig}[method](r=rank, alpha=rank, target_modules=targets)
    cls = {"lora": package.LoraConfig, "lokr": package.LoKrConfig, "loha": package.LoHaConfig}[method]
    return cls(r=rank, alpha=rank, target_modules=targets)


def _perturbed(model: nn.Module) -> nn.Module:
    """Every trainable tensor moved off its init (LoRA's B and LoKr's w1 start at zero)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-2)
    return model


def _cases(device: torch.device, dtype: torch.dtype, tiny: bool, channels: int
           ) -> dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[nn.Module], object]]]:
    """name -> (a fresh plain module, its target names, a call running one fwd+bwd)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    batch, side = (1, 8) if tiny else (4, 64)
    c = channels if tiny else 320
    image = torch.randn(batch, c, side, side, device=device, dtype=dtype, requires_grad=True)
    sequence = torch.randn(batch, side * side, c, device=device, dtype=dtype, requires_grad=True)
    context = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    temb = torch.randn(batch, 1280, device=device, dtype=dtype)

    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1))

    def linear() -> nn.Module:
        return nn.Sequential(nn.Linear(c, c))

    def resnet() -> nn.Module:
        return ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=1280)

    def transformer() -> nn.Module:
        return BasicTransformerBlock(c, 8, c // 8, cross_attention_dim=768)

    return {
        "conv 3x3": (conv, ["0"], lambda m: m(image).sum().backward()),
        "Linear": (linear, ["0"], lambda m: m(sequence).sum().backward()),
        "ResNet block": (resnet, RESNET_TARGETS, lambda m: m(image, temb).sum().backward()),
        "transformer block": (transformer, TRANSFORMER_TARGETS,
                              lambda m: m(sequence, encoder_hidden_states=context).sum().backward()),
    }


def _variants(make: Callable[[], nn.Module], targets: list[str], method: str, rank: int, device: torch.device,
              dtype: torch.dtype, packages: dict[str, ModuleType]) -> dict[str, nn.Module]:
    """plain, slimtune's (and an earlier copy's) and PEFT's copies of one freshly built module."""
    import peft

    torch.manual_seed(0)
    plain = make().to(device, dtype)
    models = {"plain": copy.deepcopy(plain).requires_grad_(False)}
    for name, package in packages.items():
        models[name] = _perturbed(package.adapt(copy.deepcopy(plain), _config(package, method, rank, targets)))
    models["peft-bf16"] = _perturbed(peft.get_peft_model(copy.deepcopy(plain), _config(None, method, rank, targets),
                                                         autocast_adapter_dtype=False))
    return models


def _without_lean(modules: list[ModuleType], run: Callable[[], object]) -> object:
    """``run()`` with every package's UNet lean threshold raised past any tensor (no lean layer), then restored."""
    saved = [m.UNET_LEAN_BYTES for m in modules]
    for m in modules:
        m.UNET_LEAN_BYTES = NO_LEAN_BYTES
    try:
        return run()
    finally:
        for m, value in zip(modules, saved):
            m.UNET_LEAN_BYTES = value


def _profile_text(title: str, calls: dict[str, Callable[[], object]], top: int = 8) -> str:
    """One profiled fwd+bwd per variant (after a warm call): kernel ms and count, and the kernels differing most
    between slimtune and PEFT-bf16, as markdown."""
    totals, per = [], {}
    for name, run in calls.items():
        run()
        ms, count, per[name] = kernel_times(run)
        totals.append([name, f"{ms:.3f}", count])
    return (f"\n\n### {title}: one profiled fwd+bwd at the SD-1.5 shape\n\n"
            + markdown_table(["variant", "GPU kernel ms", "kernels"], totals) + "\n\n"
            + markdown_table(["kernel", "slimtune ms (count)", "peft-bf16 ms (count)"],
                             difference_table("slimtune", "peft-bf16", per, top)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="lora: LoCon on the convolutions, LoRA on the Linears")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny-channels", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cases", nargs="+", default=None, help="a subset of the cases (default: all)")
    parser.add_argument("--unet-lean-bytes", type=int, default=None,
                        help="the UNet lean layers' size threshold (default: the library's)")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="a directory holding an earlier copy of the package as slimtune_before")
    parser.add_argument("--lean-off", action="store_true",
                        help="also slimtune's copy with no lean layer (the UNet lean threshold raised for its calls)")
    parser.add_argument("--profile", action="store_true",
                        help="on a GPU, one profiled fwd+bwd per variant at the SD-1.5 shape: kernel tables")
    args = parser.parse_args(argv)
    packages: dict[str, ModuleType] = {"slimtune": slimtune}
    lean_modules = [lean_layers]
    if args.before:
        sys.path.insert(0, args.before)
        packages["before"] = importlib.import_module("slimtune_before")
        lean_modules.append(importlib.import_module("slimtune_before.core.lean_layers"))
    if args.unet_lean_bytes is not None:
        for module in lean_modules:
            module.UNET_LEAN_BYTES = args.unet_lean_bytes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows, profiles = [], []
    for tiny in (True, False) if device.type == "cuda" else (True,):
        for case, (make, targets, call) in _cases(device, dtype, tiny, args.tiny_channels).items():
            if args.cases and case not in args.cases:
                continue
            for method in args.methods:
                models = _variants(make, targets, method, args.rank, device, dtype, packages)
                calls = {k: (lambda m=m: call(m)) for k, m in models.items()}
                if args.lean_off:
                    models["lean off"] = models["slimtune"]
                    calls["lean off"] = lambda m=models["slimtune"]: _without_lean(lean_modules, lambda: call(m))
                times = interleaved_us(calls, device, reps=40 if tiny else 5, rounds=args.rounds)
                if args.profile and not tiny and device.type == "cuda":
                    profiles.append(_profile_text(f"{case}, {method}", calls))
                for variant in models:
                    if variant == "peft-bf16":
                        continue
                    median = statistics.median(times[variant])
                    over_peft = statistics.median(a - b for a, b in zip(times[variant], times["peft-bf16"]))
                    ratio = statistics.median(a / b for a, b in zip(times[variant], times["peft-bf16"]))
                    rows.append([case, "tiny (host)" if tiny else "SD-1.5 64² (GPU)", method, variant,
                                 f"{median:.1f}", f"{statistics.median(times['peft-bf16']):.1f}",
                                 f"{over_peft:+.1f}", f"{ratio:.3f}"])
                    print(rows[-1], flush=True)
    text = environment_line() + f"\n\nr={args.rank}, {dtype}\n\n" + markdown_table(
        ["case", "shape", "method", "variant", "us per fwd+bwd", "PEFT-bf16 us", "- PEFT-bf16 (median of rounds)",
         "÷ PEFT-bf16"], rows) + "".join(profiles)
    write_out_text("block_compare.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
