"""Whole-model comparison, slimtune LoRA vs PEFT LoRA, on the PEFT baseline protocol.

Protocol (``shared/bench/peft_baseline.py``): Llama-3.2-3B shape with random weights in bf16, LoRA r=32
alpha=32 on all seven projections, batch 4, AdamW(lr=1e-4), random tokens as inputs and labels, 8 steps,
median step time of steps 4-8, peak ``torch.cuda.max_memory_allocated()``. One process per configuration
(``python -m slimtune profile-child``, started by :func:`slimtune.memory.subproc.run_children`), run one after
another:

* seq 512 and 2048: slimtune, PEFT default (float32 adapters), PEFT bf16 adapters
  (``autocast_adapter_dtype=False``);
* ``--gc``: at the longest seq also all three with transformers' gradient checkpointing;
* ``--full``: a full fine-tune (no adapter) at every seq, for reference.

Results: one JSON line per configuration in ``$OUT/model_compare.jsonl`` and the markdown table in
``$OUT/model_compare.md`` (when ``OUT`` is set); a compact line per run and the table on stdout.
``--quick``: tiny-llama on the CPU, for a smoke test.

    python benchmarks/model_compare.py --gc          # GPU, about 3-4 minutes on an H100
    python benchmarks/model_compare.py --quick --gc  # CPU smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Sequence

from _common import JsonlSink, environment_line, fmt_ratio, markdown_table, write_out_text

from slimtune.memory.options import ProfileOptions
from slimtune.memory.report import ratio, step_rule
from slimtune.memory.result import ProfileResult
from slimtune.memory.subproc import run_children

BACKENDS = ("slimtune", "peft", "peft-bf16")
GIB = 2**30


def build_configs(args: argparse.Namespace) -> list[ProfileOptions]:
    common = dict(preset=args.preset, rank=args.rank, batch=args.batch, steps=args.steps, device=args.device,
                  dtype=args.dtype, release_outputs=args.release_outputs)
    configs = []
    for seq in args.seqs:
        peft_here = args.peft_seqs is None or seq in args.peft_seqs
        yardstick = args.methods != ["lora"]  # slimtune LoRA at the same seq, the other methods are held to it
        if yardstick:
            configs.append(ProfileOptions(method="lora", backend="slimtune", seq=seq, **common))
        configs += [ProfileOptions(method=method, backend=b, seq=seq, **common) for method in args.methods
                    for b in args.backends if (b == "slimtune" or peft_here)
                    and not (yardstick and method == "lora" and b == "slimtune")]
        if args.full:
            configs.append(ProfileOptions(method="none", backend="slimtune", seq=seq, **common))
    if args.gc:
        seq = max(args.seqs)
        configs += [ProfileOptions(method=method, backend=b, seq=seq, grad_checkpointing=True, **common)
                    for method in args.methods for b in args.backends]
    return configs


def compact(result: ProfileResult) -> str:
    peak = "—" if result.peak_bytes is None else f"{result.peak_bytes / GIB:.2f} GB"
    step = "—" if result.step_time_s is None else f"{result.step_time_s:.4f} s"
    gc = " +GC" if result.grad_checkpointing else ""
    line = f"{result.method:>4} {result.backend:<9}{gc:<4} seq {result.seq:>5}: {result.status:<5} peak {peak:>10}  step {step:>10}"
    if not result.ok and result.error:
        line += f"  ({result.error[-300:]})"
    return line


def summary_table(results: Sequence[ProfileResult], method: str = "lora") -> str:
    """One row per (seq, gc): GB / s of each backend and the slimtune/PEFT ratios."""
    def cell(r: ProfileResult | None) -> str:
        if r is None:
            return ""
        if not r.ok:
            return r.status + (f" (peak {r.peak_bytes / GIB:.2f})" if r.peak_bytes else "")
        return f"{r.peak_bytes / GIB:.2f} / {r.step_time_s:.3f}"

    with_full = any(r.method == "none" for r in results)
    groups: dict[tuple[int, bool], dict[str, ProfileResult]] = {}
    for r in results:
        backend = "full" if r.method == "none" else r.backend if r.method == method else f"{r.method} {r.backend}"
        groups.setdefault((r.seq, r.grad_checkpointing), {})[backend] = r
    rows = []
    for (seq, gc), by in groups.items():
        ours, default, bf16 = by.get("slimtune"), by.get("peft"), by.get("peft-bf16")

        def rat(other: ProfileResult | None, field: str) -> str:
            if ours is None or other is None or not (ours.ok and other.ok):
                return "—"
            return fmt_ratio(ratio(getattr(ours, field), getattr(other, field)))

        full = [cell(by.get("full"))] if with_full else []
        lora = by.get("lora slimtune")
        yardstick = [] if method == "lora" else [cell(lora), rat(lora, "peak_bytes"), rat(lora, "step_time_s")]
        rows.append([f"{seq}{' + GC' if gc else ''}", cell(ours), cell(default), cell(bf16), *full,
                     rat(default, "peak_bytes"), rat(bf16, "peak_bytes"), rat(default, "step_time_s"),
                     rat(bf16, "step_time_s"), *yardstick])
    header = ["seq", f"slimtune {method} GB / s", "PEFT default GB / s", "PEFT bf16 GB / s",
              *(["full FT GB / s"] if with_full else []), "peak ÷ default", "peak ÷ bf16", "step ÷ default",
              "step ÷ bf16", *([] if method == "lora" else ["slimtune LoRA GB / s", "peak ÷ slimtune LoRA",
                                                            "step ÷ slimtune LoRA"])]
    return markdown_table(header, rows)


def merge_rounds(results: Sequence[ProfileResult]) -> list[ProfileResult]:
    """One result per configuration: the median step time over its rounds, the largest peak."""
    groups: dict[tuple, list[ProfileResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.backend, r.seq, r.grad_checkpointing), []).append(r)
    merged = []
    for runs in groups.values():
        ok = [r for r in runs if r.ok]
        if len(ok) < len(runs) or len(runs) == 1:
            merged.append(next((r for r in runs if not r.ok), runs[0]))
            continue
        best = dataclasses.replace(ok[0], step_time_s=statistics.median(r.step_time_s for r in ok),
                                   peak_bytes=max(r.peak_bytes for r in ok))
        merged.append(best)
    return merged


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama on the CPU (smoke test)")
    parser.add_argument("--method", dest="methods", nargs="+", default=["lora"],
                        help="adapter method(s) (default lora); other methods are also compared with slimtune LoRA "
                        "at the same seq, measured once for all of them")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--peft-seqs", type=int, nargs="+", default=None,
                        help="run the PEFT backends only at these seqs (default: all)")
    parser.add_argument("--gc", action="store_true", help="also gradient checkpointing at the longest seq")
    parser.add_argument("--full", action="store_true", help="also a full fine-tune at every seq")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--seqs", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--release-outputs", action="store_true",
                        help="drop each step's logits before backward (the protocol keeps them alive)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, interleaved (the GPU host's CPU speed drifts "
                        "between processes; CPU-bound steps need it)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per GPU process (default 300)")
    args = parser.parse_args(argv)
    defaults = (dict(preset="tiny-llama", seqs=[64, 128], batch=2, rank=8, steps=4, device="cpu", dtype="float32")
                if args.quick else
                dict(preset="llama-3.2-3b", seqs=[512, 2048], batch=4, rank=32, steps=8, device="cuda",
                     dtype="bfloat16"))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configs = build_configs(args)
    print(environment_line(), flush=True)
    print(f"{len(configs)} configurations, one process each: {args.preset}, r={args.rank}, batch {args.batch}, "
          f"{args.steps} steps, {args.dtype}", flush=True)
    methods = "-".join(args.methods)
    tag = "" if methods == "lora" and args.preset == "llama-3.2-3b" else f"_{methods}_{args.preset}"
    tag += "_released" if args.release_outputs else ""
    sink = JsonlSink(f"model_compare{tag}.jsonl")
    t0 = time.perf_counter()

    def done(_i: int, result: ProfileResult) -> None:
        sink.write(result.to_dict())
        print(f"[{time.perf_counter() - t0:6.1f} s] {compact(result)}", flush=True)

    results = run_children(configs * args.rounds, on_done=done, timeout=args.timeout)
    merged = merge_rounds(results)
    table = "\n\n".join(summary_table([r for r in merged if r.method in (method, "lora")], method)
                         for method in args.methods)
    header = (f"{args.preset}, {methods} r={args.rank} alpha={args.rank}, batch {args.batch}, {args.dtype}, "
              f"{args.steps} steps ({step_rule(args.steps)}), {args.rounds} interleaved round(s) of processes "
              f"(step time: median over rounds, peak: max){'; logits released before backward' if args.release_outputs else ''}; cells: peak GB (GiB, 2^30) / s per step; "
              "ratios: slimtune ÷ PEFT (< 1: slimtune lower)")
    text = f"{environment_line()}\n\n{header}\n\n{table}\n"
    print("\n" + text, flush=True)
    write_out_text(f"model_compare{tag}.md", text)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
