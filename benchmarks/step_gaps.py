"""Where the GPU waits in a training step: each gap between consecutive GPU kernels, attributed to the step's
phase (forward, backward, optimizer) and to the host op that launched the kernel ending the gap.

Why: run 132's profile has compiled LoRA's step at 66.9 ms of wall against 61.1 ms of GPU kernels (the host queues
it in 57.1 ms), so the GPU sits idle about 5.8 ms a step although the host is faster overall. Issue 19's 0.9x of
PEFT-bf16 is 63.3 ms there: the idle time, not the kernels, is what is left to remove. Where it falls says what to
cut (launches in the forward, the optimizer's host work, the step's first kernels).

How: one step under torch.profiler (CPU and CUDA), its phases marked with ``record_function``. A GPU gap ends when
its next kernel starts; a kernel that starts on an idle GPU starts right after the host launched it, so the gap
is attributed to the phase, and to the innermost host op (CUDA runtime calls skipped) running at that moment (on
the step's thread, or in backward the autograd engine's). Each configuration is built as ``paired_steps.py`` builds it (``--compile`` likewise).
Diagnostic only: the claimed ratios come from ``paired_steps.py``.

    python benchmarks/step_gaps.py --compile --configs lora stacked:lora floor:lora peft-bf16:lora
"""
from __future__ import annotations

import argparse
import bisect
import collections
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from _common import environment_line, markdown_table, write_out_text
from paired_steps import compile_session, parse_config, session_for

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class Span:
    """A named interval on the profiler's clock (µs)."""

    name: str
    start: float
    end: float


def idle_gaps(kernels: Sequence[Span], min_us: float = 0.0) -> list[Span]:
    """The intervals between consecutive kernels (sorted by start; overlapping kernels merged) longer than
    ``min_us``; each gap is named after the kernel that ends it."""
    gaps, busy_until = [], None
    for kernel in sorted(kernels, key=lambda k: k.start):
        if busy_until is not None and kernel.start - busy_until > min_us:
            gaps.append(Span(kernel.name, busy_until, kernel.start))
        busy_until = kernel.end if busy_until is None else max(busy_until, kernel.end)
    return gaps


def innermost_at(ops: Sequence[Span], starts: Sequence[float], t: float, lookback: int = 4000) -> str | None:
    """The innermost of ``ops`` (sorted by start; ``starts`` their starts) running at ``t``: the latest-started one
    that contains it (nested ops start later than their parents)."""
    index = bisect.bisect_right(starts, t)
    for op in reversed(ops[max(0, index - lookback):index]):
        if op.end >= t:
            return op.name
    return None


def attribute(gaps: Sequence[Span], phases: Sequence[Span], ops: Sequence[Span]) -> tuple[dict[str, float], dict[str, list]]:
    """Idle µs per phase (``"before"`` / ``"after"`` outside every phase) and per host op: ``{op: [µs, count]}``."""
    per_phase: dict[str, float] = collections.defaultdict(float)
    per_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    ops = sorted(ops, key=lambda o: o.start)
    starts = [o.start for o in ops]
    for gap in gaps:
        length = gap.end - gap.start
        phase = next((p.name for p in phases if p.start <= gap.end <= p.end), None)
        if phase is None:
            phase = "before" if not phases or gap.end < phases[0].start else "after"
        per_phase[phase] += length
        name = innermost_at(ops, starts, gap.end) or "(no host op)"
        per_op[name][0] += length
        per_op[name][1] += 1
    return dict(per_phase), dict(per_op)


def phased_step(session: Any) -> Callable[[], None]:
    """``TrainingSession.train_step`` with each phase under ``record_function(phase)``."""

    def step() -> None:
        with session.attention():
            with record_function("forward"):
                loss, out = session._forward()
                del out
            with record_function("backward"):
                loss.backward()
        with record_function("optimizer"):
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)

    return step


def profiled_spans(step: Callable[[], None]) -> tuple[list[Span], list[Span], list[Span], float]:
    """One step under the profiler: its kernels, its phases, its host ops (every thread's), and its wall µs."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e6
    kernels, phases, ops = [], [], []
    for event in prof.events():
        span = Span(event.name, event.time_range.start, event.time_range.end)
        if str(event.device_type).endswith("CUDA"):
            if event.name not in PHASES:  # not the phases' GPU-side annotations
                kernels.append(span)
        elif event.name in PHASES:
            phases.append(span)
        elif not event.name.startswith("cu"):  # CUDA runtime and driver calls: the launch, not what launched
            ops.append(span)  # every thread's: backward's ops run on the autograd engine's
    return kernels, sorted(phases, key=lambda p: p.start), ops, wall


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lora", "stacked:lora", "floor:lora", "peft-bf16:lora"])
    parser.add_argument("--preset", default="llama-3.2-3b")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (the median is reported), after 4 warm-up steps")
    parser.add_argument("--top", type=int, default=10, help="host ops shown per configuration")
    parser.add_argument("--compile", action="store_true", help="every decoder layer through torch.compile, both sides")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_gaps.py measures a GPU's idle time: it needs CUDA")
    common = dict(preset=args.preset, rank=args.rank, batch=args.batch, seq=args.seq, device="cuda", dtype="bfloat16")
    rows, detail = [], ""
    for text in args.configs:
        backend, method = parse_config(text)
        session = session_for(backend, method, common)
        if args.compile:
            compile_session(backend, session.model)
        step = phased_step(session)
        for _ in range(4):
            step()
        results = []
        for _ in range(args.steps):
            kernels, phases, ops, wall = profiled_spans(step)
            busy = sum(k.end - k.start for k in kernels)  # kernels on one stream do not overlap
            per_phase, per_op = attribute(idle_gaps(kernels), phases, ops)
            host = {p.name: p.end - p.start for p in phases}
            results.append((wall, busy, per_phase, per_op, host))
        wall, busy, per_phase, per_op, host = sorted(results, key=lambda r: r[0])[len(results) // 2]
        idle = sum(per_phase.values())
        rows.append([text, f"{wall / 1e3:.1f}", f"{busy / 1e3:.1f}", f"{idle / 1e3:.2f}",
                     *(f"{host.get(p, 0) / 1e3:.1f} / {per_phase.get(p, 0) / 1e3:.2f}" for p in PHASES),
                     f"{(per_phase.get('before', 0) + per_phase.get('after', 0)) / 1e3:.2f}"])
        top = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:args.top]
        detail += (f"\n\n{text}: host ops launching the kernel that ends a GPU gap (idle ms, gaps)\n\n"
                   + markdown_table(["host op", "idle ms", "gaps"], [[n[:80], f"{v[0] / 1e3:.2f}", v[1]] for n, v in top]))
        del session, step
        torch.cuda.empty_cache()
    table = markdown_table(["config", "step ms (profiled)", "GPU busy ms", "GPU idle ms",
                            *(f"{p}: host ms / GPU idle ms" for p in PHASES), "idle outside phases ms"], rows)
    out = (f"{environment_line()}\n\n{args.preset}, r={args.rank}, batch {args.batch}, seq {args.seq}, bf16, "
           f"memory=fast{', layers compiled' if args.compile else ''}; median of {args.steps} profiled steps\n\n"
           f"{table}{detail}\n")
    print(out)
    write_out_text("step_gaps.md", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
