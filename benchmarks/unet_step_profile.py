"""Where an SD-1.5 training step's time goes, per configuration: the wall step, the host's time to queue it, the
GPU's kernel time and count (torch.profiler), and the kernels whose total time differs most between the first
configuration and each other — so a step-time gap between slimtune and PEFT (issue 20) is split into host and GPU
work, and the GPU's into kernels. The host's side too: the CUDA runtime calls one step makes (kernel launches,
allocations, synchronizations), the ATen ops whose host (self) time differs most, and Python's garbage collector
(collections per step and their time) — costs a CPU-only proxy cannot see. Diagnostic only: the claimed ratios come
from ``paired_steps.py``.

    python benchmarks/unet_step_profile.py --configs lora stripped:lora peft-bf16:lora
"""
from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
from typing import Sequence

from _common import environment_line, markdown_table, write_out_text
from paired_steps import LEAN_KINDS, compile_session, parse_config, session_for

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


def host_calls(step) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[float, int]]]:
    """One step under torch.profiler's CPU activity: per CUDA runtime call (``cuda*``: launches, allocations,
    synchronizations) and per ATen op, (host self ms, count)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    runtime: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    ops: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for average in prof.key_averages():
        name = average.key
        target = runtime if name.startswith("cuda") else ops if name.startswith("aten::") else None
        if target is not None:
            target[name[:60]][0] += average.self_cpu_time_total / 1000
            target[name[:60]][1] += average.count
    return ({k: (v[0], int(v[1])) for k, v in runtime.items()}, {k: (v[0], int(v[1])) for k, v in ops.items()})


class CollectorClock:
    """Python's garbage collections while active: how many, and their wall time (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.count, self.seconds, self._start = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> "CollectorClock":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def difference_table(first: str, other: str, per: dict[str, dict[str, tuple[float, int]]], top: int) -> list[list]:
    """The ``top`` names whose ms differ most between two configurations, with ms (count) of each."""
    a, b = per[first], per[other]
    names = sorted(set(a) | set(b), key=lambda n: -abs(a.get(n, (0, 0))[0] - b.get(n, (0, 0))[0]))
    return [[n, f"{a.get(n, (0, 0))[0]:.2f} ({a.get(n, (0, 0))[1]})", f"{b.get(n, (0, 0))[0]:.2f} ({b.get(n, (0, 0))[1]})"]
            for n in names[:top]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lora", "stripped:lora", "peft-bf16:lora"])
    parser.add_argument("--preset", default="stable-diffusion-1.5")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after 3 warm-up steps")
    parser.add_argument("--strip-lean", nargs="+", default=["conv", "norm-silu", "geglu"], choices=list(LEAN_KINDS))
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (a language model's preset)")
    parser.add_argument("--compile", action="store_true",
                        help="every configuration's layers through torch.compile, as paired_steps.py --compile "
                             "(the warm-up steps hold the compile time)")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="DIR holds an earlier copy of the package as slimtune_before (before:METHOD configurations)")
    args = parser.parse_args(argv)
    if args.before:
        sys.path.insert(0, args.before)
    common = dict(preset=args.preset, rank=args.rank, batch=args.batch, seq=args.seq, device="cuda", dtype="bfloat16")
    rows, kernels, runtime, ops = [], {}, {}, {}
    for text in args.configs:
        backend, method = parse_config(text)
        session = session_for(backend, method, common, "fast", args.strip_lean)
        if args.compile:
            compile_session(backend, session.model)
        for _ in range(3):  # warm-up
            session.train_step()
        wall, host = [], []
        with CollectorClock() as clock:  # the timed steps' garbage collections
            for _ in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                session.train_step()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                host.append(t1 - t0)
                wall.append(time.perf_counter() - t0)
        gpu_ms, count, kernels[text] = kernel_times(session.train_step)
        runtime[text], ops[text] = host_calls(session.train_step)
        rows.append([text, f"{1000 * statistics.median(wall):.1f}", f"{1000 * statistics.median(host):.1f}",
                     f"{gpu_ms:.1f}", count, f"{clock.count / args.steps:.1f}", f"{1000 * clock.seconds / args.steps:.2f}",
                     sum(n for _, n in runtime[text].values())])
        del session
        torch.cuda.empty_cache()
    text = markdown_table(["config", "wall ms", "host queues ms", "GPU kernel ms", "kernels",
                           "GC collections per step", "GC ms per step", "CUDA runtime calls"], rows)
    first = args.configs[0]
    for other in args.configs[1:]:
        for what, per in (("Kernels", kernels), ("CUDA runtime calls (host self time)", runtime),
                          ("ATen ops (host self time, under the profiler)", ops)):
            text += f"\n\n{what} differing most, {first} against {other} (ms (count) in one step):\n\n"
            text += markdown_table([what.split(" (")[0], first, other], difference_table(first, other, per, args.top))
    out = (f"{environment_line()}\n\n{args.preset}, r={args.rank}, seq {args.seq} (a language model's), bf16, "
           f"memory=fast{', layers compiled' if args.compile else ''}\n\n{text}\n")
    print(out)
    write_out_text("unet_step_profile.md", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
