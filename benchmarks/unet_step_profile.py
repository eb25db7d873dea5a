"""Where an SD-1.5 training step's time goes, per configuration: the wall step, the host's time to queue it, the
GPU's kernel time and count (torch.profiler), and the kernels whose total time differs most between the first
configuration and each other — so a step-time gap between slimtune and PEFT (issue 20) is split into host and GPU
work, and the GPU's into kernels. Diagnostic only: the claimed ratios come from ``paired_steps.py``.

    python benchmarks/unet_step_profile.py --configs lora stripped:lora peft-bf16:lora
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Sequence

from _common import environment_line, markdown_table, write_out_text
from paired_steps import LEAN_KINDS, parse_config, session_for

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_times(step) -> tuple[float, int, dict[str, tuple[float, int]]]:
    """One step under torch.profiler: total kernel ms, kernel count, and per kernel name (ms, count)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            per[event.name[:70]][0] += event.device_time_total / 1000 if hasattr(event, "device_time_total") \
                else event.cuda_time_total / 1000
            per[event.name[:70]][1] += 1
    total = sum(v[0] for v in per.values())
    return total, sum(int(v[1]) for v in per.values()), {k: (v[0], int(v[1])) for k, v in per.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lora", "stripped:lora", "peft-bf16:lora"])
    parser.add_argument("--preset", default="stable-diffusion-1.5")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strip-lean", nargs="+", default=["conv", "norm-silu", "geglu"], choices=list(LEAN_KINDS))
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    common = dict(preset=args.preset, rank=args.rank, batch=None, seq=512, device="cuda", dtype="bfloat16")
    rows, kernels = [], {}
    for text in args.configs:
        backend, method = parse_config(text)
        session = session_for(backend, method, common, "fast", args.strip_lean)
        wall, host = [], []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            session.train_step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
        gpu_ms, count, kernels[text] = kernel_times(session.train_step)
        rows.append([text, f"{1000 * statistics.median(wall[3:]):.1f}", f"{1000 * statistics.median(host[3:]):.1f}",
                     f"{gpu_ms:.1f}", count])
        del session
        torch.cuda.empty_cache()
    text = markdown_table(["config", "wall ms", "host queues ms", "GPU kernel ms", "kernels"], rows)
    first = args.configs[0]
    for other in args.configs[1:]:
        names = set(kernels[first]) | set(kernels[other])
        diff = sorted(names, key=lambda n: -abs(kernels[first].get(n, (0, 0))[0] - kernels[other].get(n, (0, 0))[0]))
        table = [[n, f"{kernels[first].get(n, (0, 0))[0]:.2f} ({kernels[first].get(n, (0, 0))[1]})",
                  f"{kernels[other].get(n, (0, 0))[0]:.2f} ({kernels[other].get(n, (0, 0))[1]})"]
                 for n in diff[:args.top]]
        text += f"\n\nKernels differing most, {first} against {other} (ms (count) in one step):\n\n"
        text += markdown_table(["kernel", first, other], table)
    out = f"{environment_line()}\n\n{args.preset}, r={args.rank}, bf16, memory=fast\n\n{text}\n"
    print(out)
    write_out_text("unet_step_profile.md", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
