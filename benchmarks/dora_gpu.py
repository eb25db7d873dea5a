"""DoRA on the GPU: correctness, layer timings against PEFT, and the fused compose kernel against eager PyTorch.

Sections (each guarded: a failure is reported and the next section runs):

1. kernels — the Triton compose kernels (``slimtune.methods.dora.triton_kernels``) against their PyTorch references
   in fp32 / fp16 / bf16 at a few shapes: forward (z form with the ``Σ|v|`` column sums the output path uses,
   and base + lora + bias form), backward ``dbase``, ``dm`` sums (with the bias shift) and ``Σ dy``.
2. parity — slimtune DoRA vs PEFT DoRA on one bias-free Linear 8192×8192, r=384, 4096 tokens, bf16, identical
   weights (PEFT's A, B, m copied into slimtune; bf16 adapters in both): cosine similarity and relative error
   of the output and of dx, dA, dB, dm between the two, and of each against a float64 dense reference; and
   whether slimtune's backward took the saved output (it should) or fell back to recomputing z.
3. layers — the protocol of ``shared/bench/peft_layer.py``: ``nn.Sequential(nn.Linear(d_in, d_out,
   bias=False))`` in bf16, alpha = r, x ``[tokens, d_in]`` requiring grad, 3 warm-ups of ``m(x).sum().backward()``,
   CUDA-event median of 20 forward+backward and of 20 no-grad forwards; transient peak =
   ``max_memory_allocated - memory_allocated`` before the timed passes. Backends: slimtune LoRA / DoRA (adapters
   in the base dtype), DoRA with ``dora_recompute``, DoRA with fp32 adapters, PEFT LoRA / DoRA with its default
   fp32 adapters and with ``autocast_adapter_dtype=False``. Shapes (d_in, d_out, r, tokens): (8192, 8192, 384,
   4096) first, then (3072, 8192, 32, 4096), (4096, 4096, 16, 8192) as time allows.
4. compose — microbenchmark of the elementwise tail, fused Triton vs eager PyTorch, bf16, tokens × d_out in
   256×1024, 2048×4096, 4096×8192, 8192×8192: forward as the layer runs it (in place, g given), backward as
   it runs it (dm from y, partials summed, scaled and cast),
   forward z form, forward with separate base and lora (eager = PEFT's ``result + (g−1)·base + g·lora·s``),
   backward from the saved output (``g·dy``, ``Σ dy ⊙ (y − b)``); a sweep of the kernels' block configuration
   (``triton_kernels.CONFIG``) at 4096×8192; and the row norm at 8192×8192 r=384: factored (fp32-output GEMMs),
   factored without them (bf16 GEMM upcast, fp32 small GEMMs), dense as PEFT.
5. summary — the targets at 8192² r=384 N=4096 in one short table.

Output: compact markdown tables on stdout and in ``$OUT/dora_gpu.md``; one JSON line per record in
``$OUT/dora_gpu.jsonl`` (when ``OUT`` is set). A soft time budget (7 min) skips what would not fit.

    python benchmarks/dora_gpu.py                            # H100: about 3 minutes
    TRITON_INTERPRET=1 python benchmarks/dora_gpu.py --quick  # CPU smoke test, tiny shapes
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import slimtune  # noqa: E402
from slimtune.core.triton import use_triton  # noqa: E402
from slimtune.methods.dora import compose as C  # noqa: E402
from slimtune.methods.dora import norm as N  # noqa: E402

BUDGET_S = 420.0
START = time.monotonic()
RECORDS: list[dict[str, Any]] = []


# -- small helpers ------------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def record(section: str, **fields: Any) -> dict[str, Any]:
    rec = {"section": section, **fields}
    RECORDS.append(rec)
    return rec


def left() -> float:
    return BUDGET_S - (time.monotonic() - START)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device, fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn``: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# -- 1. kernels vs references ------------------------------------------------------------------------------------
def section_kernels(device: torch.device, quick: bool) -> str:
    if not use_triton(torch.empty(0, device=device)):
        return "kernels: skipped (no CUDA / Triton; on the CPU set TRITON_INTERPRET=1)"
    from slimtune.methods.dora import triton_kernels as T, triton_norm as TN

    shapes = [(7, 5), (33, 130)] if quick else [(1, 8), (333, 1000), (4096, 4096), (2048, 8192)]
    dtypes = [torch.float32, torch.float16] if quick else [torch.float32, torch.float16, torch.bfloat16]
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        for n, d in shapes:
            base = torch.randn(n, d, device=device, generator=gen).to(dtype)
            lora = torch.randn(n, d, device=device, generator=gen).to(dtype)
            dy = torch.randn(n, d, device=device, generator=gen).to(dtype)
            gm1 = torch.randn(d, device=device, generator=gen) * 1e-2
            bias = torch.randn(d, device=device, generator=gen).to(dtype)
            out, sums = T.compose_forward(base, gm1, stats=True)
            errs = {"fwd_z": rel_err(out, C.compose_forward_reference(base, gm1)),
                    "fwd_sums": rel_err(sums, C.compose_stats_reference(base, gm1)),
                    "fwd_full": rel_err(T.compose_forward(base, gm1, lora, 0.5, bias)[0],
                                        C.compose_forward_reference(base, gm1, lora, 0.5, bias))}
            got = T.compose_backward(dy, base, gm1 + 1, shift=bias, dy_sum=True)
            want = C.compose_backward_reference(dy, base, gm1 + 1, shift=bias, dy_sum=True)
            errs.update(bwd_dbase=rel_err(got[0], want[0]), bwd_dm=rel_err(got[1], want[1]),
                        bwd_dysum=rel_err(got[2], want[2]))
            ones = torch.ones((), device=device, dtype=dtype).expand(n, d)
            z = base.clone()
            db, dm, _ = T.compose_backward(ones, z, gm1 + 1, dbase_out=z)
            rdb, rdm, _ = C.compose_backward_reference(ones, base, gm1 + 1)
            errs["bwd_inplace_expanded"] = max(rel_err(db, rdb), rel_err(dm, rdm))
            scale = torch.rand(d, device=device, generator=gen) + 0.5
            got = T.compose_backward(dy, base, gm1 + 1, shift=bias, dy_sum=True, scale=scale)
            errs["bwd_scaled"] = max(rel_err(got[1], want[1] * scale), rel_err(got[2], want[2]))
            # the [4, D] vectors: W Aᵀ, A Aᵀ and B (B (A Aᵀ) formed in the kernel), B in this dtype
            r = 384 if d >= 4096 else 7
            a = torch.randn(r, 64, device=device, generator=gen)
            wa = torch.randn(d, r, device=device, generator=gen)
            bm = (torch.randn(d, r, device=device, generator=gen) * 0.05).to(dtype)
            gram = a @ a.t()
            wsq = torch.rand(d, device=device, generator=gen) * 4 + 1 + (bm.float() @ gram * bm.float()).sum(1)
            mag = torch.rand(d, device=device, generator=gen) + 0.5
            errs["vectors"] = rel_err(TN.dora_vectors(wa, gram, bm, wsq, mag, 0.7, 2.0 ** -63),
                                      N.dora_vectors_reference(wa.double(), gram.double(), bm.double(), wsq.double(),
                                                               mag.double(), 0.7, 2.0 ** -63))
            record("kernels", dtype=str(dtype).split(".")[-1], n=n, d=d, **errs)
            rows.append([str(dtype).split(".")[-1], f"{n}×{d}"] + [f"{v:.1e}" for v in errs.values()])
    return "kernels (rel err, Triton vs PyTorch reference)\n\n" + table(
        ["dtype", "N×D", "fwd z", "fwd Σ|v|", "fwd base+lora+b", "bwd dbase", "bwd dm (y − b)", "bwd Σdy",
         "bwd in place, stride-0 dy", "bwd dm scaled", "vectors (vs f64)"], rows)


# -- 2. slimtune DoRA vs PEFT DoRA, identical weights ----------------------------------------------------------------
def section_parity(device: torch.device, quick: bool) -> str:
    import peft

    d_in, d_out, r, tokens = (256, 192, 16, 64) if quick else (8192, 8192, 384, 4096)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).to(device, dtype)
    ours = slimtune.adapt(copy.deepcopy(base), slimtune.LoraConfig(r=r, alpha=r, target_modules=["0"],
                                                                   use_dora=True))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"], use_dora=True),
                                 autocast_adapter_dtype=False)
    gen = torch.Generator(device=device).manual_seed(1)
    their = {k: theirs.get_parameter(f"base_model.model.0.{k}.default.weight")
             for k in ("lora_A", "lora_B", "lora_magnitude_vector")}
    with torch.no_grad():
        their["lora_B"].copy_(torch.randn(d_out, r, device=device, generator=gen) * (0.5 / math.sqrt(r)))
        m = their["lora_magnitude_vector"]
        m.mul_(1 + 0.05 * torch.randn(m.shape, device=device, generator=gen).to(m.dtype))
        layer = ours[0]
        layer.lora_A.copy_(their["lora_A"])
        layer.lora_B.copy_(their["lora_B"])
        layer.magnitude.copy_(m)
    x = torch.randn(tokens, d_in, device=device, generator=gen).to(dtype)
    dy = torch.randn(tokens, d_out, device=device, generator=gen).to(dtype)

    flags = []

    def run(model, params):
        xx = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        y = model(xx)
        flags.append(getattr(y.grad_fn, "route", None))
        y.backward(dy)
        return [y.detach(), xx.grad] + [p.grad for p in params]

    run(ours, [layer.lora_A, layer.lora_B, layer.magnitude])  # dora_recompute="auto" decides on the first pass
    got_ours = run(ours, [layer.lora_A, layer.lora_B, layer.magnitude])
    route = flags[-1]
    record("parity_path", route=route)
    got_theirs = run(theirs, [their["lora_A"], their["lora_B"], their["lora_magnitude_vector"]])
    # float64 dense reference from the same (bf16) values
    w = layer.base_layer.weight.double()
    leaves = [p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    x64 = x.double().requires_grad_()
    ref = N.dora_linear_reference(x64, w, None, *leaves, float(layer.scaling))
    ref.backward(dy.double())
    want = [ref.detach(), x64.grad] + [p.grad for p in leaves]
    rows = []
    for name, a, b, c in zip(("y", "dx", "dA", "dB", "dm"), got_ours, got_theirs, want):
        rec = record("parity", tensor=name, cos_slimtune_peft=cosine(a, b), rel_err_slimtune_peft=rel_err(a, b),
                     rel_err_slimtune_f64=rel_err(a, c), rel_err_peft_f64=rel_err(b, c),
                     shape=[d_in, d_out, r, tokens])
        rows.append([name, f"{rec['cos_slimtune_peft']:.6f}", f"{rec['rel_err_slimtune_peft']:.2e}",
                     f"{rec['rel_err_slimtune_f64']:.2e}", f"{rec['rel_err_peft_f64']:.2e}"])
    del ours, theirs, got_ours, got_theirs, want, ref, x64, leaves, w
    free(device)
    path = {"output": "the saved output (as intended)", "z": "a saved z (unexpected here)",
            "recompute": "a recomputed z (unexpected here)"}.get(route, "?")
    return (f"parity: slimtune DoRA vs PEFT DoRA, {d_in}×{d_out} r={r} N={tokens} bf16, identical weights "
            f"(bf16 adapters both); target cos > 0.9999; slimtune's dm came from {path}\n\n"
            + table(["tensor", "cos(slimtune, PEFT)", "rel err slimtune↔PEFT", "slimtune vs f64", "PEFT vs f64"],
                    rows))


# -- 3. layer timings (the peft_layer.py protocol) ---------------------------------------------------------------
BACKENDS = ("slimtune-lora", "slimtune-dora", "slimtune-dora-recompute", "slimtune-dora-fp32", "peft-lora",
            "peft-dora", "peft-lora-bf16", "peft-dora-bf16")


def build_layer(backend: str, d_in: int, d_out: int, r: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).to(device, dtype)
    dora = "dora" in backend
    if backend.startswith("slimtune"):
        adapter_dtype = torch.float32 if backend.endswith("fp32") else None
        return slimtune.adapt(base, slimtune.LoraConfig(r=r, alpha=r, target_modules=["0"], use_dora=dora,
                                                        adapter_dtype=adapter_dtype,
                                                        dora_recompute=backend.endswith("recompute")))
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"], use_dora=dora)
    return peft.get_peft_model(base, config, autocast_adapter_dtype=not backend.endswith("bf16"))


def time_layer(model: nn.Module, d_in: int, tokens: int, device: torch.device, dtype: torch.dtype,
               repeats: int) -> dict[str, Any]:
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    for _ in range(3):
        model(x).sum().backward()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    fwd_bwd = timer(device, lambda: model(x).sum().backward(), repeats, warmup=0)
    with torch.no_grad():
        fwd = timer(device, lambda: model(x), repeats, warmup=0)
    transient = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None
    return {"fwd_bwd_ms": round(fwd_bwd, 3), "fwd_ms": round(fwd, 3),
            "transient_peak_mb": None if transient is None else round(transient, 1)}


def section_layers(device: torch.device, quick: bool) -> str:
    shapes = [(96, 64, 8, 128), (64, 96, 4, 256)] if quick else \
        [(8192, 8192, 384, 4096), (3072, 8192, 32, 4096), (4096, 4096, 16, 8192)]
    repeats = 5 if quick else 20
    dtype = torch.bfloat16
    rows = []
    for d_in, d_out, r, tokens in shapes:
        by: dict[str, dict[str, Any]] = {}
        for backend in BACKENDS:
            if left() < 30:
                by[backend] = {"status": "skipped (time budget)"}
                continue
            try:
                model = build_layer(backend, d_in, d_out, r, device, dtype)
                by[backend] = {"status": "ok", **time_layer(model, d_in, tokens, device, dtype, repeats)}
            except torch.OutOfMemoryError:
                by[backend] = {"status": "OOM"}
            model = None
            free(device)
            record("layers", backend=backend, d_in=d_in, d_out=d_out, r=r, tokens=tokens, **by[backend])
        lora, dora = by["slimtune-lora"], by["slimtune-dora"]

        def ratio(a: dict, b: dict, key: str) -> str:
            return f"{a[key] / b[key]:.2f}" if a.get(key) and b.get(key) else "—"

        for backend, rec in by.items():
            rows.append([f"{d_in}×{d_out} r={r} N={tokens}", backend, rec["status"], rec.get("fwd_bwd_ms") or "—",
                         rec.get("fwd_ms") or "—", rec.get("transient_peak_mb") or "—",
                         ratio(rec, lora, "fwd_bwd_ms"), ratio(rec, dora, "fwd_bwd_ms"),
                         ratio(rec, lora, "transient_peak_mb")])
        print(f"layers: done {d_in}×{d_out} r={r} N={tokens}", flush=True)
    timing = "CUDA events" if device.type == "cuda" else "perf_counter, CPU (no memory figure)"
    return (f"layers: one bias-free Linear, bf16, alpha = r, median of {repeats} ({timing}); targets at "
            "8192² r=384: slimtune DoRA fwd+bwd ≤ 1.2× slimtune LoRA, ≥ 2.5× faster than PEFT DoRA, transient ≤ 1.1× "
            "slimtune LoRA\n\n"
            + table(["shape", "backend", "status", "fwd+bwd ms", "fwd ms", "transient MB", "fwd+bwd ÷ slimtune LoRA",
                     "fwd+bwd ÷ slimtune DoRA", "transient ÷ slimtune LoRA"], rows))


# -- 4. compose microbenchmark --------------------------------------------------------------------------------
SWEEP = [  # triton_kernels.CONFIG variants: (block_d, tile, programs_per_sm, num_warps)
    (128, 4096, 4, 4), (256, 4096, 8, 4), (256, 8192, 8, 8), (512, 8192, 4, 8), (128, 2048, 16, 4), (256, 2048, 16, 4),
]


def section_compose(device: torch.device, quick: bool) -> str:
    if not use_triton(torch.empty(0, device=device)):
        return "compose: skipped (no CUDA / Triton)"
    from slimtune.methods.dora import triton_kernels as T

    shapes = [(64, 256), (128, 512)] if quick else [(256, 1024), (2048, 4096), (4096, 8192), (8192, 8192)]
    repeats = 5 if quick else 20
    dtype = torch.bfloat16
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)

    def cases_for(n: int, d: int) -> dict[str, tuple[Callable, Callable | None, int]]:
        base = torch.randn(n, d, device=device, generator=gen).to(dtype)
        work = base.clone()
        lora = torch.randn(n, d, device=device, generator=gen).to(dtype)
        dy = torch.randn(n, d, device=device, generator=gen).to(dtype)
        gm1 = torch.randn(d, device=device, generator=gen) * 1e-2
        g = gm1 + 1
        inv = torch.rand(d, device=device, generator=gen) + 0.5  # 1/m'
        bias = torch.randn(d, device=device, generator=gen).to(dtype)
        s = 0.5

        def peft_eager():  # PEFT's composition: result (base + bias) + (g−1)·base + g·lora·s, g fp32 [1, d]
            result = base + bias
            scale = g.view(1, -1)
            return result + (scale - 1) * base + scale * lora * s

        def eager_layer_fwd():  # what the fused pass replaces: the tail, unfused
            return (base.float() * g).to(dtype)

        def eager_layer_bwd():  # g·dy, dm = Σ dy ⊙ y · (1/m') cast to the magnitude's dtype
            d32 = dy.float()
            return (d32 * g).to(dtype), ((d32 * base.float()).sum(0) * inv).to(dtype)

        # (fused, eager or None, bytes moved / element)
        return {
            "fwd as the layer runs it (in place)": (lambda: T.compose_forward(work, gm1, out=work, g=g),
                                                    eager_layer_fwd, 2),
            "bwd as the layer runs it (g·dy, dm from y, finished)": (
                lambda: T.compose_backward(dy, base, g, scale=inv), eager_layer_bwd, 3),
            "fwd z form": (lambda: T.compose_forward(base, gm1, bias=bias),
                           lambda: C.compose_forward_reference(base, gm1, bias=bias), 2),
            "fwd base+lora (PEFT form)": (lambda: T.compose_forward(base, gm1, lora, s, bias), peft_eager, 3),
            "bwd from y (g·dy, Σ dy⊙(y−b))": (lambda: T.compose_backward(dy, base, g, shift=bias),
                                              lambda: C.compose_backward_reference(dy, base, g, shift=bias), 3),
        }

    for n, d in shapes:
        for name, (fused, eager, passes) in cases_for(n, d).items():
            t_fused = timer(device, fused, repeats)
            t_eager = timer(device, eager, repeats) if eager is not None else float("nan")
            gbs = passes * n * d * 2 / (t_fused * 1e-3) / 1e9
            record("compose", case=name, n=n, d=d, fused_ms=t_fused, eager_ms=t_eager)
            rows.append([f"{n}×{d}", name, f"{t_fused:.4f}", f"{t_eager:.4f}", f"{t_eager / t_fused:.2f}",
                         f"{gbs:.0f}"])
        free(device)
    text = ("compose: elementwise tail, bf16, fused Triton vs eager PyTorch (median ms, CUDA events around each "
            "call: small shapes measure launch latency)\n\n"
            + table(["N×D", "case", "fused ms", "eager ms", "speedup", "fused GB/s (min traffic)"], rows))

    # block-configuration sweep at one large shape (the default is triton_kernels.CONFIG)
    n, d = (128, 512) if quick else (4096, 8192)
    default = dict(T.CONFIG)
    sweep_rows = []
    cases = cases_for(n, d)
    picks = ("fwd as the layer runs it (in place)", "bwd as the layer runs it (g·dy, dm from y, finished)")
    try:
        for block_d, tile, pps, warps in SWEEP:
            T.CONFIG.update(block_d=block_d, tile=tile, programs_per_sm=pps, num_warps=warps)
            times = [timer(device, cases[c][0], repeats) for c in picks]
            record("compose_sweep", block_d=block_d, tile=tile, programs_per_sm=pps, num_warps=warps, n=n, d=d,
                   fwd_ms=times[0], bwd_ms=times[1])
            mark = " (default)" if (block_d, tile, pps, warps) == tuple(default[k] for k in
                                                                        ("block_d", "tile", "programs_per_sm",
                                                                         "num_warps")) else ""
            sweep_rows.append([f"{block_d}, {tile}, {pps}, {warps}{mark}", f"{times[0]:.4f}", f"{times[1]:.4f}"])
    finally:
        T.CONFIG.update(default)
    text += (f"\n\ncompose kernels' block configuration at {n}×{d} bf16 (median ms)\n\n"
             + table(["block_d, tile, programs/SM, warps", "fwd (in place)", "bwd from y (finished)"], sweep_rows))

    # the row norm: factored (fp32-output GEMMs; without them) vs dense (PEFT's), time and transient memory
    d, r = (256, 16) if quick else (8192, 384)
    w = torch.randn(d, d, device=device).to(dtype)
    a, b = torch.randn(r, d, device=device).to(dtype), torch.randn(d, r, device=device).to(dtype)
    sq = N.weight_row_norm_sq(w)
    fp32_out = N._fp32_out_gemm(w)

    def without_fp32_out():
        N._MM_OUT_DTYPE[dtype] = False
        try:
            return N.factored_row_norm_sq(w, a, b, 1.0, sq)
        finally:
            N._MM_OUT_DTYPE[dtype] = fp32_out

    ref = N.dense_row_norm(w.double(), a.double(), b.double(), 1.0)
    mag = torch.ones(d, device=device)

    def as_the_layer_runs_it():  # two GEMMs and the vectors kernel; returns ‖V‖² from 1/‖V‖
        mixed, gram = N.factored_norm_parts(w, a)
        return N.dora_vectors(mixed, gram, b, sq, mag, 1.0)[2].reciprocal().square()

    norm_rows = []
    for name, fn in (("factored, as the layer runs it (2 GEMMs + vectors kernel)", as_the_layer_runs_it),
                     (f"factored reference, ‖W‖² cached (fp32-output GEMMs: {fp32_out})",
                      lambda: N.factored_row_norm_sq(w, a, b, 1.0, sq)),
                     ("factored, bf16 GEMM upcast + fp32 small GEMMs", without_fp32_out),
                     ("dense, as PEFT", lambda: torch.linalg.norm(w + 1.0 * (b @ a), dim=1))):
        ms = timer(device, fn, repeats)
        peak = None
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = fn()
            sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        else:
            out = fn()
        norm = out if "dense" in name else out.sqrt()
        err = rel_err(norm, ref)
        record("norm", method=name, d=d, r=r, ms=ms, transient_mb=peak, rel_err_f64=err)
        norm_rows.append([name, f"{ms:.4f}", "—" if peak is None else f"{peak:.1f}", f"{err:.1e}"])
    return text + f"\n\nrow norm ‖W + s·BA‖, {d}×{d} r={r} bf16\n\n" + table(
        ["method", "ms", "transient MB", "rel err vs f64"], norm_rows)


# -- 5. summary -------------------------------------------------------------------------------------------------
def section_summary(device: torch.device, quick: bool) -> str:
    shape = (96, 64, 8, 128) if quick else (8192, 8192, 384, 4096)
    layer = {rec["backend"]: rec for rec in RECORDS if rec["section"] == "layers" and rec.get("status") == "ok"
             and (rec["d_in"], rec["d_out"], rec["r"], rec["tokens"]) == shape}
    cos = [rec["cos_slimtune_peft"] for rec in RECORDS if rec["section"] == "parity"]

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in layer and b in layer and layer[a].get(key) and layer[b].get(key):
            return layer[a][key] / layer[b][key]
        return None

    def row(name: str, value: float | None, target: str, ok: Callable[[float], bool]) -> list[str]:
        if value is None:
            return [name, "—", target, "not measured"]
        return [name, f"{value:.3f}", target, "" if target == "—" else ("✓" if ok(value) else "✗")]

    rows = [
        row("DoRA fwd+bwd ÷ LoRA", ratio("slimtune-dora", "slimtune-lora", "fwd_bwd_ms"), "≤ 1.2", lambda v: v <= 1.2),
        row("DoRA transient ÷ LoRA", ratio("slimtune-dora", "slimtune-lora", "transient_peak_mb"), "≤ 1.1",
            lambda v: v <= 1.1),
        row("PEFT DoRA (default) ÷ DoRA fwd+bwd", ratio("peft-dora", "slimtune-dora", "fwd_bwd_ms"), "≥ 2.5",
            lambda v: v >= 2.5),
        row("PEFT DoRA (bf16 adapters) ÷ DoRA fwd+bwd", ratio("peft-dora-bf16", "slimtune-dora", "fwd_bwd_ms"),
            "> 1", lambda v: v > 1),
        row("dora_recompute fwd+bwd ÷ LoRA", ratio("slimtune-dora-recompute", "slimtune-lora", "fwd_bwd_ms"), "—",
            lambda v: True),
        row("min cosine(slimtune, PEFT) over y, dx, dA, dB, dm", min(cos) if cos else None, "> 0.9999",
            lambda v: v > 0.9999),
    ]
    from slimtune.methods.dora import triton_kernels as T_  # noqa: E402 (CUDA machines only reach here with Triton)

    sweep = [rec for rec in RECORDS if rec["section"] == "compose_sweep"]
    default = tuple(T_.CONFIG[k] for k in ("block_d", "tile", "programs_per_sm", "num_warps"))
    mine = [rec for rec in sweep if (rec["block_d"], rec["tile"], rec["programs_per_sm"], rec["num_warps"]) == default]
    best = min(sweep, key=lambda rec: rec["fwd_ms"] + rec["bwd_ms"]) if sweep else None
    rows.append(["compose defaults (block_d, tile, programs/SM, warps)", ", ".join(map(str, default)), "—",
                 f"fwd {mine[0]['fwd_ms']:.4f} / bwd {mine[0]['bwd_ms']:.4f} ms" if mine else ""])
    if best is not None:
        rows.append(["sweep's best (fwd + bwd)", f"{best['block_d']}, {best['tile']}, {best['programs_per_sm']}, "
                     f"{best['num_warps']}", "—", f"fwd {best['fwd_ms']:.4f} / bwd {best['bwd_ms']:.4f} ms"])
    route = [rec.get("route") for rec in RECORDS if rec["section"] == "parity_path"]
    rows.append(["dm source (parity layer)", route[0] if route else "—", "output", "✓" if route == ["output"] else ""])
    return (f"summary at {shape[0]}×{shape[1]} r={shape[2]} N={shape[3]} bf16\n\n"
            + table(["quantity", "value", "target", ""], rows))


# -- driver ------------------------------------------------------------------------------------------------
def environment() -> str:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return (f"python {platform.python_version()} · torch {torch.__version__} · triton {version('triton')} · "
            f"peft {version('peft')} · transformers {version('transformers')} · {device}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--sections", default="kernels,parity,layers,compose,summary")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    out = os.environ.get("OUT")
    env = environment()
    print(env, flush=True)
    texts, ok = [env], True
    sections = {"kernels": section_kernels, "parity": section_parity, "layers": section_layers,
                "compose": section_compose, "summary": section_summary}
    for name in args.sections.split(","):
        if left() < 20:
            texts.append(f"{name}: skipped (time budget)")
            continue
        t0 = time.monotonic()
        try:
            text = sections[name](device, args.quick)
        except Exception as exc:  # report and go on with the next section
            ok = False
            text = f"{name}: FAILED {type(exc).__name__}: {exc}"
            traceback.print_exc()
        free(device)
        texts.append(text)
        print(f"\n{text}\n({name}: {time.monotonic() - t0:.1f} s)\n", flush=True)
    report = "\n\n".join(texts) + "\n"
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "dora_gpu.md").write_text(report, encoding="utf-8")
        (Path(out) / "dora_gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    print("\n==== summary ====\n" + report, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
