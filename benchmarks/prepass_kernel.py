"""GPU time of DoRA's step-vector pre-pass (``slimtune.methods.dora.prepass``) on a model, against the bytes it must
read: one launch forms every DoRA layer's vectors, reading each frozen W once (``Σ d_out·d_in`` elements) with A and
B. At a long sequence the step is GPU-bound, so this launch's time is step time (RESULTS.md runs 76 and 81: DoRA at
seq 2048).

    python benchmarks/prepass_kernel.py                  # Llama-3.2-3B shape, r=32, bf16 (CUDA)
    python benchmarks/prepass_kernel.py --preset tiny-llama --rank 8
"""
from __future__ import annotations

import argparse
import statistics
from typing import Sequence

from _common import environment_line, markdown_table, write_out_text

import torch

from slimtune.memory.options import ProfileOptions
from slimtune.memory.profile import TrainingSession
from slimtune.methods.dora import DoraLinear
from slimtune.methods.dora.prepass import VectorPrepass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.2-3b")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    session = TrainingSession.prepare(ProfileOptions(method="dora", backend="slimtune", preset=args.preset,
                                                     rank=args.rank, batch=1, seq=16, device="cuda",
                                                     dtype="bfloat16"))
    model = session.model
    hooks = [h for h in model._forward_pre_hooks.values() if isinstance(h, VectorPrepass)]
    layers = [m for m in model.modules() if isinstance(m, DoraLinear)]
    read = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size()
               + m.lora_A.numel() * m.lora_A.element_size() + m.lora_B.numel() * m.lora_B.element_size()
               for m in layers)
    flops = sum(2 * m.base_layer.weight.numel() * m.lora_A.shape[0] for m in layers)  # B·A, tile by tile
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(args.repeats + 3):
        for _ in range(12):  # ~15 ms of GEMMs queued ahead: the host's ~2 ms per pre-pass is enqueued behind them,
            busy @ busy      # so the events time the GPU's work alone
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for hook in hooks:
            hook(model, ())
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    tickets = sum(m.prepass_slot.ticket is not None for m in layers)
    aligned = [entry[2] for hook in hooks for entry in hook._uploaded.values()]
    table = markdown_table(["layers (tickets)", "aligned groups", "median ms", "GB read", "GB/s", "TFLOP/s (B·A)"],
                           [[f"{len(layers)} ({tickets})", aligned, f"{ms:.3f}", f"{read / 1e9:.2f}",
                             f"{read / ms / 1e6:.0f}", f"{flops / ms / 1e9:.1f}"]])
    text = f"{environment_line()}\n\n{args.preset}, r={args.rank}, bf16: the pre-pass of one forward\n\n{table}\n"
    print(text)
    write_out_text("prepass_kernel.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
