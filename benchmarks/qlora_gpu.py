"""QLoRA on the GPU: slimtune's NF4 path against PEFT + bitsandbytes, and the dequantisation kernel alone.

    python benchmarks/qlora_gpu.py                      # everything below, one subprocess per model config
    python benchmarks/qlora_gpu.py --only dequant       # the kernel microbenchmark and its bf16 check
    python benchmarks/qlora_gpu.py --preset tiny-llama --steps 3 --device cpu   # a CPU smoke run

Model protocol (as ``shared/bench/peft_baseline.py``): the preset built with random weights in bf16 (seed 0),
its Linear layers quantised to NF4 with double quantisation (head and embeddings stay bf16), LoRA on the
seven projections (r=16, alpha=16), AdamW on the trainable parameters, random tokens, ``--steps`` steps,
median of steps 4..end, peak ``max_memory_allocated`` after creation. Backends: ``slimtune`` (NF4Linear
storage), ``slimtune-bnb`` (slimtune adapters over bitsandbytes' Linear4bit), ``peft`` (PEFT LoRA over
bitsandbytes' Linear4bit, fp32 adapters: PEFT's default) and ``peft-bf16`` (``autocast_adapter_dtype=False``).
Writes ``$OUT/qlora_gpu.md`` and ``$OUT/qlora_gpu.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import _common  # noqa: F401  (puts the checkout on sys.path)
import torch

from _common import JsonlSink, environment_line, markdown_table, package_version, write_out_text

BACKENDS = ("slimtune", "slimtune-bnb", "peft", "peft-bf16")
GB = 2**30  # GiB, as the protocol reports


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args: argparse.Namespace, backend: str, method: str) -> tuple[torch.nn.Module, float]:
    import slimtune
    from slimtune.models.presets import LLAMA_TARGETS, build_model

    model = build_model(args.preset, device=args.device, dtype=torch.bfloat16, seed=0)
    t0 = time.perf_counter()
    storage = "bitsandbytes" if backend != "slimtune" else "slimtune"
    slimtune.quantize(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16, backend=storage)
    _sync(args.device)
    quant_s = time.perf_counter() - t0
    if backend.startswith("peft"):
        import peft

        config = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=LLAMA_TARGETS, lora_dropout=0.0,
                                 use_dora=method == "dora")
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=backend == "peft")
    else:
        configs = {"lora": lambda: slimtune.LoraConfig(r=args.rank, alpha=args.rank, target_modules=LLAMA_TARGETS),
                   "dora": lambda: slimtune.LoraConfig(r=args.rank, alpha=args.rank, target_modules=LLAMA_TARGETS,
                                                       use_dora=True),
                   "hra": lambda: slimtune.HraConfig(r=args.rank, target_modules=LLAMA_TARGETS),
                   "loha": lambda: slimtune.LohaConfig(r=args.rank, alpha=args.rank, target_modules=LLAMA_TARGETS),
                   "lokr": lambda: slimtune.LokrConfig(r=args.rank, alpha=args.rank, target_modules=LLAMA_TARGETS)}
        slimtune.adapt(model, configs[method]())
    return model, quant_s


def run_one(args: argparse.Namespace) -> dict:
    backend, method = args.backend, args.method
    device = args.device
    record = dict(backend=backend, method=method, preset=args.preset, rank=args.rank, seq=args.seq, batch=args.batch)
    model, record["quantize_s"] = build(args, backend, method)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    record["trainable"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        record["created_gb"] = torch.cuda.memory_allocated() / GB
        torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=None)
    times, losses = [], []
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            del loss
        record["status"] = "ok"
    except torch.OutOfMemoryError:
        record["status"] = "OOM"
    if device.startswith("cuda"):
        record["peak_gb"] = torch.cuda.max_memory_allocated() / GB
    record["step_s"] = statistics.median(times[3:] or times) if times else None
    record["losses"] = losses
    return record


def dequant_bench(device: str) -> list[dict]:
    """Triton NF4 dequantisation vs bitsandbytes' dequantize_4bit (bf16 out), and the kernel's bf16 exactness."""
    from slimtune.quant.nf4 import dequantize_nf4_reference, quantize_nf4
    from slimtune.quant.nf4_triton import dequantize_nf4_triton

    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    rows = []
    for shape in [(1024, 4096), (4096, 4096), (14336, 4096), (128256, 4096)]:
        w = torch.randn(shape, device=device, dtype=torch.bfloat16)
        t = quantize_nf4(w)
        ours = dequantize_nf4_triton(t, torch.bfloat16)
        ref = dequantize_nf4_reference(t, torch.bfloat16)
        row = dict(shape=list(shape), exact_frac=(ours == ref).float().mean().item(),
                   max_abs_diff=(ours.float() - ref.float()).abs().max().item())
        row["triton_ms"] = cuda_time(lambda: dequantize_nf4_triton(t, torch.bfloat16))
        row["torch_ref_ms"] = cuda_time(lambda: dequantize_nf4_reference(t, torch.bfloat16))
        if bnbf is not None:
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            row["bnb_ms"] = cuda_time(lambda: bnbf.dequantize_4bit(packed, state))
            theirs = type(t)(packed=packed.reshape(-1), absmax=state.absmax, shape=torch.Size(state.shape),
                             nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=state.offset)
            ours_on_theirs = dequantize_nf4_triton(theirs, torch.bfloat16, code=state.code)
            row["vs_bnb_exact_frac"] = (ours_on_theirs == bnbf.dequantize_4bit(packed, state)).float().mean().item()
        numel = shape[0] * shape[1]
        row["triton_GBps"] = (numel * 2 + numel / 2) / (row["triton_ms"] * 1e-3) / GB
        rows.append(row)
        del w, t, ours, ref
    return rows


def cuda_time(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--methods", default="lora", help="slimtune methods on NF4 (lora,dora,hra,loha,lokr)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole configuration list this many times (the host's speed drifts between "
                             "processes); the table keeps each configuration's fastest round")
    parser.add_argument("--only", choices=("dequant", "model"), default=None)
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # child process: one configuration
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        print(json.dumps(run_one(args)))
        return

    env = environment_line() + f" · bitsandbytes {package_version('bitsandbytes')} · triton {package_version('triton')}"
    lines = [f"# QLoRA: slimtune vs PEFT + bitsandbytes\n\n{env}\n"]
    sink = JsonlSink("qlora_gpu.jsonl")
    if args.only in (None, "dequant") and args.device.startswith("cuda"):
        rows = dequant_bench(args.device)
        for row in rows:
            sink.write(dict(kind="dequant", **row))
        lines.append("## NF4 dequantisation to bf16 (CUDA-event median of 20)\n")
        lines.append(markdown_table(
            ["shape", "triton ms", "GB/s", "bitsandbytes ms", "torch reference ms", "= reference", "= bnb on bnb's bits"],
            [[f"{r['shape'][0]}x{r['shape'][1]}", f"{r['triton_ms']:.3f}", f"{r['triton_GBps']:.0f}",
              f"{r.get('bnb_ms', float('nan')):.3f}", f"{r['torch_ref_ms']:.3f}", f"{r['exact_frac']:.6f}",
              f"{r.get('vs_bnb_exact_frac', float('nan')):.6f}"] for r in rows]))
        print(lines[-1], flush=True)
    if args.only in (None, "model"):
        configs = [(b, "lora") for b in args.backends.split(",")]
        configs += [("slimtune", m) for m in args.methods.split(",") if m != "lora"]
        results = []
        for backend, method in configs * args.rounds:
            cmd = [sys.executable, __file__, "--backend", backend, "--method", method, "--preset", args.preset,
                   "--rank", str(args.rank), "--seq", str(args.seq), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                record = dict(backend=backend, method=method, status="error", error=proc.stderr[-2000:])
            else:
                record = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(record)[:400], flush=True)
            sink.write(dict(kind="model", **record))
            results.append(record)
        best: dict[tuple[str, str], dict] = {}
        for r in results:
            key = (r["backend"], r["method"])
            if key not in best or (r.get("step_s") or 1e9) < (best[key].get("step_s") or 1e9):
                best[key] = dict(r, rounds=[x.get("step_s") for x in results if (x["backend"], x["method"]) == key])
        results = list(best.values())
        ref = {r["backend"]: r for r in results if r["method"] == "lora" and r.get("status") == "ok"}

        def ratio(r, key, base):
            return (f"{r[key] / ref[base][key]:.3f}" if base in ref and r.get(key) and ref[base].get(key) else "—")

        lines.append(f"\n## {args.preset}, r={args.rank}, seq {args.seq}, batch {args.batch}, NF4 + double quant "
                     f"(fastest of {args.rounds} round(s))\n")
        lines.append(markdown_table(
            ["backend", "method", "status", "created GB", "peak GB", "step s", "peak ÷ PEFT", "step ÷ PEFT",
             "peak ÷ PEFT-bf16", "step ÷ PEFT-bf16"],
            [[r["backend"], r["method"], r.get("status"), f"{r.get('created_gb', 0):.2f}", f"{r.get('peak_gb', 0):.2f}",
              f"{r['step_s']:.3f}" if r.get("step_s") else "—", ratio(r, "peak_gb", "peft"), ratio(r, "step_s", "peft"),
              ratio(r, "peak_gb", "peft-bf16"), ratio(r, "step_s", "peft-bf16")] for r in results]))
        print(lines[-1], flush=True)
    write_out_text("qlora_gpu.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
