"""How Inductor compiles a LoRA layer's sums ``y = x Wᵀ + s·(x Aᵀ) Bᵀ`` and ``dx = dy W + g A`` on this GPU, in four
forms of the same autograd Function (forward and backward, then a pointwise consumer, as rotary or SwiGLU follow
q/k/v and gate/up): in place (``addmm_``, the eager form), out of place on the 2-D products, out of place on the
3-D views of the products (PEFT's ``result + lora_B(lora_A(x)) * scaling`` adds views), slimtune's
``core.compute.add_product`` (what its LoRA Functions use), and PEFT's plain ops through autograd. Prints kernels, device-to-device copies, GPU time and wall time per compiled call (CUDA only)::

    python benchmarks/compiled_sum_forms.py --tokens 2048 --d 3072 --rank 32
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from slimtune.core.compute import add_product


def _function(form: str) -> type[torch.autograd.Function]:
    class LowRank(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, a, b, s: float):
            x2 = x.reshape(-1, x.shape[-1])
            h = F.linear(x2, a)
            if form == "inplace":
                y = F.linear(x2, w).addmm_(h, b.t(), alpha=s)
            elif form == "outofplace":
                y = F.linear(x2, w) + F.linear(h, b) * s
            elif form == "add_product":
                y = add_product(F.linear(x2, w), h, b.t(), s)
            else:  # views
                lead = x.shape[:-1]
                y = (F.linear(x2, w).view(*lead, -1) + F.linear(h, b).view(*lead, -1) * s).reshape(-1, w.shape[0])
            ctx.save_for_backward(x, w, a, b)
            ctx.s = s
            return y.view(*x.shape[:-1], w.shape[0])

        @staticmethod
        def backward(ctx, dy):
            x, w, a, b = ctx.saved_tensors
            s = ctx.s
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            g = (dy2 @ b) * s
            if form == "inplace":
                dx = (dy2 @ w).addmm_(g, a)
            elif form == "outofplace":
                dx = dy2 @ w + g @ a
            elif form == "add_product":
                dx = add_product(dy2 @ w, g, a)
            else:
                lead = x.shape[:-1]
                dx = ((dy2 @ w).view(*lead, -1) + (g @ a).view(*lead, -1)).reshape(-1, x.shape[-1])
            da = g.t() @ x2
            db = dy2.t() @ (F.linear(x2, a) * s)
            return dx.view(x.shape), None, da, db, None

    return LowRank


def _peft(x, w, a, b, s):
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * s


def _measure(step: Callable[[], None], repeats: int) -> tuple[float, float, int, int]:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / repeats
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.device_time for e in events) / 1000
    copies = sum("Memcpy DtoD" in e.name for e in events)
    return wall * 1000, gpu, len(events), copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8, help="layers in a chain (each form compiles the chain)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    n, d, r = args.tokens, args.d, args.rank
    ws = [torch.randn(d, d, device=dev, dtype=dt) / d ** 0.5 for _ in range(args.layers)]
    As = [(torch.randn(r, d, device=dev, dtype=dt) / d ** 0.5).requires_grad_() for _ in range(args.layers)]
    Bs = [(torch.randn(d, r, device=dev, dtype=dt) / r ** 0.5).requires_grad_() for _ in range(args.layers)]
    x0 = torch.randn(4, n // 4, d, device=dev, dtype=dt, requires_grad=True)
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__}; {args.layers} layers of {d}x{d}, r={r}, "
          f"{n} tokens, bf16, s=1, each followed by SiLU")
    print("| form | wall ms | GPU ms | kernels | DtoD copies |\n|---|---|---|---|---|")
    for form in ("inplace", "outofplace", "views", "add_product", "peft"):
        layer = _peft if form == "peft" else _function(form).apply

        def chain(x):
            for w, a, b in zip(ws, As, Bs):
                x = F.silu(layer(x, w, a, b, 1.0))
            return x.float().pow(2).mean()

        compiled = torch.compile(chain)

        def step():
            compiled(x0).backward()

        wall, gpu, kernels, copies = _measure(step, args.repeats)
        print(f"| {form} | {wall:.2f} | {gpu:.2f} | {kernels} | {copies} |", flush=True)


if __name__ == "__main__":
    main()
