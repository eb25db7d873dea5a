"""Where an SD-1.5 training step's time goes, per configuration: the wall step, the host's time to queue it, the
GPU's kernel time and count (torch.profiler), and the kernels whose total time differs most between the first
configuration and each other — so a step-time gap between slimtune and PEFT (issue 20) is split into host and GPU
work, and the GPU's into kernels. The host's side too: the CUDA runtime calls one step makes (kernel launches,
allocations, synchronizations), the ATen ops whose host (self) time differs most, and Python's garbage collector
(collections per step and their time) — costs a CPU-only proxy cannot see; and where the GPU idles within the
profiled step (the gaps between its kernels, by length, the longest with the kernels around them). Diagnostic only:
the claimed ratios come from ``paired_steps.py``.

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


def kernel_times(step) -> tuple[float, int, dict[str, tuple[float, int]], list]:
    """One step under torch.profiler: total kernel ms, kernel count, per kernel name (ms, count), and the GPU's idle
    intervals between its first and last kernel (:func:`idle_gaps`)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    device_events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    for event in device_events:
        per[event.name[:70]][0] += event.device_time_total / 1000 if hasattr(event, "device_time_total") \
            else event.cuda_time_total / 1000
        per[event.name[:70]][1] += 1
    total = sum(v[0] for v in per.values())
    return (total, sum(int(v[1]) for v in per.values()), {k: (v[0], int(v[1])) for k, v in per.items()},
            idle_gaps(device_events))


def idle_gaps(events: list) -> list[tuple[float, str, str]]:
    """``(µs, kernel before, kernel after)`` for each interval in which no GPU work ran, between the first kernel's
    start and the last one's end (events' ``time_range`` in µs), longest first."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in events)
    gaps, reach, last = [], spans[0][1] if spans else 0.0, spans[0][2] if spans else ""
    for start, end, name in spans[1:]:
        if start > reach:
            gaps.append((start - reach, last, name))
        if end >= reach:
            reach, last = end, name
    return sorted(gaps, reverse=True)


def gap_rows(gaps: list[tuple[float, str, str]], top: int) -> tuple[list, list]:
    """The idle time by gap length (count, ms), and the ``top`` longest gaps with their neighbours."""
    classes = (("under 5 µs", 0, 5), ("5-50 µs", 5, 50), ("50-500 µs", 50, 500), ("500 µs and over", 500, 1e12))
    summary = []
    for label, lo, hi in classes:
        within = [g for g, *_ in gaps if lo <= g < hi]
        summary.append([label, len(within), f"{sum(within) / 1e3:.2f}"])
    return summary, [[f"{g:.0f}", before, after] for g, before, after in gaps[:top]]


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
    parser.add_argument("--top-gaps", type=int, default=10, help="the longest GPU idle gaps listed per configuration")
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
    rows, kernels, runtime, ops, gaps = [], {}, {}, {}, {}
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
        gpu_ms, count, kernels[text], gaps[text] = kernel_times(session.train_step)
        runtime[text], ops[text] = host_calls(session.train_step)
        rows.append([text, f"{1000 * statistics.median(wall):.1f}", f"{1000 * statistics.median(host):.1f}",
                     f"{gpu_ms:.1f}", f"{sum(g for g, *_ in gaps[text]) / 1e3:.1f}", count,
                     f"{clock.count / args.steps:.1f}", f"{1000 * clock.seconds / args.steps:.2f}",
                     sum(n for _, n in runtime[text].values())])
        del session
        torch.cuda.empty_cache()
    text = markdown_table(["config", "wall ms", "host queues ms", "GPU kernel ms", "GPU idle ms", "kernels",
                           "GC collections per step", "GC ms per step", "CUDA runtime calls"], rows)
    for config, config_gaps in gaps.items():
        summary, longest = gap_rows(config_gaps, args.top_gaps)
        text += (f"\n\nGPU idle in {config}'s profiled step, by gap length:\n\n"
                 + markdown_table(["gaps", "count", "ms"], summary)
                 + "\n\nLongest gaps:\n\n" + markdown_table(["µs", "kernel before", "kernel after"], longest))
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
