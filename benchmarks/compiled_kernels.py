"""How many kernels Inductor generates for one adapted Linear's forward and backward under ``torch.compile``, per
library and method: a compiled step that is host-bound pays a launch per kernel (and per extern GEMM call), so a
method whose vectors take many small kernels loses to one whose ops fuse. CPU or GPU (C++ kernels on the CPU,
Triton on the GPU: the counts differ, the comparison holds on each). Diagnostic only: it reads Inductor's own
counter (``torch._inductor.metrics.generated_kernel_count``), a private attribute, and the extern GEMM calls are
counted from the traced graphs (``aten.mm``/``addmm``/``bmm`` nodes, forward and backward). Where a library's forward
breaks the graph (PEFT's DoRA: 4 breaks with peft 0.21), the ops between the graphs run eagerly and are in neither
count.

    python benchmarks/compiled_kernels.py                      # bf16, 3072 -> 8192, r=32, 512 tokens
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

from _common import environment_line, markdown_table, write_out_text

import torch
from torch import nn

import slimtune

GEMMS = ("mm", "addmm", "bmm", "baddbmm")


class _One(nn.Module):
    """One frozen Linear (PEFT targets it by name)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def adapted(library: str, method: str, d_in: int, d_out: int, rank: int, dtype: torch.dtype,
            device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = _One(d_in, d_out).to(device, dtype)
    if library == "slimtune":
        return slimtune.adapt(model, slimtune.LoraConfig(r=rank, use_dora=method == "dora", target_modules=["lin"]))
    import peft

    config = peft.LoraConfig(r=rank, use_dora=method == "dora", target_modules=["lin"])
    return peft.get_peft_model(model, config, autocast_adapter_dtype=False)


def count(make: Callable[[], nn.Module], x: torch.Tensor) -> tuple[int, int, int]:
    """(generated kernels, extern GEMM calls, graph breaks) of one compiled forward and backward of a fresh
    ``make()``: the kernels from Inductor's counter, the GEMMs from a second trace whose graphs are only read."""
    import torch._inductor.metrics as metrics
    from torch._dynamo.backends.common import aot_autograd

    gemms = [0]

    def read(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        gemms[0] += sum(1 for n in gm.graph.nodes if n.op == "call_function"
                        and str(n.target).split(".")[1:2] and str(n.target).split(".")[1] in GEMMS)
        return gm.forward

    def step(model: nn.Module) -> None:
        model(x).float().sum().backward()

    torch._dynamo.reset()
    metrics.reset()
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
    step(torch.compile(make()))
    kernels = metrics.generated_kernel_count
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks_before
    torch._dynamo.reset()
    step(torch.compile(make(), backend=aot_autograd(fw_compiler=read, bw_compiler=read)))
    return kernels, gemms[0], breaks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=3072)
    parser.add_argument("--d-out", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    rows = []
    for library in ("slimtune", "peft"):
        for method in ("lora", "dora"):
            x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
            kernels, gemms, breaks = count(lambda: adapted(library, method, args.d_in, args.d_out, args.rank, dtype,
                                                           device), x)
            rows.append([library, method, kernels, gemms, breaks])
    text = (f"{environment_line()}\n\none Linear {args.d_in} -> {args.d_out}, r={args.rank}, {args.tokens} tokens, "
            f"{args.dtype}, torch.compile fwd+bwd\n\n"
            + markdown_table(["library", "method", "Inductor kernels", "GEMM calls (traced graphs)", "graph breaks"],
                             rows))
    print(text)
    write_out_text("compiled_kernels.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
