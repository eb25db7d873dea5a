"""Where the time goes (GPU): torch.profiler tables for one adapted layer, and CPU-dispatch vs wall time of
whole-model training steps. Diagnostic only: the numbers that are claimed come from the other scripts.

    python benchmarks/diagnose.py [--methods lora hra] [--model-seq 512]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import environment_line, write_out_text

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import slimtune
from slimtune.memory.profile import apply_adapter
from slimtune.memory.options import ProfileOptions
from slimtune.models.presets import build_model


def layer(method: str, backend: str, d_in=3072, d_out=8192, r=32, tokens=4096) -> tuple[str, str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).cuda().bfloat16()
    if backend == "slimtune":
        config = (slimtune.HraConfig(r=r, target_modules=["0"], init_weights=False) if method == "hra" else
                  slimtune.LoraConfig(r=r, alpha=r, target_modules=["0"]))
        slimtune.adapt(model, config)
    else:
        import peft
        config = (peft.HRAConfig(r=r, target_modules=["0"]) if method == "hra" else
                  peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3):
        model(x).sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            model(x).sum().backward()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in averages) / 5 / 1000
    cuda = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages) / 5 / 1000
    launches = sum(e.count for e in averages if e.key.startswith(("void", "ampere", "sm90", "cutlass", "triton", "nvjet"))
                   or "kernel" in e.key.lower()) / 5
    sort = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    table = averages.table(sort_by=sort, row_limit=25)
    return (f"{method}/{backend}: CPU self {cpu:.2f} ms, GPU self {cuda:.2f} ms per fwd+bwd, ~{launches:.0f} kernels",
            table)


def model_steps(method: str, backend: str, seq: int, batch: int = 4, steps: int = 8) -> str:
    options = ProfileOptions(preset="llama-3.2-3b", method=method, rank=32, batch=batch, seq=seq, device="cuda",
                             dtype="bfloat16", backend=backend).resolved()
    model = apply_adapter(build_model("llama-3.2-3b", "cuda", "bfloat16"), options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, 128000, (batch, seq), device="cuda")
    dispatch, wall = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        dispatch.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    del model, opt
    torch.cuda.empty_cache()
    return (f"model {method}/{backend} seq {seq}: wall {statistics.median(wall[3:]):.4f} s, CPU dispatch "
            f"{statistics.median(dispatch[3:]):.4f} s (median of steps 4-{steps}; dispatch ~ wall means CPU-bound)")


def model_profile(method: str, seq: int, batch: int = 4) -> str:
    """torch.profiler over two training steps of the Llama-3.2-3B shape: the top CPU-time operators."""
    options = ProfileOptions(preset="llama-3.2-3b", method=method, rank=32, batch=batch, seq=seq, device="cuda",
                             dtype="bfloat16", backend="slimtune").resolved()
    model = apply_adapter(build_model("llama-3.2-3b", "cuda", "bfloat16"), options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 128000, (batch, seq), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    del model, opt
    torch.cuda.empty_cache()
    return f"model {method} seq {seq}, 2 steps\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["lora", "hra"])
    parser.add_argument("--model-seq", type=int, nargs="*", default=[512])
    parser.add_argument("--profile-model", nargs="*", default=[], help="methods to profile at model level")
    args = parser.parse_args(argv)
    lines, tables = [environment_line()], []
    for method in args.methods:
        for backend in ("slimtune", "peft-bf16"):
            if method == "hra" and backend != "slimtune":
                continue
            line, table = layer(method, backend)
            print(line, flush=True)
            lines.append(line)
            tables.append(line + "\n" + table)
    for seq in args.model_seq:
        for method, backend in [("lora", "slimtune"), ("lora", "peft-bf16")] + [(m, "slimtune") for m in args.methods
                                                                                 if m != "lora"]:
            line = model_steps(method, backend, seq)
            print(line, flush=True)
            lines.append(line)
    for method in args.profile_model:
        table = model_profile(method, 512)
        tables.append(table)
        print(table[:6000], flush=True)
    write_out_text("diagnose.md", "\n\n".join(lines + tables))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
