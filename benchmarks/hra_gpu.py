"""Layer-level HRA on the GPU: slimtune HRA (compact WY, low-rank path) vs PEFT HRA and slimtune LoRA.

One bias-free ``nn.Linear`` in bf16 (target ``"0"``), the protocol of ``shared/bench/peft_layer.py``
(``layer_compare.time_protocol``: CUDA-event median of 20 fwd+bwd after 3 warm-ups, transient peak). Numerics:
slimtune and PEFT get the same ``hra_u``; each output is compared with a float64 dense-transform reference.

    python benchmarks/hra_gpu.py            # GPU
    python benchmarks/hra_gpu.py --quick    # CPU smoke test
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import JsonlSink, environment_line, markdown_table, write_out_text
from layer_compare import Shape, free, time_protocol

import torch
import torch.nn.functional as F
from torch import nn

import slimtune
from slimtune.methods.hra.math import hra_dense_transform

SHAPES = [(3072, 8192, 32, 4096), (8192, 8192, 384, 4096)]
QUICK = [(64, 96, 8, 128)]
BACKENDS = ("slimtune-hra", "slimtune-lora", "peft-hra", "peft-hra-bf16")


def build(backend: str, s: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(s.d_in, s.d_out, bias=False)).to(device, dtype)
    if backend == "slimtune-hra":
        return slimtune.adapt(base, slimtune.HraConfig(r=s.r, target_modules=["0"], init_weights=False))
    if backend == "slimtune-lora":
        return slimtune.adapt(base, slimtune.LoraConfig(r=s.r, alpha=s.r, target_modules=["0"]))
    import peft

    return peft.get_peft_model(base, peft.HRAConfig(r=s.r, target_modules=["0"], init_weights=False),
                               autocast_adapter_dtype=backend == "peft-hra")


def hra_u(model: nn.Module) -> nn.Parameter:
    return next(p for n, p in model.named_parameters() if "hra_u" in n)


def numerics(s: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Relative error vs float64 of slimtune and PEFT(bf16 adapters) on the same u, and their cosine."""
    ours = build("slimtune-hra", s, device, dtype)
    u = hra_u(ours).detach().clone()
    weight = ours[0].base_layer.weight.detach()
    x = torch.randn(min(s.tokens, 1024), s.d_in, device=device, dtype=dtype)
    ref = F.linear(x.double(), weight.double() @ hra_dense_transform(u.double()))
    with torch.no_grad():
        y_ours = ours(x)
    del ours
    out = {"rel_err_slimtune": float((y_ours.double() - ref).norm() / ref.norm())}
    if s.r > 64:
        return out
    try:
        theirs = build("peft-hra-bf16", s, device, dtype)
        with torch.no_grad():
            hra_u(theirs).copy_(u)
            y_peft = theirs(x)
        del theirs
        out["rel_err_peft"] = float((y_peft.double() - ref).norm() / ref.norm())
        out["cosine_vs_peft"] = float(F.cosine_similarity(y_ours.double().flatten(), y_peft.double().flatten(), 0))
    except torch.OutOfMemoryError:
        out["rel_err_peft"] = "OOM"
    free(device)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    env = environment_line()
    print(env, flush=True)
    sink = JsonlSink("hra_layer.jsonl")
    rows = []
    for dims in (QUICK if args.quick else SHAPES):
        s = Shape(*dims)
        num = numerics(s, device, dtype)
        print(dims, num, flush=True)
        timings: dict[str, dict[str, Any]] = {}
        for backend in BACKENDS:
            rec: dict[str, Any] = dict(backend=backend, d_in=s.d_in, d_out=s.d_out, r=s.r, tokens=s.tokens)
            if backend.startswith("peft") and s.r > 64:
                # PEFT builds r dense [d, d] fp32 products per forward: out of memory at this shape on an
                # 80 GB H100 (shared/bench/results), and minutes per step if it fits
                rec["status"] = "skipped (PEFT: OOM in the shared reference run)"
                timings[backend] = rec
                continue
            try:
                model = build(backend, s, device, dtype)
                rec.update(time_protocol(model, s, device, dtype, 5 if args.quick else 20), status="ok")
            except torch.OutOfMemoryError:
                rec["status"] = "OOM"
            model = None
            free(device)
            timings[backend] = rec
            sink.write({**rec, **num})
            print(rec, flush=True)
        ours = timings["slimtune-hra"].get("fwd_bwd_ms")
        for backend, rec in timings.items():
            t = rec.get("fwd_bwd_ms")
            rows.append([f"{s.d_in}→{s.d_out} r={s.r} N={s.tokens}", backend, rec["status"], t, rec.get("fwd_ms"),
                         rec.get("transient_peak_mb"), f"{t / ours:.2f}" if t and ours else "—"])
        rows.append([f"numerics {dims}", "", "", "", "", "", str(num)])
    table = markdown_table(["shape", "backend", "status", "fwd+bwd ms", "fwd ms", "transient MB",
                            "this ÷ slimtune-hra (fwd+bwd)"], rows)
    text = f"{env}\n\n{table}\n"
    print("\n" + text, flush=True)
    write_out_text("hra_layer.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
