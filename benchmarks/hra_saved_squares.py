"""What HRA's training forward keeps for backward: the ``[d_in, d_in]`` tensors saved per adapted layer, slimtune's
HRA beside PEFT's, on the CPU (no GPU needed: autograd saves the same tensors on any device).

PEFT's HRA builds its dense ``[d_in, d_in]`` transform from the ``r`` reflections, one matrix product per
reflection, and autograd keeps the products; slimtune's applies the reflections to the activations (WY factors,
``[d_in, r]``) and saves none. The count is taken with :func:`torch.autograd.graph.saved_tensors_hooks` over one
layer's forward; the table then scales it to Llama-3.2-3B's adapted layers (every linear layer of 28 decoder
layers: six with ``d_in`` 3072, ``down_proj`` with 8192) in bf16, the setting of RESULTS run 126, where the compiled
pair ran out of 79 GiB without saying on which side.

    python benchmarks/hra_saved_squares.py [--rank 32]
"""
from __future__ import annotations

import argparse
import sys

from _common import environment_line, markdown_table, write_out_text

import torch
from torch import nn

import slimtune

#: Llama-3.2-3B's adapted linear layers per decoder layer, by input width, and its decoder layers
LLAMA_3B_LAYERS = {3072: 6, 8192: 1}
LLAMA_3B_DEPTH = 28


class _One(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def saved_squares(model: nn.Module, width: int) -> int:
    """How many tensors of shape ``[width, width]`` (other than the frozen weight) one forward saves for backward
    (each saved tensor counted once per save)."""
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # B (or the reflections) away from their zero start: no all-zero inputs
            p.data.normal_(0, 0.02)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        # the frozen weight may be saved as a view (its transpose): told apart by value (random weights)
        if tuple(t.shape) == (width, width) and not any(torch.equal(t, f) or torch.equal(t, f.t()) for f in frozen):
            count += 1
        return t

    x = torch.randn(2, 16, width, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--width", type=int, default=512, help="the probe layer's width (the count does not "
                        "depend on it; the bytes are scaled to the 3B's widths)")
    args = parser.parse_args(argv)
    import peft

    counts = {
        "slimtune": saved_squares(slimtune.adapt(_One(args.width), slimtune.HraConfig(r=args.rank,
                                                                                       target_modules=["proj"])),
                                  args.width),
        "PEFT": saved_squares(peft.get_peft_model(_One(args.width), peft.HRAConfig(r=args.rank,
                                                                                    target_modules=["proj"])),
                              args.width),
    }
    rows = []
    for name, count in counts.items():
        per_layer = sum(n * count * d * d * 2 for d, n in LLAMA_3B_LAYERS.items())  # bf16
        rows.append([name, count, f"{per_layer / 2**30:.2f}", f"{per_layer * LLAMA_3B_DEPTH / 2**30:.1f}"])
    text = (f"{environment_line()}\n\nHRA r={args.rank}: [d_in, d_in] tensors one adapted layer's forward saves "
            f"(probe width {args.width}), and what that is for Llama-3.2-3B with every linear layer adapted, bf16\n\n"
            + markdown_table(["library", "[d_in, d_in] tensors saved per layer", "GiB per decoder layer",
                              "GiB for 28 decoder layers"], rows) + "\n")
    print(text)
    write_out_text("hra_saved_squares.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
