"""Layer-level comparison, slimtune LoRA vs PEFT LoRA, on the protocol of ``shared/bench/peft_layer.py``.

One bias-free ``nn.Linear`` (inside ``nn.Sequential``, target ``"0"``) in bf16 with LoRA r, alpha=r; the
input ``x [tokens, d_in]`` requires grad. Timing as the protocol: 3 warm-up forward+backward passes of
``m(x).sum()``, then the CUDA-event median of 20 forward+backward passes and of 20 forward passes under
``no_grad``; transient peak = ``max_memory_allocated() - memory_allocated()`` before the timed passes.

Backends: slimtune, PEFT default (float32 adapters), PEFT bf16 adapters (``autocast_adapter_dtype=False``).
All three get the same base weight (same seed) and the same A and B: B is set away from zero (random)
and both are rounded to the layer dtype, then copied into each model. Numerical check: relative error
(Frobenius) of the output, the input gradient and the A/B gradients against a float64 reference computed
from those same weights and the same (rounded) x, with a random upstream gradient.

Beside them, the layer's GEMM floor (issue 19): each GEMM its forward + backward needs, timed alone, summed
(:func:`gemm_floor`); the table gives every backend's fwd+bwd ÷ that floor.

Shapes (d_in, d_out, r, tokens): (8192, 8192, 384, 4096), (3072, 8192, 32, 4096), (4096, 4096, 16, 8192).
Results: markdown table on stdout and in ``$OUT/layer_compare.md``, one JSON line per (backend, shape) in
``$OUT/layer_compare.jsonl`` (when ``OUT`` is set). ``--quick``: tiny shapes on the CPU (wall-clock timing,
no memory figure), for a smoke test.

    python benchmarks/layer_compare.py           # GPU, under a minute on an H100
    python benchmarks/layer_compare.py --quick   # CPU smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from _common import JsonlSink, environment_line, fmt_ratio, markdown_table, package_version, write_out_text

import torch
from torch import nn

import slimtune
from slimtune.models.presets import dtype_name, resolve_dtype

SHAPES = [(8192, 8192, 384, 4096), (3072, 8192, 32, 4096), (4096, 4096, 16, 8192)]
QUICK_SHAPES = [(64, 96, 8, 128), (96, 64, 4, 256)]
BACKENDS = ("slimtune", "peft", "peft-bf16")
WARMUP, REPEATS = 3, 20


@dataclasses.dataclass
class Shape:
    d_in: int
    d_out: int
    r: int
    tokens: int


# -- models -----------------------------------------------------------------------------------------
def build(backend: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The protocol's one-Linear model with a LoRA adapter from ``backend``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(shape.d_in, shape.d_out, bias=False)).to(device, dtype)
    if backend == "slimtune":
        return slimtune.adapt(base, slimtune.LoraConfig(r=shape.r, alpha=shape.r, target_modules=["0"]))
    import peft

    config = peft.LoraConfig(r=shape.r, lora_alpha=shape.r, target_modules=["0"], lora_dropout=0.0)
    return peft.get_peft_model(base, config, autocast_adapter_dtype=backend == "peft")


def lora_parameters(model: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """(A ``[r, d_in]``, B ``[d_out, r]``) of the single adapter, for slimtune and PEFT naming alike."""
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    if len(a) != 1 or len(b) != 1:
        raise RuntimeError(f"expected one lora_A and one lora_B, got {len(a)} and {len(b)}")
    return a[0], b[0]


def base_weight(model: nn.Module) -> torch.Tensor:
    weights = [p for n, p in model.named_parameters() if "lora_" not in n and n.endswith("weight")]
    if len(weights) != 1:
        raise RuntimeError(f"expected one base weight, got {len(weights)}")
    return weights[0]


@dataclasses.dataclass
class Inputs:
    """Shared A, B (in the layer dtype), x and the upstream gradient g, and the float64 reference."""

    a: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor | None
    g: torch.Tensor | None
    ref: dict[str, torch.Tensor] | None = None


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, a_init: torch.Tensor) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(1234)
    b = torch.randn(shape.d_out, shape.r, device=device, generator=gen) * (0.5 / math.sqrt(shape.r))
    x = torch.randn(shape.tokens, shape.d_in, device=device, generator=gen)
    g = torch.randn(shape.tokens, shape.d_out, device=device, generator=gen)
    return Inputs(a=a_init.detach().to(dtype).clone(), b=b.to(dtype), x=x.to(dtype), g=g.to(dtype))


def reference(inputs: Inputs, weight: torch.Tensor, scaling: float) -> dict[str, torch.Tensor]:
    """Output and gradients (x, A, B) in float64 from the same rounded values."""
    w, a, b = weight.double(), inputs.a.double(), inputs.b.double()
    x, g = inputs.x.double(), inputs.g.double()
    xa = x @ a.t()
    gb = g @ b
    return {"y": x @ w.t() + scaling * xa @ b.t(), "dx": g @ w + scaling * gb @ a,
            "dA": scaling * gb.t() @ x, "dB": scaling * g.t() @ xa}


def rel_err(got: torch.Tensor | None, ref: torch.Tensor) -> float | None:
    if got is None:
        return None
    return float(torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref))


def check(model: nn.Module, inputs: Inputs, ref: dict[str, torch.Tensor]) -> dict[str, float | None]:
    a, b = lora_parameters(model)
    a.grad = b.grad = None
    x = inputs.x.clone().requires_grad_(True)
    y = model(x)
    y.backward(inputs.g)
    errors = {"rel_err_y": rel_err(y.detach(), ref["y"]), "rel_err_dx": rel_err(x.grad, ref["dx"]),
              "rel_err_dA": rel_err(a.grad, ref["dA"]), "rel_err_dB": rel_err(b.grad, ref["dB"])}
    a.grad = b.grad = None
    return errors


# -- timing (the protocol) --------------------------------------------------------------------------
def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds of one call: CUDA events on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(fn: Callable[[], Any]) -> float:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return timed

    def timed_cpu(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000
    return timed_cpu


def time_protocol(model: nn.Module, shape: Shape, device: torch.device, dtype: torch.dtype,
                  repeats: int) -> dict[str, float | None]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape.tokens, shape.d_in, device=device, dtype=dtype, generator=gen, requires_grad=True)
    for _ in range(WARMUP):
        model(x).sum().backward()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    timed = _timer(device)
    fwd_bwd = [timed(lambda: model(x).sum().backward()) for _ in range(repeats)]
    with torch.no_grad():
        fwd = [timed(lambda: model(x)) for _ in range(repeats)]
    transient = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
    return {"fwd_bwd_ms": round(statistics.median(fwd_bwd), 3), "fwd_ms": round(statistics.median(fwd), 3),
            "transient_peak_mb": round(transient, 1) if transient is not None else None}


def gemm_floor(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Milliseconds of each GEMM LoRA's forward + backward cannot do without, each timed alone on fresh operands
    (median of ``repeats`` after the warm-ups), and their sum, ``floor_ms`` — issue 19's "GEMM floor" for the layer.
    Forward ``x Wᵀ``, ``h = x Aᵀ``, ``y += h Bᵀ``; backward ``dx = dy W``, ``g = dy B``, ``dx += g A``,
    ``dA = gᵀ x``, ``dB = dyᵀ h`` (h as if kept: slimtune recomputes it, one GEMM more than the floor)."""
    gen = torch.Generator(device=device).manual_seed(7)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=gen).to(dtype)

    n, d_in, d_out, r = shape.tokens, shape.d_in, shape.d_out, shape.r
    x, w, a, b = rand(n, d_in), rand(d_out, d_in), rand(r, d_in), rand(d_out, r)
    dy, h, g = rand(n, d_out), rand(n, r), rand(n, r)
    y, dx = rand(n, d_out), rand(n, d_in)
    gemms: dict[str, Callable[[], Any]] = {
        "x Wᵀ": lambda: x @ w.t(), "x Aᵀ": lambda: x @ a.t(), "y += h Bᵀ": lambda: y.addmm_(h, b.t()),
        "dy W": lambda: dy @ w, "dy B": lambda: dy @ b, "dx += g A": lambda: dx.addmm_(g, a),
        "gᵀ x": lambda: g.t() @ x, "dyᵀ h": lambda: dy.t() @ h}
    timed = _timer(device)
    out: dict[str, float] = {}
    for name, fn in gemms.items():
        for _ in range(WARMUP):
            fn()
        out[name] = statistics.median(timed(fn) for _ in range(repeats))
    out["floor_ms"] = sum(out.values())
    return out


