"""How well ``slimtune plan`` predicts: the estimator's peak against the measured profile's, per configuration.

For each configuration the measured side runs in its own process (``python -m slimtune profile-child``, via
:func:`slimtune.memory.subproc.run_child`: 4 steps, peak ``torch.cuda.max_memory_allocated()`` after model
creation) and the estimate comes from :func:`slimtune.memory.estimate.estimate_memory` (meta device, nothing
allocated). The issue's target: estimate / measured peak within 10% (0.90-1.10) on every GPU configuration.

Default grid (15 configurations, bf16, rank 16, the PEFT baseline protocol's loop — outputs kept to the next step):

* Llama-3.2-3B, batch 4: LoRA / DoRA / HRA / LoHa / LoKr at seq 512, LoRA and LoHa at seq 2048, LoRA at seq 2048
  with gradient checkpointing;
* Llama-3.1-8B with an NF4 base (``slimtune.quantize``), LoRA r=16, batch 4, seq 512, with and without gradient
  checkpointing;
* Stable Diffusion 1.5 (UNet + frozen CLIP text encoder), batch 4, 64x64 latents: LoRA, LoCon, LoHa, LoKr.

``--tiny`` runs the same kinds of configuration on tiny presets on the CPU (accounted memory, predicted with
``device="cpu"``): an end-to-end check of the script. Results: a table on stdout, ``$OUT/plan_accuracy.md`` and
one JSON line per configuration in ``$OUT/plan_accuracy.jsonl``.

    python benchmarks/plan_accuracy.py            # GPU (H100/H200): ~10 minutes
    python benchmarks/plan_accuracy.py --tiny     # CPU smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from _common import JsonlSink, environment_line, markdown_table, write_out_text

from slimtune.memory.estimate import MemoryEstimate, estimate_memory
from slimtune.memory.options import ProfileOptions
from slimtune.memory.result import ProfileResult
from slimtune.memory.subproc import run_child

GIB = 2**30
TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str
    method: str
    seq: int = 512
    batch: int = 4
    quant: str = "none"
    gc: bool = False

    @property
    def label(self) -> str:
        method = self.method + ("+nf4" if self.quant != "none" else "")
        shape = f"b{self.batch}" + ("" if self.preset in DIFFUSION else f" s{self.seq}")
        return f"{self.preset} {method} {shape}{' +GC' if self.gc else ''}"


DIFFUSION = ("stable-diffusion-1.5", "sdxl", "flux-dit", "tiny-unet", "tiny-dit")

GPU_GRID = [
    *(Config("llama-3.2-3b", m) for m in ("lora", "dora", "hra", "loha", "lokr")),
    Config("llama-3.2-3b", "lora", seq=2048), Config("llama-3.2-3b", "loha", seq=2048),
    Config("llama-3.2-3b", "lora", seq=2048, gc=True),
    Config("llama-3.1-8b", "lora", quant="nf4"), Config("llama-3.1-8b", "lora", quant="nf4", gc=True),
    *(Config("stable-diffusion-1.5", m) for m in ("lora", "locon", "loha", "lokr")),
]
TINY_GRID = [
    *(Config("tiny-llama", m, seq=64, batch=2) for m in ("lora", "dora", "hra", "loha", "lokr")),
    Config("tiny-llama", "lora", seq=128, batch=2), Config("tiny-llama", "lora", seq=128, batch=2, gc=True),
    Config("tiny-llama", "lora", seq=64, batch=2, quant="nf4"),
    *(Config("tiny-unet", m, batch=2) for m in ("lora", "locon", "loha", "lokr")),
]


def measure(config: Config, args: argparse.Namespace) -> ProfileResult:
    options = ProfileOptions(preset=config.preset, method=config.method, rank=args.rank, batch=config.batch,
                             seq=config.seq, steps=args.steps, device=args.device, dtype=args.dtype,
                             grad_checkpointing=config.gc, quant=config.quant).resolved()
    return run_child(options, timeout=args.timeout)


def predict(config: Config, args: argparse.Namespace, device_kind: str) -> MemoryEstimate:
    return estimate_memory(config.preset, config.method, args.rank, batch=config.batch, seq=config.seq,
                           quant=config.quant, dtype=args.dtype or ("bfloat16" if device_kind == "cuda" else "float32"),
                           grad_checkpointing=config.gc, device=device_kind,
                           reduced_depth=config.preset not in DIFFUSION)


def gib(n: float | None) -> str:
    """GiB with two decimals (MiB for small figures, as the tiny presets give)."""
    if n is None:
        return "—"
    return f"{n / GIB:.2f}" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def record(config: Config, measured: ProfileResult, est: MemoryEstimate, seconds: float) -> dict[str, Any]:
    ratio = est.peak_bytes / measured.peak_bytes if measured.ok and measured.peak_bytes else None
    return {"config": dataclasses.asdict(config), "label": config.label, "status": measured.status,
            "error": measured.error, "measured_peak_bytes": measured.peak_bytes,
            "estimated_peak_bytes": est.peak_bytes, "ratio": ratio,
            "within_tolerance": ratio is not None and abs(ratio - 1) <= TOLERANCE,
            "measured_breakdown": getattr(measured, "breakdown", None) or measured.cpu_breakdown,
            "estimated_breakdown": est.breakdown, "measured_created_bytes": measured.mem_created_bytes,
            "estimated_created_bytes": est.mem_created_bytes, "memory_kind": measured.memory_kind,
            "device": measured.device_name, "estimate_seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny presets on the CPU (smoke test)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measured configuration")
    parser.add_argument("--only", default=None, help="run only configurations whose label contains this text")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    grid = [c for c in (TINY_GRID if args.tiny else GPU_GRID) if args.only is None or args.only in c.label]
    sink = JsonlSink("plan_accuracy.jsonl")
    print(environment_line(), flush=True)
    rows, records = [], []
    for config in grid:
        t0 = time.perf_counter()
        est = predict(config, args, device_kind)
        seconds = time.perf_counter() - t0
        measured = measure(config, args)
        rec = record(config, measured, est, seconds)
        sink.write(rec)
        records.append(rec)
        ratio = rec["ratio"]
        mark = "—" if ratio is None else ("✓" if rec["within_tolerance"] else "✗")
        measured_parts = rec["measured_breakdown"] or {}
        acts = measured_parts.get("activations", measured_parts.get("saved_activations"))
        rows.append([config.label, measured.status, gib(measured.peak_bytes), gib(est.peak_bytes),
                     "—" if ratio is None else f"{ratio:.3f} {mark}", gib(measured.mem_created_bytes),
                     gib(est.mem_created_bytes), gib(acts), gib(est.breakdown["activations"]), f"{seconds:.1f}"])
        print(f"{config.label}: measured {gib(measured.peak_bytes)} GiB, estimated {gib(est.peak_bytes)} GiB, "
              f"ratio {'—' if ratio is None else f'{ratio:.3f}'} {mark}"
              + (f" ({measured.status}: {(measured.error or '')[:200]})" if not measured.ok else ""), flush=True)
    header = ["configuration", "status", "measured peak GiB", "estimated GiB", "est/measured",
              "created (meas.)", "created (est.)", "activations (meas.)", "activations (est.)", "estimate s"]
    table = markdown_table(header, rows)
    ok = [r for r in records if r["ratio"] is not None]
    within = sum(r["within_tolerance"] for r in ok)
    summary = (f"{within} of {len(ok)} measured configurations within ±{TOLERANCE:.0%} "
               f"(worst ratio {max((abs(r['ratio'] - 1) for r in ok), default=0):.3f} off 1)")
    kind = "CUDA max_memory_allocated" if device_kind == "cuda" else "CPU accounted peak"
    text = (f"# Estimator accuracy (`benchmarks/plan_accuracy.py{' --tiny' if args.tiny else ''}`)\n\n"
            f"{environment_line()}\n\nrank {args.rank}, {args.steps} steps, peak = {kind}; "
            f"estimate = `slimtune.memory.estimate.estimate_memory` (meta device).\n\n{table}\n\n{summary}\n")
    print("\n" + table + "\n\n" + summary)
    write_out_text("plan_accuracy.md", text)
    return 0 if ok and within == len(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
