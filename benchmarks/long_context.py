"""Long sequences (issue 18): slimtune's ``memory`` settings against PEFT + transformers' gradient checkpointing.

Part 1 — the Llama-3.2-3B shape, LoRA r=32 (alpha 32, the seven projections), seq 2048, batch 4, bf16, the
profiler's protocol (:mod:`slimtune.memory.subproc`: one process per configuration, peak
``max_memory_allocated()`` over all steps, step time the median after the warm-up). Configurations: slimtune
``memory="balanced"`` (chunked loss + per-layer checkpointing) and ``"max-fit"`` (+ checkpointed inputs in pinned
CPU memory); PEFT with bf16 adapters (``autocast_adapter_dtype=False``) and transformers' gradient checkpointing,
once as the protocol keeps the outputs (the logits live into the next step, as in
``../shared/bench/peft_baseline.py``) and once releasing them before backward (a lean loop). Target: slimtune's peak
<= 16 GB at a step time <= 0.95x PEFT+GC's.

Part 2 — the longest sequence that fits a 24 GB card, batch 1, Llama-3.1-8B shape with NF4 base weights (double
quantisation) + LoRA r=16 on the seven projections: slimtune ``memory="max-fit"`` against PEFT + bitsandbytes NF4
(``Linear4bit``, double quantisation) + transformers' gradient checkpointing (bf16 adapters). Each side builds its
model once in its own process; then the allocator is capped at 24e9 bytes
(``torch.cuda.set_per_process_memory_fraction``: what the caching allocator may reserve, a 24 GB card less nothing
for the CUDA context) and one training step (forward, backward, AdamW, zero_grad) runs per tried length: doubling
from ``--start`` until one fails (out of memory) or ``--max-seq``, then bisection to ``--granule`` tokens while the
side's time budget lasts. An out-of-memory step is cleaned up in the process (graph freed, cache emptied) before the
next try. Target: slimtune's longest >= 2x PEFT's.

    python benchmarks/long_context.py                  # one GPU: both parts (about 8 minutes on an H200)
    python benchmarks/long_context.py --skip-part1     # the bisection only
    python benchmarks/long_context.py --quick          # CPU smoke test: tiny-llama, small lengths, no cap

Output: tables on stdout, and with ``$OUT`` set ``long_context.jsonl`` / ``long_context.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from _common import REPO_ROOT, JsonlSink, environment_line, fmt_ratio, markdown_table, write_out_text

import torch

from slimtune.memory.options import ProfileOptions
from slimtune.memory.result import is_out_of_memory
from slimtune.memory.subproc import run_children

GB = 10**9
GIB = 2**30
PEAK_TARGET_BYTES = 16 * GB
STEP_TARGET = 0.95
CARD_BYTES = 24 * GB
SEQ_TARGET = 2.0


def part1_options(args: argparse.Namespace) -> list[tuple[str, ProfileOptions]]:
    common: dict[str, Any] = dict(preset=args.preset3b, method="lora", rank=args.rank3b, batch=args.batch,
                                  seq=args.seq, steps=args.steps, device=args.device, dtype=args.dtype)
    ours = [(f"slimtune {memory}" + (f", last {plain} layers plain" if plain else ""),
             ProfileOptions(backend="slimtune", memory=memory, plain_layers=plain, **common))
            for memory in args.memory3b for plain in args.plain_layers]
    return [*ours,
            ("PEFT bf16 + GC (protocol)", ProfileOptions(backend="peft-bf16", grad_checkpointing=True, **common)),
            ("PEFT bf16 + GC (lean)", ProfileOptions(backend="peft-bf16", grad_checkpointing=True,
                                                     release_outputs=True, **common))]


def part1(args: argparse.Namespace, sink: JsonlSink) -> str:
    labelled = part1_options(args)
    results = run_children([o for _, o in labelled], timeout=args.timeout,
                           on_done=lambda i, r: print(f"  {labelled[i][0]}: {r.status} peak "
                                                      f"{(r.peak_bytes or 0) / GB:.2f} GB step {r.step_time_s}",
                                                      flush=True))
    rows = []
    by_label = dict(zip([label for label, _ in labelled], results))
    for (label, _), r in zip(labelled, results):
        sink.write({"part": 1, "label": label, **r.to_dict()})
    baselines = [by_label["PEFT bf16 + GC (protocol)"], by_label["PEFT bf16 + GC (lean)"]]
    for label, r in by_label.items():
        row: list[Any] = [label, r.status, f"{(r.peak_bytes or 0) / GB:.2f}", f"{(r.peak_bytes or 0) / GIB:.2f}",
                          "—" if r.step_time_s is None else f"{r.step_time_s:.3f}"]
        for base in baselines:
            ok = r.ok and base.ok and base.step_time_s
            row += [fmt_ratio(r.peak_bytes / base.peak_bytes if ok else None),
                    fmt_ratio(r.step_time_s / base.step_time_s if ok else None)]
        if label.startswith("slimtune") and r.ok:
            worst_step = max((r.step_time_s / b.step_time_s for b in baselines if b.ok and b.step_time_s),
                             default=None)
            met = r.peak_bytes <= PEAK_TARGET_BYTES and worst_step is not None and worst_step <= STEP_TARGET
            row.append("met" if met else "missed")
        else:
            row.append("")
        rows.append(row)
    head = (f"### Part 1 — {args.preset3b}, LoRA r={args.rank3b}, seq {args.seq}, batch {args.batch}, {args.dtype}, "
            f"{args.steps} steps (target: peak <= 16 GB at step <= {STEP_TARGET}x PEFT+GC's, both PEFT rows)")
    table = markdown_table(["configuration", "status", "peak GB", "peak GiB", "s/step", "peak ÷ PEFT+GC protocol",
                            "step ÷ PEFT+GC protocol", "peak ÷ PEFT+GC lean", "step ÷ PEFT+GC lean", "target"], rows)
    return f"{head}\n\n{table}\n"


# ---- part 2: the longest sequence (one side per process: ``--side NAME`` runs it here) ----

def side_options(args: argparse.Namespace, side: str) -> ProfileOptions:
    common: dict[str, Any] = dict(preset=args.preset8b, method="lora", rank=args.rank8b, batch=1, seq=args.start,
                                  steps=1, device=args.device, dtype=args.dtype, quant="nf4", release_outputs=True)
    if side == "slimtune":
        return ProfileOptions(backend="slimtune", memory=args.memory8b, **common)
    return ProfileOptions(backend="peft-bf16", grad_checkpointing=True, **common)


def longest_here(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """Build ``side``'s model once, cap the allocator, then double and bisect the sequence length."""
    from slimtune.memory.profile import TrainingSession, workload_module

    options = side_options(args, side).resolved()
    session = TrainingSession.prepare(options)
    device = torch.device(options.device)
    cuda = device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(1)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.card / total),
                                                  device.index if device.index is not None else 0)
    tries: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def attempt(seq: int) -> bool:
        session.inputs = workload_module().make_inputs(options.preset, session.model, 1, seq, device,
                                                       options.dtype, generator)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        ok, error = True, None
        try:
            session.train_step()
            if cuda:
                torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - only an allocation failure means "does not fit"
            if not is_out_of_memory(exc):
                raise
            ok, error = False, str(exc).splitlines()[0][:160]
        session.inputs = {}
        if session.optimizer is not None:
            session.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        if cuda:
            torch.cuda.empty_cache()
        tries.append(dict(seq=seq, fits=ok, seconds=round(time.perf_counter() - t0, 2), peak_bytes=peak,
                          error=error))
        print(f"    {side}: seq {seq:>6} {'fits' if ok else 'OOM '} {tries[-1]['seconds']:6.1f} s"
              f" peak {(peak or 0) / GB:.2f} GB", flush=True)
        return ok

    seq, fit, fail = args.start, 0, None
    while seq <= args.max_seq:
        if not attempt(seq):
            fail = seq
            break
        fit, seq = seq, seq * 2
    while fail is not None and fail - fit > args.granule and time.perf_counter() - t_start < args.side_budget:
        mid = (fit + fail) // 2 // args.granule * args.granule
        if mid <= fit:
            break
        if attempt(mid):
            fit = mid
        else:
            fail = mid
    return dict(side=side, longest=fit, first_fail=fail, capped=fail is None, tries=tries,
                card_bytes=args.card, options=dataclasses.asdict(options))


