"""What the UNet lean layers' size threshold (``slimtune.core.lean_layers.UNET_LEAN_BYTES``) buys in memory: the
activations an SD-1.5 step saves for backward, per threshold and method, against PEFT-bf16's — counted on the CPU
(the profiler's saved-tensor accounting, the same tensors a GPU step saves; cuDNN workspaces and other temporaries
are not counted there). The step-time side of the trade needs a GPU (``paired_steps.py --unet-lean-bytes N``); this
says which thresholds keep issue 20's memory half (a peak ≥ 20% below PEFT's) before a lease is spent on them.

    python benchmarks/lean_threshold_memory.py                               # SD-1.5, batch 4, bf16; ~1 min a row
    python benchmarks/lean_threshold_memory.py --methods lokr --thresholds-mib 4 16
"""
from __future__ import annotations

import argparse
import gc
import sys

from _common import NO_LEAN_BYTES, environment_line, markdown_table, write_out_text

import torch

from slimtune.core import lean_layers
from slimtune.memory.options import ProfileOptions
from slimtune.memory.profile import TrainingSession


def saved_and_state(options: ProfileOptions) -> tuple[int, int]:
    """``(saved activations, the rest)`` in bytes at one step's peak: the activations the step saves for backward,
    and parameters + buffers + gradients + optimizer state."""
    result = TrainingSession.prepare(options).run()
    if result.status != "ok":
        raise RuntimeError(f"{options.backend} {options.method}: {result.status} {result.error}")
    parts = result.cpu_breakdown
    return parts["saved_activations"], parts["params_buffers"] + parts["gradients"] + parts["optimizer_state"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="stable-diffusion-1.5")
    parser.add_argument("--methods", nargs="+", default=["lora", "locon", "lokr"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--thresholds-mib", nargs="+", type=float, default=[4, 8, 16, 32],
                        help="UNET_LEAN_BYTES values in MiB (no lean layer at all is always added)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    default = lean_layers.UNET_LEAN_BYTES
    thresholds = [int(m * 2**20) for m in args.thresholds_mib] + [NO_LEAN_BYTES]
    rows = []
    for method in args.methods:
        common = dict(preset=args.preset, method=method, rank=args.rank, batch=args.batch, steps=1, device="cpu",
                      dtype="bfloat16", release_outputs=True)
        peft_saved, peft_state = saved_and_state(ProfileOptions(backend="peft-bf16", **common))
        gc.collect()
        rows.append([method, "PEFT-bf16", f"{peft_saved / 2**30:.3f}", f"{peft_state / 2**30:.3f}", "1.000", "1.000"])
        print(rows[-1], flush=True)
        for threshold in thresholds:
            lean_layers.UNET_LEAN_BYTES = threshold
            try:
                saved, state = saved_and_state(ProfileOptions(backend="slimtune", **common))
            finally:
                lean_layers.UNET_LEAN_BYTES = default
            gc.collect()
            name = "no lean layer" if threshold == NO_LEAN_BYTES else f"lean from {threshold / 2**20:g} MiB"
            rows.append([method, name, f"{saved / 2**30:.3f}", f"{state / 2**30:.3f}", f"{saved / peft_saved:.3f}",
                         f"{(saved + state) / (peft_saved + peft_state):.3f}"])
            print(rows[-1], flush=True)
    text = (f"{environment_line()}\n\n{args.preset}, r={args.rank}, batch {args.batch}, bfloat16, one step on the CPU "
            f"(saved-tensor accounting; temporaries not counted); slimtune memory=fast\n\n"
            + markdown_table(["method", "slimtune's lean layers", "saved activations GiB", "weights + grads + optimizer GiB",
                              "saved ÷ PEFT-bf16", "both ÷ PEFT-bf16"], rows) + "\n")
    write_out_text("lean_threshold_memory.md", text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
