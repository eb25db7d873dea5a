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


def worker(kind: str, method: str, steps: int, layers: int, rank: int) -> None:
    """Build ``kind``'s step, run the warm-up and then ``steps`` steps (the driver differences two such runs)."""
    import torch

    from host_proxy import build_step

    torch.set_num_threads(1)
    step = build_step(kind, method, layers, rank)
    for _ in range(WARMUP + steps):
        step()


def instructions(kind: str, method: str, steps: int, layers: int, rank: int, before: str | None) -> int:
    """The instructions callgrind collects for one worker process."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    if before:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [before, env.get("PYTHONPATH")]))
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--worker", kind, method, str(steps), "--layers", str(layers), "--rank", str(rank)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run of {kind} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["lora", "dora"], default="lora")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="a directory holding an earlier copy of the package as slimtune_before")
    parser.add_argument("--stripped", action="store_true",
                        help="also slimtune without its lean RMSNorm and SwiGLU (host_proxy.LLAMA_LEAN)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, method, steps = args.worker
        worker(kind, method, int(steps), args.layers, args.rank)
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    kinds = (*KINDS, *(("stripped",) if args.stripped else ()), *(("before",) if args.before else ()))
    per_step = {}
    for kind in kinds:
        counts = [instructions(kind, args.method, n, args.layers, args.rank, args.before) for n in (0, args.steps)]
        per_step[kind] = (counts[1] - counts[0]) / args.steps
        print(f"{kind}: {per_step[kind] / 1e6:.1f} M instructions per step", flush=True)
    rows = [[kind, f"{per_step[kind] / 1e6:.1f}", f"{per_step[kind] / per_step['peft-bf16']:.3f}",
             f"{per_step[kind] / per_step['alone']:.3f}",
             *((f"{per_step[kind] / per_step['before']:.3f}",) if args.before else ())] for kind in kinds]
    text = (f"{args.method}, {args.layers} layers of hidden 32, r={args.rank}, batch 2 x 8 tokens, fp32, one CPU "
            f"thread; instructions per step = (run with {WARMUP}+{args.steps} steps − run with {WARMUP}) / "
            f"{args.steps}, callgrind\n\n"
            + markdown_table(["build", "M instructions per step", "÷ peft-bf16", "÷ alone",
                              *(("÷ before",) if args.before else ())], rows))
    print(text)
    write_out_text(f"host_instructions_{args.method}.md", environment_line() + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
