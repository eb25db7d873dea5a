"""Layer-level LoHa / LoKr on the GPU: slimtune vs PEFT (and slimtune LoRA), timings, transient memory, numerics.

Protocol as ``layer_compare.py`` (``shared/bench/peft_layer.py``): one bias-free ``nn.Linear`` (in
``nn.Sequential``, target ``"0"``) in bf16, adapter r=32, alpha=r, input ``x [tokens, d_in]`` requiring grad;
3 warm-up forward+backward passes of ``m(x).sum()``, then the CUDA-event median of 20 forward+backward passes
and of 20 forward passes under ``no_grad``; transient peak = ``max_memory_allocated() - memory_allocated()``
before the timed passes.

Backends: slimtune LoRA; slimtune LoHa / LoKr with ``path="auto"`` (what users get) and each path forced;
PEFT LoHa / LoKr as users get them (float32 adapters) and with ``autocast_adapter_dtype=False`` (bf16 adapters).
Every backend gets the same base weight (same seed).

Numerics (before the timing): PEFT's bf16 LoHa/LoKr with random factors (scaled so that ΔW is about half of W),
the same factors copied into slimtune's layer (each path) and into PEFT's float32-adapter layer; output,
input gradient and every factor's gradient against a float64 reference (PEFT's own layer cast to float64,
on the same rounded values), as Frobenius relative errors.

Dispatch (after the timing, per backend): the median host time to issue one forward+backward (what bounds a
CPU-dispatch-bound model step, as the Llama-3.2-3B seq-512 step is), and the kernel launches and ATen calls of
one step from ``torch.profiler``.

Shapes (d_in, d_out, r, tokens): (3072, 8192, 32, 4096), (8192, 8192, 32, 4096). Results: markdown on stdout
and in ``$OUT/lycoris_gpu.md``, one JSON line per record in ``$OUT/lycoris_gpu.jsonl``. ``--quick``: tiny
shapes on the CPU (smoke test; no memory figure).

    python benchmarks/lycoris_gpu.py            # GPU, about 2-3 minutes on an H100
    python benchmarks/lycoris_gpu.py --quick    # CPU smoke test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Sequence

from _common import JsonlSink, environment_line, markdown_table, write_out_text
from layer_compare import Shape, free, time_protocol

import torch
from torch import nn

import slimtune

SHAPES = [(3072, 8192, 32, 4096), (8192, 8192, 32, 4096)]
QUICK_SHAPES = [(48, 64, 4, 64)]
REPEATS = 20
BACKENDS = ["slimtune-lora",
            "slimtune-loha", "slimtune-loha-structured", "slimtune-loha-folded", "peft-loha", "peft-bf16-loha",
            "slimtune-lokr", "slimtune-lokr-structured", "slimtune-lokr-folded", "peft-lokr", "peft-bf16-lokr"]


def build(backend: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(shape.d_in, shape.d_out, bias=False)).to(device, dtype)
    owner, *rest = backend.split("-")
    method = rest[-1] if owner == "peft" else rest[0]
    if owner == "slimtune":
        path = rest[1] if len(rest) > 1 else "auto"
        if method == "lora":
            return slimtune.adapt(base, slimtune.LoraConfig(r=shape.r, alpha=shape.r, target_modules=["0"]))
        config = {"loha": slimtune.LohaConfig, "lokr": slimtune.LokrConfig}[method]
        return slimtune.adapt(base, config(r=shape.r, alpha=shape.r, target_modules=["0"], path=path))
    import peft

    config = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[method](r=shape.r, alpha=shape.r,
                                                                         target_modules=["0"])
    return peft.get_peft_model(base, config, autocast_adapter_dtype=rest[0] != "bf16")


def adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT key suffix -> parameter, for slimtune and PEFT models alike (one adapted layer)."""
    out = {}
    for name, p in model.named_parameters():
        key = name.split(".")[-1] if ".default" not in name else name.split(".")[-2]
        if key.startswith(("hada_", "lokr_")):
            out[key] = p
    return out


