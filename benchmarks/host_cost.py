"""Host (CPU) time per adapted layer: what a host-bound training step pays for each method.

At seq 512 the Llama-3.2-3B step is host-bound on the lent GPU machines (``benchmarks/anatomy.py``: the GPU is
busy ~2/3 of the step), so the Python, dispatcher and launch work per layer is what separates the methods. Each
case runs a 3072x3072 bf16 layer with only 16 tokens (the GPU is never the bottleneck) 300 times between two
synchronizes; the per-call time is the host's cost of one forward(+backward). Components of DoRA are timed on
their own as well. Diagnostic only.

    python benchmarks/host_cost.py            # CUDA if available, else the CPU (reference paths)
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from _common import environment_line, markdown_table, write_out_text

import torch
from torch import nn

import slimtune
from slimtune.methods.dora import compose as DC
from slimtune.methods.dora import function as DF
from slimtune.methods.dora import norm as DN
from slimtune.methods.dora import product as DP


def run_us(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """µs per run of ``fn`` over ``reps`` runs between two synchronizes (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def per_call_us(fn: Callable[[], object], device: torch.device, reps: int = 300) -> float:
    for _ in range(20):
        fn()
    return min(run_us(fn, device, reps) for _ in range(3))


def layer(config, device, dtype, d: int = 3072, tokens: int = 16) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d, bias=False)).to(device, dtype)
    if config is not None:
        slimtune.adapt(model, config)
        with torch.no_grad():
            for p in slimtune.trainable_parameters(model):
                p.add_(torch.randn_like(p) * 1e-3)
    else:
        model.requires_grad_(False)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    return model, x


