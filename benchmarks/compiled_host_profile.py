"""Where a compiled training step's host time goes, in Python: each configuration's step (as ``paired_steps.py``
builds it, ``--compile`` likewise) timed without a profiler (the host's time to queue it, and the wall), then run
under cProfile; the functions with the most own time, and slimtune's own functions by cumulative time. Diagnostic
only: the claimed ratios come from ``paired_steps.py``.

    python benchmarks/compiled_host_profile.py --compile --configs lora peft-bf16:lora
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import Sequence

from _common import environment_line, write_out_text
from paired_steps import compile_session, parse_config, session_for

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lora", "peft-bf16:lora"])
    parser.add_argument("--preset", default="llama-3.2-3b")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="float32 on the CPU (a smoke test)")
    args = parser.parse_args(argv)
    device, dtype = ("cpu", "float32") if args.cpu else ("cuda", "bfloat16")
    common = dict(preset=args.preset, rank=args.rank, batch=args.batch, seq=args.seq, device=device, dtype=dtype)
    text = environment_line() + "\n"
    for config in args.configs:
        backend, method = parse_config(config)
        session = session_for(backend, method, common, "fast")
        if args.compile:
            compile_session(backend, session.model)
        for _ in range(args.warmup):
            session.train_step()
        host, wall = [], []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            session.train_step()
            t1 = time.perf_counter()
            sync()
            host.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
        profiler = cProfile.Profile()
        sync()
        profiler.enable()
        for _ in range(args.steps):
            session.train_step()
        sync()
        profiler.disable()
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats("slimtune|paired_steps|profile.py", args.top)
        text += (f"\n## {config}: host {1000 * statistics.median(host):.1f} ms, wall {1000 * statistics.median(wall):.1f}"
                 f" ms a step (median of {args.steps}); cProfile of {args.steps} steps\n\n```\n{stream.getvalue()}```\n")
        del session
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(text)
    write_out_text("compiled_host_profile.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
