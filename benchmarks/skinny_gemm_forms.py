"""LoRA's skinny GEMMs at the 3B shape, each in the layouts that give the same product, timed on one GPU: which
layout cuBLAS runs fastest, and how close each runs to the memory bound (run 132: about 4 ms of a compiled 3B step
are these GEMMs, 196 of them as split-K with a separate reduction kernel).

For every sibling group of a Llama-3.2-3B decoder layer at r=32 (q/k/v: R = 96 over one x; o; gate/up: R = 64;
down) and N tokens (batch 4 x seq 512 = 2048), bf16:

* ``dA = gᵀ x`` ``[R, d_in]``: ``g.t() @ x`` (what slimtune runs) against ``(x.t() @ g).t()``;
* ``dB_i = dy_iᵀ h_i`` ``[d_i, r]`` (``h_i`` a column slice of ``h`` ``[N, R]``): ``dy.t() @ h_i`` (slimtune's) against
  ``(h_i.t() @ dy).t()`` and against ``h_i`` made contiguous first;
* for reference the other skinny ones: ``h = x A_catᵀ``, ``g_i = dy_i B_i``, ``g A_cat`` ``[N, d_in]``.

Each form runs 20 times in one CUDA graph, whose replays are timed by CUDA events: the GPU's time alone (timed
eagerly, back-to-back calls of a GEMM this small time the host's launches). Per form: the median over ``--rounds``
interleaved rounds, its ratio to slimtune's form, the rate at which it moves its least bytes (replays keep the
operands in L2, so rates above HBM's appear), and its largest relative difference from slimtune's form (the same
product: rounding only). RESULTS.md run 135 has the H100's table.
Usage: ``python benchmarks/skinny_gemm_forms.py [--tokens 2048] [--rank 32]``.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Sequence

import torch

from _common import markdown_table

#: calls of a GEMM in one captured graph
CALLS = 20
#: Llama-3.2-3B's adapted layers as (input width, members' output widths)
GROUPS = {"q/k/v": (3072, (3072, 1024, 1024)), "o": (3072, (3072,)), "gate/up": (3072, (8192, 8192)),
          "down": (8192, (3072,))}


def captured(fn: Callable[[], torch.Tensor], calls: int) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` as one CUDA graph: its replay times the GPU's work alone (eagerly, back-to-back
    calls of a ~10 µs GEMM time the host's launches instead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # cuBLAS's workspace, before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def timed(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    """Milliseconds per call of a replay of ``graph`` (``calls`` calls), by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def median_times(fns: dict, rounds: int, calls: int = CALLS) -> dict:
    """Each function of ``fns`` (any keys) captured ``calls`` times in one CUDA graph, the graphs replayed once to warm
    up and then in ``rounds`` interleaved rounds: the median µs per call of each."""
    graphs = {key: captured(fn, calls) for key, fn in fns.items()}
    times: dict = {key: [] for key in graphs}
    for graph in graphs.values():
        timed(graph, calls)
    for _ in range(rounds):
        for key, graph in graphs.items():
            times[key].append(timed(graph, calls) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def forms_for(tokens: int, d_in: int, outs: Sequence[int], rank: int) -> dict[str, dict[str, Callable]]:
    """Operation -> {form name: zero-argument function}; the first form of each is slimtune's. Every function
    returns the product (its operands and result bf16, so the bytes a GEMM must move are its operands' and its
    result's: :func:`bytes_moved`)."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    big_r = rank * len(outs)
    x, g, h, a_cat = rand(tokens, d_in), rand(tokens, big_r), rand(tokens, big_r), rand(big_r, d_in)
    dy, up = rand(tokens, outs[0]), rand(outs[0], rank)
    h_i = h[:, :rank]
    return {
        "dA = gᵀx": {"g.t() @ x": lambda: g.t() @ x, "(x.t() @ g).t()": lambda: (x.t() @ g).t()},
        "dB = dyᵀh_i": {"dy.t() @ h_i": lambda: dy.t() @ h_i, "(h_i.t() @ dy).t()": lambda: (h_i.t() @ dy).t(),
                        "dy.t() @ h_i.contiguous()": lambda: dy.t() @ h_i.contiguous()},
        "h = xAᵀ": {"x @ A.t()": lambda: x @ a_cat.t()},
        "g_i = dy B": {"dy @ B": lambda: dy @ up},
        "dx term g A": {"g @ A": lambda: g @ a_cat},
    }


def bytes_moved(tokens: int, d_in: int, outs: Sequence[int], rank: int, op: str) -> int:
    """The bytes ``op`` must read and write at the least (bf16 operands read once, the result written once)."""
    big_r, d_out = rank * len(outs), outs[0]
    elements = {"dA = gᵀx": tokens * big_r + tokens * d_in + big_r * d_in,
                "dB = dyᵀh_i": tokens * d_out + tokens * rank + d_out * rank,
                "h = xAᵀ": tokens * d_in + big_r * d_in + tokens * big_r,
                "g_i = dy B": tokens * d_out + d_out * rank + tokens * rank,
                "dx term g A": tokens * big_r + big_r * d_in + tokens * d_in}[op]
    return 2 * elements


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("skinny_gemm_forms.py times CUDA GEMMs: no GPU here")
    print(f"torch {torch.__version__} · {torch.cuda.get_device_name()} · tokens {args.tokens} · r={args.rank} · bf16")
    rows = []
    for group, (d_in, outs) in GROUPS.items():
        for op, forms in forms_for(args.tokens, d_in, outs, args.rank).items():
            reference = next(iter(forms.values()))()
            medians = {name: us / 1e3 for name, us in median_times(forms, args.rounds).items()}  # ms
            base = medians[next(iter(forms))]
            for name, fn in forms.items():
                median = medians[name]
                diff = ((fn().float() - reference.float()).abs().max() / reference.float().abs().max()).item()
                rate = bytes_moved(args.tokens, d_in, outs, args.rank, op) / (median * 1e-3) / 1e9
                rows.append([group, op, name, f"{median * 1000:.1f}", f"{median / base:.3f}", f"{rate:.0f}",
                             f"{diff:.1e}"])
    print(markdown_table(["group", "operation", "form", "median µs", "÷ slimtune's form", "GB/s (least bytes)",
                          "max rel. diff"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
