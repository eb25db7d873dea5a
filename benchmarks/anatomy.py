"""Where a training step's time goes on the GPU: host dispatch vs device busy time, per method.

Diagnostic only (the claimed numbers come from the comparison scripts). For each configuration:

* ``wall``: the step with a synchronize (as the protocol times it), median of steps 4..N;
* ``host``: the time until the host has queued the whole step (no synchronize): when ``host`` ≈ ``wall`` and
  ``gpu`` is well below it, the step is host-bound and fewer / cheaper launches are what helps;
* ``gpu``: the sum of kernel times of one step (torch.profiler), and the number of kernels;
* ``syncs``: host-device synchronisations inside one step (``torch.cuda.set_sync_debug_mode``).

Sections: ``layer`` — one bias-free Linear 8192x8192, r=384, 4096 tokens, bf16 (LoRA, DoRA and variants);
``model`` — the Llama-3.2-3B shape, r=32, batch 4, seq 512 (methods and their path / recompute variants);
``check`` — bf16 kernels and layers against float64; ``kernels`` — LoHa's fused kernels' device time (tile sides,
fold_grads split or not); ``launch`` — host cost of a launch (slimtune's kernels launch through Triton's own path,
``kernel[grid](...)``; the hand-made launch shortcut this section once compared it with was removed, so only that
path is timed, beside a few small torch ops); ``gc`` — Python's collector inside the step; ``cprofile`` — host time
by Python function.

    python benchmarks/anatomy.py [--sections layer model check kernels launch gc cprofile] [--methods lora loha]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any, Callable

from _common import JsonlSink, environment_line, markdown_table, write_out_text

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import slimtune
from slimtune.models.presets import build_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config_for(method: str, r: int, targets: list[str], **extra: Any) -> Any:
    if method == "lora":
        return slimtune.LoraConfig(r=r, alpha=r, target_modules=targets, **extra)
    if method == "dora":
        return slimtune.LoraConfig(r=r, alpha=r, target_modules=targets, use_dora=True, **extra)
    if method == "loha":
        return slimtune.LohaConfig(r=r, alpha=r, target_modules=targets, **extra)
    if method == "lokr":
        return slimtune.LokrConfig(r=r, alpha=r, target_modules=targets, **extra)
    if method == "hra":
        return slimtune.HraConfig(r=r, target_modules=targets, **extra)
    raise ValueError(method)


def training_step(method: str, extra: dict, seq: int = 512, batch: int = 4, r: int = 32) -> Callable[[], None]:
    """One protocol step of the adapted Llama-3.2-3B shape (logits released before backward), as a closure."""
    model = build_model("llama-3.2-3b", "cuda", "bfloat16")
    if method != "none":
        slimtune.adapt(model, config_for(method, r, TARGETS, **extra))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 128000, (batch, seq), device="cuda")

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        del out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(step: Callable[[], None], steps: int = 10, prof_top: int = 0) -> dict[str, Any]:
    """wall / host / gpu / kernels / syncs of ``step`` (see the module docstring)."""
    wall, host = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    sync_where = sorted({str(w.message)[:80] for w in caught})[:3]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    dev = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in events if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA") and getattr(e, dev) > 0]
    gpu_ms = sum(getattr(e, dev) for e in kernels) / 1000
    launches = sum(e.count for e in kernels)
    top = ""
    if prof_top:
        top = events.table(sort_by=dev, row_limit=prof_top)
    skip = min(3, steps - 1)
    return {"wall_ms": 1000 * statistics.median(wall[skip:]), "host_ms": 1000 * statistics.median(host[skip:]),
            "wall_all_ms": [round(1000 * w, 2) for w in wall], "gpu_ms": gpu_ms, "kernels": launches,
            "syncs": syncs, "sync_where": sync_where, "top": top}


def layer_section(sink: JsonlSink, variants: list[tuple[str, str, dict]], d: int = 8192, r: int = 384,
                  tokens: int = 4096) -> str:
    rows, tops = [], []
    for label, method, extra in variants:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d, d, bias=False)).cuda().bfloat16()
        slimtune.adapt(model, config_for(method, r, ["0"], **extra))
        with torch.no_grad():
            for p in slimtune.trainable_parameters(model):
                if p.dim() == 2 and p.abs().max() == 0:
                    p.normal_(0, 1e-3)
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def step() -> None:
            model(x).sum().backward()

        for _ in range(3):
            step()
        res = measure(step, steps=23, prof_top=14)
        # the protocol's number: CUDA events around each fwd+bwd, median of 20, three blocks
        blocks = []
        for _ in range(3):
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            blocks.append(statistics.median(times))
        res["event_ms_blocks"] = blocks
        sink.write({"section": "layer", "label": label, **{k: v for k, v in res.items() if k != "top"}})
        rows.append([label, " / ".join(f"{b:.3f}" for b in blocks), f"{res['host_ms']:.3f}", f"{res['gpu_ms']:.3f}",
                     res["kernels"], res["syncs"]])
        tops.append(f"### {label}\n{res['top']}")
        print(rows[-1], flush=True)
        del model, x
        torch.cuda.empty_cache()
    table = markdown_table(["layer 8192² r=384 N=4096", "event ms (3 blocks)", "host ms", "gpu ms", "kernels",
                            "syncs"], rows)
    return table + "\n\n" + "\n\n".join(tops)


def model_section(sink: JsonlSink, variants: list[tuple[str, str, dict]], seq: int = 512, batch: int = 4,
                  r: int = 32) -> str:
    rows = []
    for label, method, extra in variants:
        step = None
        try:
            step = training_step(method, extra, seq, batch, r)
            torch.cuda.reset_peak_memory_stats()
            res = measure(step, steps=8)
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            sink.write({"section": "model", "label": label, "seq": seq,
                        **{k: v for k, v in res.items() if k != "top"}})
            rows.append([label, f"{res['wall_ms']:.1f}", f"{res['host_ms']:.1f}", f"{res['gpu_ms']:.1f}",
                         res["kernels"], res["syncs"], f"{res['peak_gib']:.2f}",
                         " ".join(f"{w:.0f}" for w in res["wall_all_ms"])])
            print(rows[-1], res["sync_where"], flush=True)
        except Exception as exc:  # keep going: a diagnostic
            rows.append([label, f"failed: {type(exc).__name__}: {str(exc)[:120]}", "", "", "", "", "", ""])
            print(rows[-1], flush=True)
        finally:
            step = None
            torch.cuda.empty_cache()
    return markdown_table([f"3B seq {seq} b{batch} r{r}", "wall ms", "host ms", "gpu ms", "kernels", "syncs",
                           "peak GiB", "all steps ms"], rows)


LAYER_VARIANTS = {
    "lora": [("lora", "lora", {})],
    "dora": [("dora", "dora", {}), ("dora recompute", "dora", {"dora_recompute": True})],
}
MODEL_VARIANTS = {
    "lora": [("lora", "lora", {})],
    "dora": [("dora", "dora", {})],
    "loha": [("loha auto", "loha", {})],
    "loha-paths": [("loha structured", "loha", {"path": "structured"}), ("loha folded", "loha", {"path": "folded"})],
    "lokr": [("lokr auto", "lokr", {})],
    "hra": [("hra", "hra", {})],
    "none": [("full fine-tune", "none", {})],
}


def warm_step(method: str, extra: dict) -> Callable[[], None]:
    """:func:`training_step` after 3 steps, synchronised."""
    step = training_step(method, extra)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def cprofile_section(variants: list[tuple[str, str, dict]], steps: int = 3, top: int = 22) -> str:
    """Host time by Python function (cProfile, ``tottime``) over ``steps`` model steps, per variant."""
    import cProfile
    import io
    import pstats

    parts = []
    for label, method, extra in variants:
        step = warm_step(method, extra)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        text = "\n".join(line[:150] for line in buf.getvalue().splitlines() if line.strip())
        parts.append(f"### cProfile {label} ({steps} steps)\n{text}")
        print(parts[-1], flush=True)
        step = None
        torch.cuda.empty_cache()
    return "\n\n".join(parts)


def gc_section(variants: list[tuple[str, str, dict]], steps: int = 8) -> str:
    """Python's garbage collector inside the step: collections and their time per step (``gc.callbacks``), the
    runtime-API calls the host makes (torch.profiler), and the step with the model's objects frozen out of the
    collector (``gc.freeze()``) and with collection off."""
    import gc

    rows = []
    for label, method, extra in variants:
        step = warm_step(method, extra)
        spans: list[tuple[int, float]] = []
        started: list[float] = []

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                spans.append((info["generation"], time.perf_counter() - started.pop()))

        gc.callbacks.append(on_gc)
        try:
            plain = _wall_steps(step, steps)
        finally:
            gc.callbacks.remove(on_gc)
        per_gen = {g: (sum(1 for gg, _ in spans if gg == g), 1000 * sum(d for gg, d in spans if gg == g))
                   for g in (0, 1, 2)}
        gc.collect()
        gc.freeze()
        frozen = _wall_steps(step, steps)
        gc.unfreeze()
        gc.disable()
        try:
            off = _wall_steps(step, steps)
        finally:
            gc.enable()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        api = sorted((e for e in prof.key_averages() if e.key.startswith("cu")), key=lambda e: -e.cpu_time_total)
        api_text = ", ".join(f"{e.key} {e.count}x {e.cpu_time_total / 1000:.1f} ms" for e in api[:6])
        rows.append([label, f"{plain:.1f}", " ".join(f"g{g}: {n}x {ms:.1f} ms" for g, (n, ms) in per_gen.items()),
                     f"{frozen:.1f}", f"{off:.1f}", api_text])
        print(rows[-1], flush=True)
        step = None
        gc.collect()
        torch.cuda.empty_cache()
    return markdown_table(["3B step", "wall ms", f"collections in {steps} steps (count, ms)", "frozen ms", "gc off ms",
                           "runtime API, one step (count, host ms)"], rows)


def _wall_steps(step: Callable[[], None], steps: int) -> float:
    """Median wall ms of ``steps`` synchronised steps."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def check_section() -> str:
    """bf16 on the GPU (the CPU interpreter cannot check it): the fused kernels and whole layers against float64."""
    from slimtune.methods.dora.norm import dora_linear_reference
    from slimtune.methods.loha import LohaLayer, loha_delta_weight
    from slimtune.methods.loha import triton_kernels as L

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp_min(1e-300))

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    M, Kd, r = 3072, 8192, 32
    w = torch.randn(M, Kd, device="cuda", generator=gen).bfloat16()
    f = [(torch.randn(*shape, device="cuda", generator=gen) * 0.05).bfloat16()
         for shape in ((M, r), (r, Kd), (M, r), (r, Kd))]
    leaves = [t.double().requires_grad_() for t in f]
    delta = 0.7 * (leaves[0] @ leaves[1]) * (leaves[2] @ leaves[3])
    g = torch.randn(M, Kd, device="cuda", generator=gen).bfloat16()
    delta.backward(g.double())
    rows.append(["loha fold 3072x8192 r32 bf16", f"{rel(L.fold(w, *f, 0.7), w.double() + delta):.2e}"])
    for parts in (1, None):  # unsplit, and the split the rule picks (block counters, last program reduces)
        L.GRAD_PARTS = parts
        try:
            grads = L.fold_grads(g, *f, 0.7, w=w)
            again = [L.fold_grads(g, *f, 0.7, w=w) for _ in range(20)]
            same = all(torch.equal(a, b) for run in again for a, b in zip(run, grads))
            counters = all(int(c.abs().sum()) == 0 for c in L._COUNTERS.values())
            rows.append([f"loha fold grads, {L.grad_parts(M, Kd, g.device)} part(s): rel err (4 grads, W'); "
                         "bitwise same over 20 repeats; counters zero",
                         " ".join(f"{rel(a, b.grad):.2e}" for a, b in zip(grads, leaves))
                         + f" {rel(grads[4], w.double() + delta):.2e}; {same}; {counters}"])
        finally:
            L.GRAD_PARTS = None
    for name, layer_cls in (("loha folded layer", "loha"), ("dora layer", "dora")):
        torch.manual_seed(0)
        base = nn.Linear(3072, 3072, bias=False).cuda().bfloat16()
        if layer_cls == "loha":
            layer = LohaLayer(base, 32, 32.0, init_weights=False, path="folded")
            with torch.no_grad():
                for p in layer.peft_parameters().values():
                    p.mul_(0.1)
        else:
            model = slimtune.adapt(nn.Sequential(base), slimtune.LoraConfig(r=32, alpha=32, target_modules=["0"],
                                                                            use_dora=True))
            layer = model[0]
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.02)
                layer.magnitude.mul_(1.05)
        x = torch.randn(4, 512, 3072, device="cuda").bfloat16().requires_grad_()
        for _ in range(2):  # dora_recompute="auto" decides on the first pass
            x.grad = None
            for p in layer.peft_parameters().values():
                p.grad = None
            y = (model if layer_cls == "dora" else layer)(x)
            dy = torch.randn_like(y)
            y.backward(dy)
        params = {k: p.detach().double().requires_grad_() for k, p in layer.peft_parameters().items()}
        x64 = x.detach().double().requires_grad_()
        w64 = base.weight.double()
        if layer_cls == "loha":
            ref = torch.nn.functional.linear(x64, w64 + loha_delta_weight(
                params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"], None, None,
                layer.scaling, w64.shape))
        else:
            ref = dora_linear_reference(x64, w64, None, params["lora_A.weight"], params["lora_B.weight"],
                                        params["lora_magnitude_vector"], layer.scaling)
        ref.backward(dy.double())
        errs = [rel(y, ref), rel(x.grad, x64.grad)] + [rel(p.grad, q.grad) for p, q in
                                                       zip(layer.peft_parameters().values(), params.values())]
        rows.append([f"{name} 3072² 2048 tok bf16 (y, dx, params)", " ".join(f"{e:.1e}" for e in errs)])
    from slimtune.methods.lokr import LokrLayer, lokr_delta_weight, lokr_factors

    for d_out, d_in in ((3072, 3072), (8192, 3072)):
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False).cuda().bfloat16()
        layer = LokrLayer(base, 32, 32.0, init_weights=False)
        with torch.no_grad():
            for p in layer.peft_parameters().values():
                p.mul_(0.3)
        x = torch.randn(4, 512, d_in, device="cuda").bfloat16().requires_grad_()
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        params = {k: p.detach().double().requires_grad_() for k, p in layer.peft_parameters().items()}
        x64 = x.detach().double().requires_grad_()
        w1, w2 = lokr_factors(tuple(params), tuple(params.values()), torch.float64)
        ref = torch.nn.functional.linear(x64, base.weight.double() + lokr_delta_weight(w1, w2, layer.scaling,
                                                                                        base.weight.shape))
        ref.backward(dy.double())
        errs = [rel(y, ref), rel(x.grad, x64.grad)] + [rel(p.grad, q.grad) for p, q in
                                                       zip(layer.peft_parameters().values(), params.values())]
        rows.append([f"lokr {layer.last_path} layer {d_out}x{d_in} 2048 tok bf16 (y, dx, params)",
                     " ".join(f"{e:.1e}" for e in errs)])
    return markdown_table(["check vs float64", "rel err"], rows)