def cases(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    t = ["0"]
    configs = {
        "frozen Linear (no adapter)": None,
        "lora": slimtune.LoraConfig(r=32, alpha=32, target_modules=t),
        "dora": slimtune.LoraConfig(r=32, alpha=32, target_modules=t, use_dora=True),
        "dora recompute": slimtune.LoraConfig(r=32, alpha=32, target_modules=t, use_dora=True, dora_recompute=True),
        "loha structured": slimtune.LohaConfig(r=32, alpha=32, target_modules=t, path="structured"),
        "loha folded": slimtune.LohaConfig(r=32, alpha=32, target_modules=t, path="folded"),
        "lokr": slimtune.LokrConfig(r=32, alpha=32, target_modules=t),
        "hra": slimtune.HraConfig(r=32, target_modules=t),
    }
    out: dict[str, Callable[[], object]] = {}
    for name, config in configs.items():
        model, x = layer(config, device, dtype)
        out[f"{name}: fwd+bwd"] = lambda m=model, x=x: m(x).sum().backward()
        out[f"{name}: fwd (grad)"] = lambda m=model, x=x: m(x)
    model, x = layer(configs["dora"], device, dtype)
    dora = model[0]
    w = dora.weight_operand()
    a, b = dora.lora_A, dora.lora_B
    out["dora part: cached ‖W‖²"] = dora.cached_weight_row_norm_sq
    out["dora part: norm GEMMs"] = lambda: DN.factored_norm_parts(w, a.detach())
    mixed, parts = DN.factored_norm_parts(w, a.detach())
    wsq = dora.cached_weight_row_norm_sq()
    out["dora part: vectors"] = lambda: DN.dora_vectors(mixed, parts, b.detach(), wsq, dora.magnitude.detach(),
                                                        dora.scaling, 2.0 ** -63)
    z = torch.randn(16, 3072, device=device, dtype=dtype)
    vec = DN.dora_vectors(mixed, parts, b.detach(), wsq, dora.magnitude.detach(), dora.scaling, 2.0 ** -63)
    out["dora part: compose fwd"] = lambda: DC.compose_forward(z, vec[0], out=z, g=vec[1])
    dy = torch.randn_like(z)
    out["dora part: compose bwd"] = lambda: DC.compose_backward(dy, z, vec[1], scale=vec[3])

    def identity_function(on_backward: Callable[[], object]) -> type[torch.autograd.Function]:
        class Identity(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                on_backward()
                return g

        return Identity

    xi = torch.randn(16, 8, device=device, requires_grad=True)
    plain = identity_function(lambda: None)
    out["autograd Function fwd+bwd (identity)"] = lambda: plain.apply(xi).sum().backward()
    with_compose = identity_function(lambda: DC.compose_backward(dy, z, vec[1], scale=vec[3]))
    zl = z.clone().requires_grad_(True)
    out["identity Function + compose bwd in its backward"] = lambda: with_compose.apply(zl).sum().backward()
    mag = dora.magnitude
    xp = torch.randn(16, 3072, device=device, dtype=dtype, requires_grad=True)
    out["dora one Function (output route): fwd+bwd"] = lambda: DF.DoraLinearFunction.apply(
        xp, w, None, a, b, mag, 1.0, 0.0, 0, wsq, "output", 2.0 ** -63).sum().backward()
    out["dora one Function, vectors formed ahead (prepass): fwd+bwd"] = lambda: DF.DoraLinearFunction.apply(
        xp, w, None, a, b, mag, 1.0, 0.0, 0, wsq, "output", 2.0 ** -63, vec).sum().backward()
    out["dora part: scale in place (PyTorch op, vectors ahead)"] = lambda: DC.scale_in_place(z, vec[1])
    dz = torch.empty_like(z)

    def tail_backward_in_torch_ops():  # what the compose backward does, as PyTorch ops (dz = g·dy, dm = Σ dy ⊙ y / m')
        torch.mul(dy, vec[1], out=dz)
        return torch.mul(dy, z).sum(0, dtype=torch.float32).mul_(vec[3])

    out["dora part: compose bwd as PyTorch ops"] = tail_backward_in_torch_ops
    out.update(prepass_cases(device, dtype))
    out["dora product only (z route): fwd+bwd"] = lambda: DF.DoraProductFunction.apply(
        xp, w, a, b, mag, 1.0, 0.0, 0, wsq, 0.0)[0].sum().backward()
    out.update(llama_layer_cases(device, dtype))
    out.update(unet_piece_cases(device, dtype))
    return out


def unet_piece_cases(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Host pieces of a UNet step (32 channels at 8x8: the arithmetic stays small): a frozen convolution's input
    gradient through ``torch.nn.grad.conv2d_input`` and through the op it wraps (``aten_grads.conv_input_grad``);
    a LoKr convolution asking its path (``StructuredAdapter.choose``)."""
    from slimtune.core.aten_grads import conv_input_grad

    weight = torch.randn(32, 32, 3, 3, device=device, dtype=dtype)
    grad = torch.randn(1, 32, 8, 8, device=device, dtype=dtype)
    shape = (1, 32, 8, 8)
    lokr = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)).to(device, dtype)
    slimtune.adapt(lokr, slimtune.LokrConfig(r=4, alpha=4, target_modules=["0"]))
    x = torch.randn(shape, device=device, dtype=dtype)
    return {
        "unet: conv input grad, torch.nn.grad.conv2d_input": lambda: torch.nn.grad.conv2d_input(
            shape, weight, grad, (1, 1), (1, 1), (1, 1), 1),
        "unet: conv input grad, aten_grads.conv_input_grad": lambda: conv_input_grad(
            grad, weight, shape, (1, 1), (1, 1), (1, 1), 1),
        "unet: LoKr conv, path query (choose)": lambda: lokr[0].choose(x, True),
    }


def prepass_cases(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The DoRA pre-pass (``methods.dora.prepass``) of a 28-layer Llama with DoRA on all seven projections (196
    layers, the 3B model's count; hidden 256, so the launch's GPU work stays small): host µs per forward's pre-pass."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.methods.dora import DoraLinear
    from slimtune.methods.dora.prepass import VectorPrepass

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=28, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).to(device, dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=32, alpha=32, use_dora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    prepass = VectorPrepass([m for m in model.modules() if isinstance(m, DoraLinear)])
    return {f"dora prepass, {len(prepass.layers)} layers (one forward's)": prepass}


def llama_layer_cases(device: torch.device, dtype: torch.dtype, d: int = 3072, d_ff: int = 8192,
                      tokens: int = 16) -> dict[str, Callable[[], object]]:
    """The frozen RMSNorm and SwiGLU of a Llama layer, fwd+bwd: transformers' module, slimtune's lean Function, and
    (the norm) PyTorch's own ``F.rms_norm`` (one fused kernel each way on CUDA, its own rounding)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from slimtune.core.rms_norm import RmsNormFunction
    from slimtune.core.swiglu import SwigluFunction

    torch.manual_seed(0)
    norm = LlamaRMSNorm(d, eps=1e-5).to(device, dtype).requires_grad_(False)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d_ff, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(tokens, d_ff, device=device, dtype=dtype, requires_grad=True)
    silu = torch.nn.functional.silu
    return {
        "rmsnorm transformers module: fwd+bwd": lambda: norm(x).sum().backward(),
        "rmsnorm lean Function: fwd+bwd": lambda: RmsNormFunction.apply(x, norm.weight, 1e-5).sum().backward(),
        "rmsnorm F.rms_norm: fwd+bwd": lambda: torch.nn.functional.rms_norm(
            x, (d,), norm.weight, 1e-5).sum().backward(),
        "swiglu plain silu(g)*u: fwd+bwd": lambda: (silu(g) * u).sum().backward(),
        "swiglu lean Function: fwd+bwd": lambda: SwigluFunction.apply(g, u).sum().backward(),
    }


def breakdown(device: torch.device, dtype: torch.dtype, reps: int = 200) -> str:
    """Inclusive host time per fwd+bwd of the functions on each method's path (timing wrappers, ~1 us each).

    A module-level function is imported by name into the modules that call it, so its wrapper replaces it in every
    loaded ``slimtune`` module bound to it (its label names the module that defines it)."""
    import functools
    import types

    from slimtune.core import frozen, products, structured
    from slimtune.core.structured_adapter import StructuredAdapter
    from slimtune.core.triton import HAS_TRITON
    from slimtune.methods.dora import DoraLinear
    from slimtune.methods.loha.ops import LohaFoldOp, LohaLinearOp
    from slimtune.methods.lokr.factors import LokrFactors

    totals: dict[str, float] = {}

    def timed(owner, name: str, static: bool = False) -> None:
        fn = getattr(owner, name)
        if getattr(fn, "_timed", False):  # already wrapped (listed under two owners)
            return
        if isinstance(owner, types.ModuleType):
            label = f"{fn.__module__.removeprefix('slimtune.')}.{name}"
        else:
            label = f"{owner.__qualname__}.{name}"

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0

        wrapper._timed = True
        if isinstance(owner, types.ModuleType):
            for module in list(sys.modules.values()):
                if getattr(module, "__name__", "").startswith("slimtune") and vars(module).get(name) is fn:
                    setattr(module, name, wrapper)
        else:
            setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    owners: list[tuple[object, list[str]]] = []
    if HAS_TRITON:  # the kernels' host side (imported here, before patching: their callers import them lazily)
        from slimtune.core import triton as core_triton
        from slimtune.methods.dora import triton_kernels as T, triton_norm as TN
        from slimtune.methods.loha import triton_kernels  # noqa: F401 (binds core.triton.launch too)

        owners += [(core_triton, ["launch"]), (T, ["_grid", "compose_backward", "compose_forward"]),
                   (TN, ["dora_vectors", "vectors_and_compose"])]
    owners += [(DN, ["factored_norm_parts"]), (DP, ["dora_product", "product_forward", "product_backward"]),
               (frozen, ["saved_with_weight", "save_with_weight", "materialize"]),
               (structured, ["base_backward"]), (structured._Backward, ["__init__"]),
               (products, ["rows_kr", "cols_kr", "rows_kr_grad", "cols_kr_grad", "lowrank_grad", "sum_bmm",
                           "bmm_left"]),
               (LohaFoldOp, ["fold", "fold_backward"]), (LohaLinearOp, ["add_delta", "delta_backward"]),
               (LokrFactors, ["build", "grads"]), (StructuredAdapter, ["forward", "choose"])]
    for owner, names in owners:
        for name in names:
            timed(owner, name)
    for cls in (DF.DoraLinearFunction, DF.DoraTailFunction, DF.DoraProductFunction, structured.StructuredFunction,
                structured.FoldedFunction):
        for name in ("forward", "backward"):
            timed(cls, name, static=True)
    timed(DoraLinear, "forward")
    configs = {"dora": slimtune.LoraConfig(r=32, alpha=32, target_modules=["0"], use_dora=True),
               "loha folded": slimtune.LohaConfig(r=32, alpha=32, target_modules=["0"], path="folded"),
               "loha structured": slimtune.LohaConfig(r=32, alpha=32, target_modules=["0"], path="structured"),
               "lokr": slimtune.LokrConfig(r=32, alpha=32, target_modules=["0"])}
    tables = []
    for name, config in configs.items():
        model, x = layer(config, device, dtype)

        def step():
            t0 = time.perf_counter()
            y = model(x)
            t1 = time.perf_counter()
            y.sum().backward()
            totals["(fwd total)"] = totals.get("(fwd total)", 0.0) + t1 - t0
            totals["(bwd total incl. sum)"] = totals.get("(bwd total incl. sum)", 0.0) + time.perf_counter() - t1

        for _ in range(20):
            step()
        torch.cuda.synchronize() if device.type == "cuda" else None
        totals.clear()
        for _ in range(reps):
            step()
        rows = [[k, f"{1e6 * v / reps:.1f}"] for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
        tables.append(markdown_table([f"{name} fwd+bwd, inclusive", "host us per step"], rows))
        print(tables[-1], flush=True)
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the case names to run")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, fn in cases(device, dtype).items():
        if args.only and not any(s in name for s in args.only):
            continue
        rows.append([name, f"{per_call_us(fn, device):.1f}"])
        print(rows[-1], flush=True)
    if args.only and "breakdown" in args.only:
        text = breakdown(device, dtype)
        print(text)
        write_out_text("host_cost_breakdown.md", text)
    if device.type == "cuda" and (not args.only or "profile" in args.only):
        from torch.profiler import ProfilerActivity, profile

        model, x = layer(slimtune.LoraConfig(r=32, alpha=32, target_modules=["0"], use_dora=True), device, dtype)
        for _ in range(5):
            model(x).sum().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                model(x).sum().backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        print(table)
        write_out_text("host_cost_profile.txt", table)
    text = environment_line() + "\n\n" + markdown_table(["case (3072x3072, 16 tokens)", "host us per call"], rows)
    write_out_text("host_cost.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
