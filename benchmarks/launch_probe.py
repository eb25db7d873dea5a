"""Host time per call of the Triton-backed operations, this checkout against an earlier copy of the package.

For each operation (LoHa's ``fold`` and ``fold_grads``, DoRA's ``compose_forward``, ``compose_backward`` and
``dora_vectors``) at the Llama-3.2-3B shapes, the two versions take turns in blocks of ``--calls`` calls; a block's
time (``perf_counter`` around the calls, one synchronize at the end, so the host's queueing is what is timed while
the GPU keeps up) is divided by the calls, and the median over ``--rounds`` blocks is reported with the ratio;
the versions change places from round to round.
Also a LoHa layer forward+backward (the whole hot path, ``FusedLohaLinear``), for the same reason.

    python benchmarks/launch_probe.py --before .before          # .before/slimtune_before: `git archive REF slimtune`
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from typing import Callable, Sequence

from _common import JsonlSink, environment_line, markdown_table, write_out_text

import torch


def _time(fn: Callable[[], object], calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def operations(pkg: str, dev: torch.device) -> dict[str, Callable[[], object]]:
    """The probed operations of the package ``pkg`` (``slimtune`` or ``slimtune_before``) on fixed inputs."""
    new = pkg == "slimtune"
    loha = importlib.import_module(f"{pkg}.methods.loha.triton_kernels" if new else f"{pkg}.kernels.loha_triton")
    dora = importlib.import_module(f"{pkg}.methods.dora.triton_kernels" if new else f"{pkg}.kernels.dora_triton")
    slim = importlib.import_module(pkg)
    g = torch.Generator(device=dev).manual_seed(0)
    bf = dict(device=dev, dtype=torch.bfloat16)
    m, k, r, n = 3072, 8192, 32, 2048
    w = torch.randn(m, k, generator=g, **bf)
    w1a, w2a = (torch.randn(m, r, generator=g, **bf) for _ in range(2))
    w1b, w2b = (torch.randn(r, k, generator=g, **bf) for _ in range(2))
    grad = torch.randn(m, k, generator=g, **bf)
    z = torch.randn(n, m, generator=g, **bf)
    dy = torch.randn(n, m, generator=g, **bf)
    vec = torch.rand(4, m, generator=g, device=dev) + 0.5
    wa, gram = torch.randn(m, r, generator=g, device=dev), torch.randn(r, r, generator=g, device=dev)
    layer = torch.nn.Sequential(torch.nn.Linear(k, m, bias=False, **bf))
    slim.adapt(layer, slim.LohaConfig(r=r, alpha=r, target_modules=["0"]))
    x = torch.randn(2, 1024, k, generator=g, **bf)

    def layer_step() -> None:
        layer(x).sum().backward()

    def layer_forward() -> None:
        with torch.no_grad():
            layer(x)

    return {
        "LoHa layer forward only (no grad)": layer_forward,
        "loha fold": lambda: loha.fold(w, w1a, w1b, w2a, w2b, 0.5),
        "loha fold_grads (+W')": lambda: loha.fold_grads(grad, w1a, w1b, w2a, w2b, 0.5, w=w),
        "dora compose_forward": lambda: dora.compose_forward(z, vec[0], g=vec[1]),
        "dora compose_backward": lambda: dora.compose_backward(dy, z, vec[1], dy_sum=True, scale=vec[2]),
        "dora vectors": lambda: dora.dora_vectors(wa, gram, w1a.float(), vec[2], vec[3], 0.5, 0.0),
        "LoHa layer fwd+bwd (3072x8192, 2048 tokens)": layer_step,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, metavar="DIR", help="directory holding slimtune_before")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top host ops of 5 LoHa layer steps per version")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.before)
    dev = torch.device("cuda")
    print(environment_line(), flush=True)
    ops = {pkg: operations(pkg, dev) for pkg in ("slimtune", "slimtune_before")}
    # the earlier copy once more with its launch shortcut off (Triton's own path), where it had one
    dispatch = importlib.import_module("slimtune_before.kernels.dispatch")
    if hasattr(dispatch, "FAST_LAUNCH"):
        def triton_path(fn: Callable[[], object]) -> Callable[[], object]:
            def run() -> object:
                dispatch.FAST_LAUNCH = False
                try:
                    return fn()
                finally:
                    dispatch.FAST_LAUNCH = True
            return run
        ops["before, Triton's launch"] = {name: triton_path(fn) for name, fn in ops["slimtune_before"].items()}
    # this checkout once more with fold_grads' counters keyed by the raw stream handle (as the earlier copy did)
    kernels = importlib.import_module("slimtune.methods.loha.triton_kernels")
    real_key = kernels.current_stream_key
    raw = getattr(torch._C, "_cuda_getCurrentRawStream")

    def raw_key_variant(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            kernels.current_stream_key = lambda d: ("cuda", d.index, raw(d.index if d.index is not None else 0))
            try:
                return fn()
            finally:
                kernels.current_stream_key = real_key
        return run
    ops["this, raw stream key"] = {name: raw_key_variant(fn) for name, fn in ops["slimtune"].items()}
    real_counters = kernels._counters

    def fresh_counters_variant(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            kernels._counters = lambda device, n: torch.zeros(max(n, 1), device=device, dtype=torch.int32)
            try:
                return fn()
            finally:
                kernels._counters = real_counters
        return run
    ops["this, fresh zero counters per call"] = {name: fresh_counters_variant(fn)
                                                 for name, fn in ops["slimtune"].items()}
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "current_stream"):
        t0 = time.perf_counter()
        for _ in range(10000):
            accel.current_stream(dev)
        t1 = time.perf_counter()
        for _ in range(10000):
            torch.cuda.current_stream(0).cuda_stream
        t2 = time.perf_counter()
        for _ in range(10000):
            raw(0)
        t3 = time.perf_counter()
        print(f"µs per call: torch.accelerator.current_stream {(t1 - t0) * 100:.2f}, torch.cuda.current_stream "
              f"{(t2 - t1) * 100:.2f}, raw {(t3 - t2) * 100:.2f}", flush=True)
    for pkg in ops:  # compile and warm up
        for fn in ops[pkg].values():
            _time(fn, 3)
    if hasattr(dispatch, "FAST_LAUNCH"):
        print(f"before's shortcut still on after warm-up: {dispatch.FAST_LAUNCH}", flush=True)
    times: dict[tuple[str, str], list[float]] = {}
    order = list(ops)
    for round_index in range(args.rounds):
        for name in ops["slimtune"]:
            calls = max(1, args.calls // 20) if "layer" in name else args.calls
            shift = round_index % len(order)  # each version takes each position in turn (no position bias)
            for pkg in order[shift:] + order[:shift]:
                times.setdefault((pkg, name), []).append(_time(ops[pkg][name], calls))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for pkg in ("slimtune", "slimtune_before"):
            step = ops[pkg]["LoHa layer fwd+bwd (3072x8192, 2048 tokens)"]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                         with_stack=True) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(f"\n== {pkg}: 5 LoHa layer steps\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50),
                  flush=True)
            for event in prof.events():
                if event.name == "aten::copy_" and event.self_cpu_time_total > 50:
                    print(f"{pkg}: copy_ {event.self_cpu_time_total:.0f} us, shapes {event.input_shapes}, "
                          f"stack {[f for f in event.stack if 'slimtune' in f or 'launch_probe' in f][:6]}")
    if args.profile:
        import cProfile
        import io
        import pstats

        for pkg in ("slimtune", "slimtune_before"):
            step = ops[pkg]["LoHa layer fwd+bwd (3072x8192, 2048 tokens)"]
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(50):
                step()
            torch.cuda.synchronize()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
            print(f"\n== {pkg}: cProfile of 50 LoHa layer steps\n" + text.getvalue()[-4500:], flush=True)
    sink = JsonlSink("launch_probe.jsonl")
    rows = []
    variants = list(ops)
    for name in ops["slimtune"]:
        medians = {v: statistics.median(times[v, name]) for v in variants}
        ratios = {v: statistics.median(a / b for a, b in zip(times["slimtune", name], times[v, name]))
                  for v in variants[1:]}
        sink.write({"op": name, "us": {v: t * 1e6 for v, t in medians.items()}, "ratio_medians": ratios})
        rows.append([name, *(f"{medians[v] * 1e6:.1f}" for v in variants), *(f"{ratios[v]:.3f}" for v in ratios)])
    text = (f"{environment_line()}\n\nµs per call, median of {args.rounds} blocks of {args.calls} calls (layer: "
            f"{max(1, args.calls // 20)}), the two versions taking turns\n\n"
            + markdown_table(["operation", *(f"{v} µs" for v in variants),
                              *(f"this ÷ {v} (median of paired blocks)" for v in variants[1:])], rows) + "\n")
    print("\n" + text, flush=True)
    write_out_text("launch_probe.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