def kernels_section(tokens: int = 2048, r: int = 32) -> str:
    """Device time of LoHa's fused kernels at the Llama-3.2-3B projection shapes (kernel time, mean of 10) beside
    the layer's own GEMM, the bytes they move per microsecond; tile sides 64 / 32 / 128, fold_grads unsplit and
    split."""
    from slimtune.methods.loha import triton_kernels as L

    def ms(fn: Callable[[], object], reps: int = 10) -> float:
        """Device ms per call of the kernels ``fn`` launches (torch.profiler's kernel times: a kernel shorter than
        its host launch would otherwise time the host)."""
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        dev = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        return sum(getattr(e, dev) for e in events) / 1000 / reps

    rows = []
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for d_out, d_in in ((3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192)):
        w = torch.randn(d_out, d_in, **bf16)
        f = [torch.randn(s, **bf16) * 0.1 for s in ((d_out, r), (r, d_in), (d_out, r), (r, d_in))]
        g = torch.randn(d_out, d_in, **bf16)
        x, dy = torch.randn(tokens, d_in, **bf16), torch.randn(tokens, d_out, **bf16)
        dense_mb = d_out * d_in * 2 / 1e6
        t_gemm = ms(lambda: dy.t() @ x)
        for block in (64, 32, 128):  # the tile side
            for parts in (1, None):  # fold_grads unsplit, and split by the rule
                L.BLOCK, L.GRAD_PARTS = block, parts
                try:
                    t_fold = ms(lambda: L.fold(w, *f, 0.5))
                    t_grads = ms(lambda: L.fold_grads(g, *f, 0.5, w=w))
                    n = L.grad_parts(d_out, d_in, g.device)
                    rows.append([f"{d_out}x{d_in}", block, n, f"{t_fold:.3f}", f"{2 * dense_mb / t_fold:.0f}",
                                 f"{t_grads:.3f}", f"{3 * dense_mb / t_grads:.0f}", f"{t_gemm:.3f}"])
                except Exception as exc:  # a diagnostic (a tile may not fit)
                    rows.append([f"{d_out}x{d_in}", block, parts, f"{type(exc).__name__}: {str(exc)[:100]}", "", "",
                                 "", ""])
                finally:
                    L.BLOCK, L.GRAD_PARTS = 64, None
                print(rows[-1], flush=True)
    return markdown_table(["W (d_out x d_in), bf16, r=32", "BLOCK", "fold_grads parts", "fold ms", "fold GB/s",
                           "fold_grads+W' ms", "fold_grads GB/s (G, W, W' once)", f"GEMM dyᵀx ({tokens} tokens) ms"],
                          rows)


