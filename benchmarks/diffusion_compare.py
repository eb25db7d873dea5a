"""Diffusion models, slimtune vs PEFT: the seed study's Stable Diffusion table for every method, and HRA on the ~4B DiT.

Part 1 — Stable Diffusion 1.5 (preset ``stable-diffusion-1.5``: the diffusers UNet, 859.5M, plus the frozen CLIP-L
text encoder held on the GPU as a training script keeps it), random weights in bf16, batch 4, 64x64 latents, a
77-token text context, MSE on random noise targets, AdamW(lr=1e-4), ``--steps`` steps. Methods: the full fine-tune
(``none``, the seed's "no optimizations"), LoRA, QLoRA (``lora`` on NF4 base weights), DoRA, HRA on the attention
layers (diffusers' / LyCORIS' attention set); LoCon, LoHa, LoKr adding the ResNet and resampler convolutions (LyCORIS'
default set) — ``slimtune.models.workload.default_targets``, the same modules for both libraries. Backends:
``slimtune`` and ``peft-bf16`` (PEFT with bf16 adapters, ``autocast_adapter_dtype=False``; ``--backends`` adds
``peft``, its float32 default). Issue 20's target: every method's peak >= 20% below PEFT bf16's (ratio <= 0.80) at
no more step time (ratio <= 1.00).

Part 2 — HRA r=32 on ``flux-dit-4b`` (FLUX.2-klein-4B's size in FLUX.1's layout, 3.89B, 1024px: 4096 image + 512
text tokens), batch 1, with and without gradient checkpointing, slimtune and PEFT bf16. Target: fits in 16 GB.

Every configuration runs in its own process (``python -m slimtune profile-child``, :mod:`slimtune.memory.subproc`):
"after creation" is ``torch.cuda.memory_allocated()`` once model, adapter and optimizer exist, "after 1 step" the
same after the first step, peak ``max_memory_allocated()`` over all steps, step time the median after the warm-up
steps. Results: one JSON line per run in ``$OUT/diffusion_compare.jsonl``, the tables in
``$OUT/diffusion_compare.md`` and on stdout (``$OUT`` defaults to ``./out``).

    python benchmarks/diffusion_compare.py            # GPU, both parts (about 20 processes)
    python benchmarks/diffusion_compare.py --skip-dit # the SD table only
    python benchmarks/diffusion_compare.py --skip-dit --memory balanced  # slimtune recomputing the feed-forwards
    python benchmarks/diffusion_compare.py --quick    # CPU smoke test: tiny-unet and tiny-dit-4b, float32
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

from _common import JsonlSink, environment_line, fmt_ratio, markdown_table, package_version, write_out_text

from slimtune.memory.options import ProfileOptions
from slimtune.memory.result import ProfileResult
from slimtune.memory.subproc import run_children

UNET_METHODS = ("none", "lora", "qlora", "dora", "hra", "locon", "loha", "lokr")
GIB = 2**30
UNIT = ["GiB", GIB]  # --quick reports MiB
CARD = 16 * 10**9  # "16 GB"
PEAK_TARGET, STEP_TARGET = 0.80, 1.00


def unet_options(args: argparse.Namespace) -> list[ProfileOptions]:
    """Part 1's configurations: each method x backend (the full fine-tune once: it has no adapter)."""
    out = []
    for method in args.methods:
        for backend in (["slimtune"] if method == "none" else args.backends):
            out.append(ProfileOptions(preset=args.unet, method="lora" if method == "qlora" else method,
                                      quant="nf4" if method == "qlora" else "none", rank=args.rank,
                                      batch=args.batch, steps=args.steps, device=args.device, dtype=args.dtype,
                                      backend=backend, memory=args.memory if backend == "slimtune" else "fast"))
    return out


def dit_options(args: argparse.Namespace) -> list[ProfileOptions]:
    """Part 2's configurations: HRA r=32 per backend, without and with gradient checkpointing."""
    return [ProfileOptions(preset=args.dit, method="hra", rank=args.dit_rank, batch=1, steps=args.steps,
                           device=args.device, dtype=args.dtype, backend=backend, grad_checkpointing=ckpt)
            for ckpt in args.dit_grad_ckpt for backend in args.backends]


def method_label(r: ProfileResult) -> str:
    return "qlora" if r.quant == "nf4" else r.method


def gib(n: int | None) -> str:
    """Bytes in the report's unit (GiB; MiB with --quick)."""
    return "—" if n is None else f"{n / UNIT[1]:.2f}"