def run_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """``side``'s bisection in a new process (a clean allocator), its result from the last JSON line."""
    argv = [sys.executable, __file__, "--side", side, *args.passthrough]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, cwd=REPO_ROOT)
    sys.stdout.write(proc.stdout.rsplit("\n{", 1)[0] + "\n")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(side=side, longest=None, error=proc.stderr.strip()[-1500:])


def part2(args: argparse.Namespace, sink: JsonlSink) -> str:
    results = {}
    for side in ("peft", "slimtune"):
        results[side] = result = run_side(args, side)
        sink.write({"part": 2, **result})
    ours, theirs = results["slimtune"].get("longest"), results["peft"].get("longest")
    ratio = ours / theirs if ours and theirs else None
    rows = []
    for side, r in results.items():
        label = (f"slimtune NF4 + LoRA, memory={args.memory8b}" if side == "slimtune"
                 else "PEFT + bitsandbytes NF4 + GC (bf16 adapters)")
        bound = "" if not r.get("capped") else f" (reached --max-seq {args.max_seq})"
        rows.append([label, f"{r.get('longest')}{bound}", r.get("first_fail") or "—",
                     ", ".join(f"{t['seq']}{'' if t['fits'] else '✗'}" for t in r.get("tries", []))
                     or r.get("error", "")[-300:]])
    head = (f"### Part 2 — {args.preset8b}, NF4 + LoRA r={args.rank8b}, batch 1, {args.dtype}, allocator capped at "
            f"{args.card / GB:.0f} GB (target: slimtune's longest >= {SEQ_TARGET:.0f}x PEFT's; "
            f"ratio {fmt_ratio(ratio)})")
    table = markdown_table(["configuration", "longest that fits", "first that failed", "tries (✗ = out of memory)"],
                           rows)
    return f"{head}\n\n{table}\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny-llama, short lengths, no cap")
    parser.add_argument("--skip-part1", action="store_true")
    parser.add_argument("--skip-part2", action="store_true")
    parser.add_argument("--seq", type=int, default=None, help="part 1's sequence length (default 2048)")
    parser.add_argument("--batch", type=int, default=None, help="part 1's batch (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="part 1's steps (default 8)")
    parser.add_argument("--start", type=int, default=None, help="part 2's first length (default 4096)")
    parser.add_argument("--max-seq", type=int, default=None, help="part 2's longest try (default 131072)")
    parser.add_argument("--granule", type=int, default=None, help="part 2's bisection step (default 1024)")
    parser.add_argument("--side-budget", type=float, default=240.0,
                        help="seconds of part 2 tries per side after which bisection stops (default 240)")
    parser.add_argument("--memory3b", nargs="+", default=["balanced", "max-fit"], choices=("balanced", "max-fit"),
                        help="part 1's slimtune settings (default: both)")
    parser.add_argument("--plain-layers", nargs="+", type=int, default=[0],
                        help="part 1: the last N layers left un-checkpointed, one run per N (default: 0)")
    parser.add_argument("--memory8b", default="max-fit", choices=("balanced", "max-fit"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    quick = args.quick
    defaults = dict(seq=64 if quick else 2048, batch=2 if quick else 4, steps=3 if quick else 8,
                    start=64 if quick else 4096, max_seq=512 if quick else 131072, granule=64 if quick else 1024)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = "cpu" if quick else "cuda"
    args.dtype = "float32" if quick else "bfloat16"
    args.preset3b, args.preset8b = ("tiny-llama", "tiny-llama") if quick else ("llama-3.2-3b", "llama-3.1-8b")
    args.rank3b, args.rank8b = 32, 16
    args.card = 2**62 if quick else CARD_BYTES
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side is not None:
        print(json.dumps(longest_here(args, args.side)), flush=True)
        return 0
    os.environ.setdefault("OUT", "out")
    env = environment_line()
    print(env, flush=True)
    sink = JsonlSink("long_context.jsonl")
    text = [env, ""]
    if not args.skip_part1:
        text.append(part1(args, sink))
    if not args.skip_part2:
        text.append(part2(args, sink))
    report = "\n".join(text)
    print("\n" + report, flush=True)
    write_out_text("long_context.md", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