def launch_section() -> str:
    """Host cost of one launch (median of 2000): small Triton kernels (launched through Triton's own path,
    ``kernel[grid](...)``, as :func:`slimtune.core.triton.launch` does), a tiny torch op, a tiny GEMM."""
    from slimtune.methods.dora import triton_kernels as T
    from slimtune.methods.loha import triton_kernels as L

    x = torch.randn(64, 64, device="cuda")
    g = torch.randn(64, device="cuda")
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    f = [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.1
         for s in ((256, 32), (32, 256), (256, 32), (32, 256))]
    grad = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    cases = {"triton compose_forward 64x64": lambda: T.compose_forward(x, g, out=x),
             "triton loha fold 256x256 r32": lambda: L.fold(w, *f, 0.5),
             "triton loha fold_grads 256x256 r32": lambda: L.fold_grads(grad, *f, 0.5, w=w),
             "torch.add 64x64": lambda: torch.add(x, x),
             "torch.mm 64x64": lambda: torch.mm(x, x),
             "torch.empty 64": lambda: torch.empty(64, device="cuda")}
    rows = []
    for name, fn in cases.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(2000):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        rows.append([name, f"{1e6 * statistics.median(times):.1f}"])
    return markdown_table(["launch", "host us (median)"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", nargs="+", default=["layer", "model"])
    parser.add_argument("--layer-methods", nargs="+", default=["lora", "dora"])
    parser.add_argument("--methods", nargs="+", default=["lora", "dora", "loha", "lokr"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--cprofile-max", type=int, default=8)
    args = parser.parse_args(argv)
    sink = JsonlSink("anatomy.jsonl")
    parts = [environment_line()]
    print(parts[0], flush=True)
    if "layer" in args.sections:
        parts.append(layer_section(sink, [v for m in args.layer_methods for v in LAYER_VARIANTS[m]]))
    if "model" in args.sections:
        parts.append(model_section(sink, [v for m in args.methods for v in MODEL_VARIANTS[m]], seq=args.seq))
    if "check" in args.sections:
        try:
            parts.append(check_section())
        except Exception as exc:  # a diagnostic: report and go on
            parts.append(f"check failed: {type(exc).__name__}: {str(exc)[-600:]}")
        print(parts[-1], flush=True)
    if "kernels" in args.sections:
        parts.append(kernels_section())
        print(parts[-1], flush=True)
    if "launch" in args.sections:
        parts.append(launch_section())
        print(parts[-1], flush=True)
    if "gc" in args.sections:
        parts.append(gc_section([v for m in args.methods for v in MODEL_VARIANTS[m]]))
    if "cprofile" in args.sections:
        parts.append(cprofile_section([v for m in args.methods for v in MODEL_VARIANTS[m]][:args.cprofile_max]))
    write_out_text("anatomy.md", "\n\n".join(parts))
    print("\n\n".join(p.split("\n\n### ")[0] for p in parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