def cell(r: ProfileResult | None) -> list[str]:
    """created / after 1 step / peak, step (s) — or the failure."""
    if r is None:
        return ["", "", "", ""]
    if not r.ok:
        return [r.status, "", gib(r.peak_bytes), ""]
    step = "—" if r.step_time_s is None else f"{r.step_time_s:.3f}"
    return [gib(r.mem_created_bytes), gib(r.mem_after_step_bytes), gib(r.peak_bytes), step]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def unet_table(results: Sequence[ProfileResult], backends: Sequence[str]) -> str:
    """The seed's table (after creation / after 1 step) with peak and step time, per backend, and the ratios."""
    by_key = {(method_label(r), r.backend): r for r in results}
    methods = list(dict.fromkeys(method_label(r) for r in results))
    header = ["method"]
    for backend in backends:
        header += [f"{backend} created", "after 1 step", "peak", "s/step"]
    header += ["peak ÷ peft-bf16", "step ÷ peft-bf16", "target"]
    rows = []
    for method in methods:
        ours, theirs = by_key.get((method, "slimtune")), by_key.get((method, "peft-bf16"))
        row: list[Any] = [method]
        for backend in backends:
            row += cell(by_key.get((method, backend)) if method != "none" or backend == "slimtune" else None)
        peak = ratio(ours and ours.ok and ours.peak_bytes, theirs and theirs.ok and theirs.peak_bytes)
        step = ratio(ours and ours.ok and ours.step_time_s, theirs and theirs.ok and theirs.step_time_s)
        met = "—" if peak is None or step is None else (
            "met" if peak <= PEAK_TARGET and step <= STEP_TARGET else "missed")
        row += [fmt_ratio(peak), fmt_ratio(step), met]
        rows.append(row)
    return markdown_table(header, rows)


def dit_table(results: Sequence[ProfileResult]) -> str:
    rows = []
    for r in results:
        fits = "—" if not r.peak_bytes else ("yes" if r.ok and r.peak_bytes <= CARD else "no")
        rows.append([r.backend, "on" if r.grad_checkpointing else "off", r.status, gib(r.mem_created_bytes),
                     gib(r.peak_bytes), f"{r.peak_bytes / 1e9:.2f}" if r.peak_bytes else "—", fits,
                     "—" if r.step_time_s is None else f"{r.step_time_s:.3f}"])
    return markdown_table(["backend", "grad ckpt", "status", f"created {UNIT[0]}", f"peak {UNIT[0]}", "peak GB",
                           "≤ 16 GB", "s/step"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny-unet / tiny-dit-4b, float32")
    parser.add_argument("--methods", nargs="+", default=list(UNET_METHODS), choices=UNET_METHODS)
    parser.add_argument("--backends", nargs="+", default=["slimtune", "peft-bf16"],
                        choices=("slimtune", "peft", "peft-bf16"))
    parser.add_argument("--rank", type=int, default=16, help="Part 1's rank (alpha = rank)")
    parser.add_argument("--dit-rank", type=int, default=32, help="Part 2's HRA rank")
    parser.add_argument("--dit-grad-ckpt", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--skip-dit", action="store_true")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    parser.add_argument("--memory", default="fast", choices=("fast", "balanced"),
                        help="slimtune's memory setting in Part 1 (balanced: the feed-forward projections "
                             "recomputed in backward); PEFT runs as it comes")
    args = parser.parse_args(argv)
    quick = args.quick
    for key, value in dict(batch=1 if quick else 4, steps=2 if quick else 8, device="cpu" if quick else "cuda",
                           dtype="float32" if quick else "bfloat16").items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.unet, args.dit = ("tiny-unet", "tiny-dit-4b") if quick else ("stable-diffusion-1.5", "flux-dit-4b")
    args.dit_grad_ckpt = [value == "on" for value in args.dit_grad_ckpt]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        UNIT[:] = ["MiB", 2**20]
    os.environ.setdefault("OUT", "out")
    env = f"{environment_line()} · diffusers {package_version('diffusers')}"
    print(env, flush=True)
    sink = JsonlSink("diffusion_compare.jsonl")
    t0 = time.perf_counter()

    def done(_: int, result: ProfileResult) -> None:
        sink.write(result.to_dict())
        error = f"  ({(result.error or '')[-200:]})" if result.error else ""
        print(f"[{time.perf_counter() - t0:7.1f} s] {result.label:<48} {result.status:<6} created "
              f"{gib(result.mem_created_bytes):>6}  peak {gib(result.peak_bytes):>6} {UNIT[0]}  step "
              f"{'—' if result.step_time_s is None else f'{result.step_time_s:.3f} s'}{error}", flush=True)

    text = [env, ""]
    failed = False
    if not args.skip_unet:
        results = run_children(unet_options(args), on_done=done, timeout=args.timeout)
        failed |= not all(r.ok for r in results)
        text += [f"### {args.unet}: batch {args.batch}, {args.dtype}, r={args.rank} alpha={args.rank}, "
                 f"slimtune memory={args.memory}, "
                 f"{args.steps} steps ({UNIT[0]}; s/step median after warm-up; ratios slimtune ÷ PEFT bf16, target "
                 f"peak ≤ {PEAK_TARGET:.2f} and step ≤ {STEP_TARGET:.2f})", "", unet_table(results, args.backends), ""]
    if not args.skip_dit:
        results = run_children(dit_options(args), on_done=done, timeout=args.timeout)
        failed |= not all(r.ok for r in results)
        text += [f"### {args.dit}: HRA r={args.dit_rank}, batch 1, {args.dtype}, {args.steps} steps (target: peak ≤ "
                 "16 GB)", "", dit_table(results), ""]
    report = "\n".join(text)
    print("\n" + report, flush=True)
    write_out_text("diffusion_compare.md", report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