def randomize_peft(model: nn.Module) -> None:
    """Random factors, the first rescaled so that ‖ΔW‖ is about half of ‖W‖ (PEFT's own delta)."""
    layer = model.base_model.model[0]
    params = adapter_tensors(model)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(7)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, device=p.device, generator=gen))
        delta = layer.get_delta_weight("default").float()
        first = params.get("hada_w1_a", params.get("lokr_w1", params.get("lokr_w1_a")))
        first.mul_(0.5 * layer.get_base_layer().weight.float().norm() / delta.norm())


def check(method: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Relative errors of slimtune (each path) and PEFT (bf16 and fp32 adapters) against float64."""
    theirs = build(f"peft-bf16-{method}", shape, device, dtype)
    randomize_peft(theirs)
    values = {k: p.detach().clone() for k, p in adapter_tensors(theirs).items()}
    gen = torch.Generator(device=device).manual_seed(11)
    x = torch.randn(shape.tokens, shape.d_in, device=device, generator=gen).to(dtype)
    g = torch.randn(shape.tokens, shape.d_out, device=device, generator=gen).to(dtype)

    def run(model: nn.Module, xin: torch.Tensor, gin: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for k, p in adapter_tensors(model).items():
                p.copy_(values[k])
        xr = xin.clone().requires_grad_(True)
        y = model(xr)
        y.backward(gin)
        out = {"y": y.detach(), "dx": xr.grad}
        out.update({f"d{k}": p.grad for k, p in adapter_tensors(model).items()})
        return out

    ref_model = build(f"peft-{method}", shape, device, dtype).double()
    ref = run(ref_model, x.double(), g.double())
    del ref_model
    records = []
    for backend in (f"slimtune-{method}-structured", f"slimtune-{method}-folded", f"peft-bf16-{method}",
                    f"peft-{method}"):
        model = theirs if backend == f"peft-bf16-{method}" else build(backend, shape, device, dtype)
        got = run(model, x, g)
        errors = {k: float((got[k].double() - ref[k]).norm() / ref[k].norm()) for k in ref}
        records.append(dict(kind="check", backend=backend, d_in=shape.d_in, d_out=shape.d_out, r=shape.r,
                            tokens=shape.tokens, max_rel_err=max(errors.values()), **{f"rel_err_{k}": v
                                                                                    for k, v in errors.items()}))
        model = None
        free(device)
    return records


LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def dispatch_cost(model: nn.Module, shape: Shape, device: torch.device, dtype: torch.dtype,
                  repeats: int) -> dict[str, Any]:
    """What a layer costs the host, the bound of a CPU-dispatch-bound training step: ``host_us``, the median host
    time to issue one ``model(x).sum().backward()`` (the GPU idle at the start, not waited for at the end);
    ``launches``, the kernel launches of that step and ``aten_ops`` its ATen calls (nested ones included), from
    ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(shape.tokens, shape.d_in, device=device, dtype=dtype, requires_grad=True)
    cuda = device.type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        model(x).sum().backward()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    return {"host_us": round(statistics.median(times) * 1e6, 1),
            "launches": sum(e.name in LAUNCH_EVENTS for e in events) if cuda else None,
            "aten_ops": sum(e.name.startswith("aten::") for e in events)}


def timing(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict[str, Any]]:
    records = []
    for backend in BACKENDS:
        rec: dict[str, Any] = dict(kind="timing", backend=backend, d_in=shape.d_in, d_out=shape.d_out, r=shape.r,
                                   tokens=shape.tokens, status="ok")
        try:
            model = build(backend, shape, device, dtype)
            adapters = slimtune.adapter_modules(model) if backend.startswith("slimtune") else []
            if adapters and hasattr(adapters[0][1], "choose"):  # the path training takes (auto: by cost)
                meta_x = torch.empty(shape.tokens, shape.d_in, device="meta", dtype=dtype)
                rec["path_taken"] = adapters[0][1].choose(meta_x, backward=True)
            rec.update(time_protocol(model, shape, device, dtype, repeats))
            rec.update(dispatch_cost(model, shape, device, dtype, repeats))
        except torch.OutOfMemoryError:
            rec["status"] = "OOM"
        model = None
        free(device)
        records.append(rec)
        print(f"  {backend:<26} {rec.get('fwd_bwd_ms', '—')} ms fwd+bwd, {rec.get('transient_peak_mb', '—')} MB, "
              f"host {rec.get('host_us', '—')} us, {rec.get('launches', '—')} launches, {rec.get('aten_ops', '—')} "
              "aten ops", flush=True)
    return records


def tables(records: Sequence[dict[str, Any]]) -> str:
    def num(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    rows = []
    lora = {(r["d_in"], r["d_out"]): r for r in records if r["kind"] == "timing" and r["backend"] == "slimtune-lora"}
    for r in (r for r in records if r["kind"] == "timing"):
        base = lora.get((r["d_in"], r["d_out"]), {})
        ratio_t = r.get("fwd_bwd_ms") / base["fwd_bwd_ms"] if r.get("fwd_bwd_ms") and base.get("fwd_bwd_ms") else None
        ratio_m = (r.get("transient_peak_mb") / base["transient_peak_mb"]
                   if r.get("transient_peak_mb") is not None and base.get("transient_peak_mb") else None)
        ratio_h = r.get("host_us") / base["host_us"] if r.get("host_us") and base.get("host_us") else None
        rows.append([f"{r['d_in']}→{r['d_out']} r={r['r']} N={r['tokens']}", r["backend"], r.get("path_taken", ""),
                     r["status"], num(r.get("fwd_bwd_ms"), ".3f"), num(r.get("fwd_ms"), ".3f"),
                     num(r.get("transient_peak_mb"), ".1f"), num(ratio_t, ".2f"), num(ratio_m, ".2f"),
                     num(r.get("host_us"), ".0f"), num(ratio_h, ".2f"), num(r.get("launches"), "d"),
                     num(r.get("aten_ops"), "d")])
    timing_table = markdown_table(["shape", "backend", "path", "status", "fwd+bwd ms", "fwd ms", "transient MB",
                                   "fwd+bwd ÷ slimtune LoRA", "transient ÷ slimtune LoRA", "host µs",
                                   "host ÷ slimtune LoRA", "kernel launches", "aten ops"], rows)
    checks = [[f"{r['d_in']}→{r['d_out']}", r["backend"], num(r["rel_err_y"], ".2e"), num(r["rel_err_dx"], ".2e"),
               ", ".join(f"{k[9:]}={v:.1e}" for k, v in r.items() if k.startswith("rel_err_d") and k != "rel_err_dx"),
               num(r["max_rel_err"], ".2e")] for r in records if r["kind"] == "check"]
    check_table = markdown_table(["shape", "backend", "rel err y", "rel err dx", "factor grads", "max"], checks)
    return f"{timing_table}\n\nNumerics vs float64 (bf16 activations):\n\n{check_table}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    shapes = [Shape(*s) for s in (QUICK_SHAPES if args.quick else SHAPES)]
    repeats = 3 if args.quick else REPEATS
    env = environment_line()
    print(env, flush=True)
    sink = JsonlSink("lycoris_gpu.jsonl")
    records: list[dict[str, Any]] = []
    for shape in shapes:
        print(f"shape {shape}", flush=True)
        for rec in [*check("loha", shape, device, dtype), *check("lokr", shape, device, dtype),
                    *timing(shape, device, dtype, repeats)]:
            rec.update(torch_version=torch.__version__, dtype=str(dtype).removeprefix("torch."))
            sink.write(rec)
            records.append(rec)
    text = (f"{env}\n\nLoHa / LoKr on one bias-free Linear, {dtype}, alpha = r; median of {repeats} after 3 "
            f"warm-ups; transient = max_memory_allocated - memory_allocated before; host = median CPU time to issue "
            f"one fwd+bwd; launches / aten ops from torch.profiler (one fwd+bwd incl. .sum())\n\n{tables(records)}\n")
    print("\n" + text, flush=True)
    write_out_text("lycoris_gpu.md", text)
    bad = [r for r in records if r["kind"] == "check" and r["backend"].startswith("slimtune")
           and r["max_rel_err"] > (1e-4 if args.quick else 5e-2)]
    return 1 if bad or any(r.get("status", "ok") != "ok" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