# -- driver -----------------------------------------------------------------------------------------
def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_shape(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict[str, Any]]:
    """Numerics for every backend, then the protocol timing for every backend (one model alive at a time)."""
    common = dict(d_in=shape.d_in, d_out=shape.d_out, r=shape.r, tokens=shape.tokens, dtype=dtype_name(dtype))
    records = {b: dict(backend=b, status="ok", **common) for b in BACKENDS}
    inputs: Inputs | None = None
    ref_weight: torch.Tensor | None = None
    for backend in BACKENDS:  # numerics
        try:
            model = build(backend, shape, device, dtype)
            a, b = lora_parameters(model)
            if inputs is None:
                inputs = make_inputs(shape, device, dtype, a)
                ref_weight = base_weight(model).detach().clone()
                inputs.ref = reference(inputs, ref_weight, scaling=1.0)
            with torch.no_grad():
                a.copy_(inputs.a)
                b.copy_(inputs.b)
            records[backend]["same_base_weight"] = bool(torch.equal(base_weight(model), ref_weight))
            records[backend]["adapter_dtype"] = dtype_name(a.dtype)
            records[backend].update(check(model, inputs, inputs.ref))
        except torch.OutOfMemoryError:
            records[backend]["status"] = "OOM (check)"
        model = a = b = None
        free(device)
    if inputs is None:  # not even one model could be built
        for rec in records.values():
            rec["status"] = "OOM"
        return [records[b] for b in BACKENDS]
    inputs.ref = inputs.x = inputs.g = ref_weight = None  # only A and B stay for the timing models
    free(device)
    try:
        floor = gemm_floor(shape, device, dtype, repeats)
        for rec in records.values():
            rec["gemm_floor_ms"] = round(floor["floor_ms"], 3)
        records["slimtune"]["gemm_floor_parts_ms"] = {k: round(v, 3) for k, v in floor.items() if k != "floor_ms"}
    except torch.OutOfMemoryError:
        pass
    free(device)
    for backend in BACKENDS:  # timing
        if not records[backend]["status"].startswith("ok"):
            continue
        try:
            model = build(backend, shape, device, dtype)
            a, b = lora_parameters(model)
            with torch.no_grad():
                a.copy_(inputs.a)
                b.copy_(inputs.b)
            a = b = None
            records[backend].update(time_protocol(model, shape, device, dtype, repeats))
        except torch.OutOfMemoryError:
            records[backend]["status"] = "OOM"
        model = None
        free(device)
    return [records[b] for b in BACKENDS]


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    def num(value: Any, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    by_shape: dict[tuple, dict[str, dict[str, Any]]] = {}
    for rec in records:
        by_shape.setdefault((rec["d_in"], rec["d_out"], rec["r"], rec["tokens"]), {})[rec["backend"]] = rec
    rows = []
    for (d_in, d_out, r, tokens), by in by_shape.items():
        ours = by.get("slimtune", {})
        for backend, rec in by.items():
            if backend == "slimtune":
                fb_ratio = "1.00" if rec.get("fwd_bwd_ms") is not None else "—"
                peak_ratio = "1.00" if rec.get("transient_peak_mb") is not None else "—"
            else:
                fb_ratio = fmt_ratio(_ratio(ours.get("fwd_bwd_ms"), rec.get("fwd_bwd_ms")))
                peak_ratio = fmt_ratio(_ratio(ours.get("transient_peak_mb"), rec.get("transient_peak_mb")))
            rows.append([f"{d_in}×{d_out} r={r} N={tokens}", backend, rec.get("adapter_dtype", "—"), rec["status"],
                         num(rec.get("fwd_bwd_ms"), ".3f"), num(rec.get("fwd_ms"), ".3f"),
                         num(rec.get("transient_peak_mb"), ".1f"), fb_ratio, peak_ratio,
                         fmt_ratio(_ratio(rec.get("fwd_bwd_ms"), rec.get("gemm_floor_ms"))),
                         num(rec.get("rel_err_y"), ".2e"), num(rec.get("rel_err_dx"), ".2e"),
                         num(rec.get("rel_err_dA"), ".2e"), num(rec.get("rel_err_dB"), ".2e")])
    header = ["shape", "backend", "adapter dtype", "status", "fwd+bwd ms", "fwd ms", "transient MB",
              "fwd+bwd slimtune÷this", "transient slimtune÷this", "fwd+bwd ÷ GEMM floor", "rel err y", "rel err dx", "rel err dA",
              "rel err dB"]
    return markdown_table(header, rows)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --quick)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    dtype = resolve_dtype(args.dtype or ("float32" if args.quick else "bfloat16"))
    shapes = [Shape(*s) for s in (QUICK_SHAPES if args.quick else SHAPES)]
    repeats = 5 if args.quick else REPEATS
    env = environment_line()
    print(env, flush=True)
    sink = JsonlSink("layer_compare.jsonl")
    records: list[dict[str, Any]] = []
    for shape in shapes:
        for rec in run_shape(shape, device, dtype, repeats):
            rec.update(torch_version=torch.__version__, peft_version=package_version("peft"),
                       device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
            sink.write(rec)
            records.append(rec)
        print(f"done {shape}", flush=True)
    timing = "CUDA events" if device.type == "cuda" else "perf_counter (CPU: no memory figure)"
    text = (f"{env}\n\nLoRA on one Linear, {dtype_name(dtype)}, alpha = r; median of {repeats} after {WARMUP} "
            f"warm-ups ({timing}); transient = max_memory_allocated - memory_allocated before; rel err: "
            f"Frobenius, vs float64 from the same weights\n\n{summary_table(records)}\n")
    print("\n" + text, flush=True)
    write_out_text("layer_compare.md", text)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
