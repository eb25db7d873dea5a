"""Host work per training step, counted in instructions: ``host_proxy.py``'s tiny-width Llama step under valgrind's
callgrind, which counts the instructions the process executes — the same count for the same code and inputs,
whatever else the machine is doing (the time ratios of ``host_proxy.py`` move by several percent between runs on a
shared box). What a step costs the host on a GPU machine is this work (Python, dispatcher, autograd) plus a launch
per kernel, which ``host_proxy.py`` counts.

Each build runs twice in its own process — warm-up steps only, then warm-up plus ``--steps`` steps — and the
difference divided by ``--steps`` is one step's instructions (imports and model building cancel out). Hash
randomisation is off (``PYTHONHASHSEED=0``), so the counts repeat.

    python benchmarks/host_instructions.py                                  # LoRA: slimtune, alone, PEFT-bf16
    python benchmarks/host_instructions.py --method dora --before DIR       # and the earlier copy in DIR
    python benchmarks/host_instructions.py --worker slimtune lora 5         # one process (what the driver runs)
    python benchmarks/host_instructions.py --preset tiny-sd15 --method lokr --before DIR   # SD-1.5's layout, tiny

``--preset tiny-sd15``: ``paired_steps.py --cpu``'s step of that preset instead (SD-1.5's UNet layout at tiny widths,
batch 1, float32, its lean layers from ``--unet-lean-bytes``, 2048 by default: the two finest levels, as 4 MiB in
SD-1.5 at batch 4), for the UNet methods; ``alone`` is not run there.

Needs valgrind (Debian's package). ``--before DIR`` as in ``host_proxy.py`` (``slimtune_before`` inside DIR).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import Sequence

from _common import environment_line, markdown_table, write_out_text

KINDS = ("slimtune", "alone", "peft-bf16")
WARMUP = 3


def worker(kind: str, method: str, steps: int, layers: int, rank: int, preset: str | None = None,
           unet_lean_bytes: int = 2048) -> None:
    """Build ``kind``'s step, run the warm-up and then ``steps`` steps (the driver differences two such runs)."""
    import torch

    torch.set_num_threads(1)
    if preset is None:
        from host_proxy import build_step

        step = build_step(kind, method, layers, rank)
    else:  # paired_steps.py --cpu's step of the preset, its lean layers from unet_lean_bytes (the earlier copy's too)
        import importlib

        from paired_steps import session_for

        for package in ("slimtune", "slimtune_before") if kind == "before" else ("slimtune",):
            importlib.import_module(f"{package}.core.lean_layers").UNET_LEAN_BYTES = unet_lean_bytes
        common = dict(preset=preset, rank=rank, batch=None, seq=512, device="cpu", dtype="float32")
        step = session_for(kind, method, common).train_step
    for _ in range(WARMUP + steps):
        step()


def instructions(kind: str, method: str, steps: int, layers: int, rank: int, before: str | None,
                 preset: str | None = None, unet_lean_bytes: int = 2048) -> int:
    """The instructions callgrind collects for one worker process."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    if before:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [before, env.get("PYTHONPATH")]))
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--worker", kind, method, str(steps), "--layers", str(layers), "--rank", str(rank),
               *(("--preset", preset, "--unet-lean-bytes", str(unet_lean_bytes)) if preset else ())]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run of {kind} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["lora", "dora", "locon", "loha", "lokr"], default="lora",
                        help="locon / loha / lokr with --preset only")
    parser.add_argument("--preset", default=None, help="tiny-sd15: paired_steps.py --cpu's step of that preset")
    parser.add_argument("--unet-lean-bytes", type=int, default=2048, metavar="N",
                        help="with --preset: the UNet's lean layers from N bytes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="a directory holding an earlier copy of the package as slimtune_before")
    parser.add_argument("--stripped", action="store_true",
                        help="also slimtune without its lean RMSNorm and SwiGLU (host_proxy.LLAMA_LEAN)")
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                        help="count only these builds (each run takes minutes under callgrind); default: all")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, method, steps = args.worker
        worker(kind, method, int(steps), args.layers, args.rank, args.preset, args.unet_lean_bytes)
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    if args.preset is None and args.method not in ("lora", "dora"):
        parser.error(f"--method {args.method} needs --preset (the tiny Llama has no convolutions)")
    if args.preset and args.stripped:
        parser.error("--stripped strips the lean Llama layers: not with --preset")
    kinds = (*(k for k in KINDS if not (args.preset and k == "alone")), *(("stripped",) if args.stripped else ()),
             *(("before",) if args.before else ()))
    if args.kinds:
        unknown = set(args.kinds) - set(kinds)
        if unknown:
            parser.error(f"--kinds {' '.join(sorted(unknown))}: not among this run's builds ({', '.join(kinds)})")
        kinds = tuple(k for k in kinds if k in args.kinds)
    per_step = {}
    for kind in kinds:
        counts = [instructions(kind, args.method, n, args.layers, args.rank, args.before, args.preset,
                               args.unet_lean_bytes) for n in (0, args.steps)]
        per_step[kind] = (counts[1] - counts[0]) / args.steps
        print(f"{kind}: {per_step[kind] / 1e6:.1f} M instructions per step", flush=True)
    ratios = [k for k in ("peft-bf16", "alone", "before") if k in per_step]
    rows = [[kind, f"{per_step[kind] / 1e6:.1f}", *(f"{per_step[kind] / per_step[k]:.3f}" for k in ratios)]
            for kind in kinds]
    model = (f"{args.preset} (batch 1, its lean layers from {args.unet_lean_bytes} bytes)" if args.preset
             else f"{args.layers} layers of hidden 32, batch 2 x 8 tokens")
    text = (f"{args.method}, {model}, r={args.rank}, fp32, one CPU thread; instructions per step = (run with "
            f"{WARMUP}+{args.steps} steps − run with {WARMUP}) / {args.steps}, callgrind\n\n"
            + markdown_table(["build", "M instructions per step", *(f"÷ {k}" for k in ratios)], rows))
    print(text)
    stem = f"host_instructions_{args.preset}_{args.method}" if args.preset else f"host_instructions_{args.method}"
    write_out_text(f"{stem}.md", environment_line() + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
