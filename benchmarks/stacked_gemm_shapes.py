"""The large GEMMs of a compiled LoRA layer on stacked rows at the 3B shape, each against the same product with
aligned widths: whether a width of ``d + r`` (3104, 5216: not multiples of cuBLAS's 128- or 256-wide tiles) costs
more than its FLOPs (RESULTS.md run 179: compiled LoRA at seq 2048 is 0.906x PEFT-bf16, GPU-bound, where 0.9x
needs about 1.6 ms less of a 240 ms step).

For each GEMM the stacked layer runs (:mod:`slimtune.core.stacked_rows`: q/k/v, o and down; :mod:`slimtune.core.
wide_rows`: gate/up), in the layouts it has there, bf16, N tokens (batch 4 x seq 2048 = 8192):

* ``stacked``: the GEMM as the layer runs it (o's forward ``x [W; A]ᵀ`` ``[N, 3104]``, its ``dx = [dy, g] S``
  with K = 3104, gate's forward ``[s·h, x] T`` with K = 3104 and its backward ``dy Tᵀ`` ``[N, 3104]``, …);
* ``base``: the frozen layer's own GEMM (the width without the adapter's r): the floor under it;
* ``split``: the base GEMM and the adapter's skinny one apart (``x Wᵀ`` and ``x Aᵀ``; ``dy W`` and then ``g A``
  added by addmm): what the layer ran before stacking;
* ``pad128`` / ``pad256``: the stacked GEMM with its odd width rounded up to a multiple of 128 / 256 (zero rows
  in the stack: more FLOPs, aligned tiles).

Each form runs ``CALLS`` times in one CUDA graph, its replays timed by CUDA events; per form the median over
``--rounds`` interleaved rounds in microseconds, and its excess over ``base`` per layer. The table's last rows add
up the excess of every form over the 28 layers of a step.
Usage: ``python benchmarks/stacked_gemm_shapes.py [--tokens 8192] [--rank 32] [--rounds 7]``.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from _common import environment_line, markdown_table, write_out_text
from skinny_gemm_forms import median_times

#: calls of a GEMM in one captured graph
CALLS = 10
#: decoder layers of the 3B shape (a step's sum)
LAYERS = 28
HIDDEN, MLP, QKV = 3072, 8192, (3072, 1024, 1024)
DEVICE = "cuda"


def up_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16) * 0.02


def zero_padded(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to a multiple of ``multiple``."""
    shape = list(t.shape)
    shape[dim] = up_to(t.shape[dim], multiple) - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def padded_forms(product: Callable[[int], Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """The ``pad128`` and ``pad256`` forms: ``product(m)`` gives the GEMM with its odd width padded to a multiple of
    m (its operands made now, once)."""
    return {f"pad{m}": product(m) for m in (128, 256)}


def forward_rows(tokens: int, d_in: int, width: int, rank: int) -> dict[str, Callable[[], object]]:
    """``x Sᵀ`` for S ``[width + rank, d_in]`` (q/k/v: width 5120, rank 96; o, down: width 3072, rank 32)."""
    x, stacked = rand(tokens, d_in), rand(width + rank, d_in)
    base, down = stacked[:width], stacked[width:]
    def padded(m: int) -> Callable[[], object]:
        rows = zero_padded(stacked, 0, m)
        return lambda: x @ rows.t()

    return {"stacked": lambda: x @ stacked.t(), "base": lambda: x @ base.t(),
            "split": lambda: (x @ base.t(), x @ down.t()), **padded_forms(padded)}


def dx_rows(tokens: int, d_in: int, width: int, rank: int) -> dict[str, Callable[[], object]]:
    """A chain of one's ``dx = [dy, g] S`` (K = width + rank) against ``dy W`` (+ ``g A`` by addmm)."""
    cat, stacked = rand(tokens, width + rank), rand(width + rank, d_in)
    dy, g, base, down = cat[:, :width], cat[:, width:], stacked[:width], stacked[width:]
    dy_own = dy.contiguous()
    def padded(m: int) -> Callable[[], object]:
        left, right = zero_padded(cat, 1, m), zero_padded(stacked, 0, m)
        return lambda: left @ right

    return {"stacked": lambda: cat @ stacked, "base": lambda: dy_own @ base,
            "split": lambda: torch.addmm(dy_own @ base, g, down), **padded_forms(padded)}


def forward_wide(tokens: int, d_in: int, width: int, rank: int) -> dict[str, Callable[[], object]]:
    """Gate's ``[s·h_1 | x] T_1`` (K = rank + d_in, a column slice of the ``[N, 2·rank + d_in]`` buffer) against
    ``x Wᵀ`` (+ ``s·h Bᵀ`` added by addmm)."""
    buf, t = rand(tokens, 2 * rank + d_in), rand(rank + d_in, width)
    a, x = buf[:, :rank + d_in], buf[:, rank:rank + d_in]
    x_own, w = x.contiguous(), t[rank:].t().contiguous().t()  # W's view in T: [d_in, width] rows
    h, b = buf[:, :rank].contiguous(), t[:rank]
    def padded(m: int) -> Callable[[], object]:
        left, right = zero_padded(a, 1, m), zero_padded(t, 0, m)
        return lambda: left @ right

    return {"stacked": lambda: a @ t, "base": lambda: x_own @ w, "split": lambda: torch.addmm(x_own @ w, h, b),
            **padded_forms(padded)}


def backward_wide(tokens: int, d_in: int, width: int, rank: int) -> dict[str, Callable[[], object]]:
    """Gate's ``c = dy T_1ᵀ`` ``[N, rank + d_in]`` (``dy B`` and ``dy W`` from one GEMM) against ``dy W`` alone (and
    ``dy B`` apart)."""
    dy, t = rand(tokens, width), rand(rank + d_in, width)
    w, b = t[rank:].t().contiguous(), t[:rank].t().contiguous()  # [width, d_in], [width, rank]: as the layers hold them
    def padded(m: int) -> Callable[[], object]:
        rows = zero_padded(t, 0, m)
        return lambda: dy @ rows.t()

    return {"stacked": lambda: dy @ t.t(), "base": lambda: dy @ w, "split": lambda: (dy @ w, dy @ b),
            **padded_forms(padded)}


def forward_whole(tokens: int, d_in: int, widths: tuple[int, ...], rank: int) -> dict[str, Callable[[], object]]:
    """A chain's whole forward, sums included: ``stacked`` as on rows (``x Sᵀ``, then ``h Bᵀ`` against the B's block
    diagonal and its sum with the base outputs: one product ``[N, Σd]`` written and read back), ``base`` the frozen
    layers' GEMMs, ``split`` as wide rows would run it (``h = x Aᵀ``, then each member's ``[s·h_i | x] T_i`` with K =
    d_in + r or more: no product written)."""
    n, total = len(widths), sum(widths)
    x, stacked = rand(tokens, d_in), rand(total + n * rank, d_in)
    weights = [w.contiguous() for w in stacked[:total].split(list(widths))]
    down = stacked[total:]
    block = torch.block_diag(*[rand(width, rank) for width in widths])  # [Σd, R]
    buf = rand(tokens, n * rank + d_in)
    mats = [rand(rank * (1 if i == 0 else i) + d_in, width) for i, width in enumerate(widths)]

    def rows_form() -> object:
        out = x @ stacked.t()
        h = out[:, total:].contiguous()
        return torch.add(out[:, :total], h @ block.t(), alpha=2.0)

    def wide_form() -> object:
        h = buf[:, rank:rank + d_in] @ down.t()
        buf[:, :rank] = h[:, :rank]
        buf[:, rank + d_in:] = h[:, rank:]
        return [buf[:, (0 if i == 0 else rank):(0 if i == 0 else rank) + m.shape[0]] @ m for i, m in enumerate(mats)]

    return {"stacked": rows_form, "base": lambda: [x @ w.t() for w in weights], "split": wide_form}


def backward_one(tokens: int, d_in: int, width: int, rank: int) -> dict[str, Callable[[], object]]:
    """A chain of one's ``g`` and ``dx``: ``stacked`` as on rows (``g = dy B`` reading dy again, then ``dx = [dy, g]
    S`` with dy already in the ``[N, d + r]`` buffer), ``base`` the frozen layer's ``dy W``, ``split`` as wide rows
    run it (``c = dy Tᵀ`` ``[N, r + d_in]`` gives ``dy B`` and ``dy W``, then ``dx = c[:, r:] + g A`` by addmm: the
    ``[N, d_in]`` sum written and read)."""
    cat, stacked = rand(tokens, width + rank), rand(width + rank, d_in)
    t = rand(rank + d_in, width)
    up, down, weight = rand(width, rank), stacked[width:], stacked[:width].contiguous()
    dy = cat[:, :width]
    dy_own = dy.contiguous()

    def rows_form() -> object:
        cat[:, width:] = dy @ up
        return cat @ stacked

    def wide_form() -> object:
        c = dy_own @ t.t()
        return torch.addmm(c[:, rank:], c[:, :rank] * 2.0, down)

    return {"stacked": rows_form, "base": lambda: dy_own @ weight, "split": wide_form}


def product_forms(tokens: int, widths: tuple[int, ...], rank: int) -> dict[str, Callable[[], object]]:
    """A chain's forward product ``s·h Bᵀ`` ``[N, Σd]`` (K = R, the chain's ranks: 96 for q/k/v, 32 for o or down),
    which the compiled rows write and the next kernel reads with the base output (run 181: a 64x32-tile cuBLAS kernel,
    about 147 µs a 3B layer at 8192 tokens for the three chains): as the layer runs it (``h @ blockᵀ``, the block
    diagonal row-major), against the B's transposed contiguous, the product transposed (``(block @ hᵀ)ᵀ``), K padded
    to 128 with zero columns, and the write alone (``zero_`` of the output: the memory floor under any form)."""
    n, total = len(widths), sum(widths)
    h, block = rand(tokens, n * rank), torch.block_diag(*[rand(width, rank) for width in widths])
    block_t = block.t().contiguous()
    h_pad, block_pad = zero_padded(h, 1, 128), zero_padded(block, 1, 128)
    out = h.new_empty(tokens, total)
    return {"as run: h @ blockᵀ": lambda: h @ block.t(), "h @ (blockᵀ contiguous)": lambda: h @ block_t,
            "(block @ hᵀ)ᵀ": lambda: (block @ h.t()).t(), "K padded to 128": lambda: h_pad @ block_pad.t(),
            "write alone (floor)": lambda: out.zero_()}


#: the chains whose forward product the compiled rows write, with their widths
PRODUCT_CHAINS = {"q/k/v": QKV, "o": (HIDDEN,), "down": (HIDDEN,)}


def product_table(tokens: int, rank: int, rounds: int) -> str:
    """The product forms of every chain (:func:`product_forms`), median µs of ``rounds`` interleaved rounds."""
    median = median_times({(chain, name): fn for chain, widths in PRODUCT_CHAINS.items()
                           for name, fn in product_forms(tokens, widths, rank).items()}, rounds, CALLS)
    names = list(dict.fromkeys(name for _, name in median))
    rows = [[chain] + [f"{median[(chain, name)]:.1f}" for name in names] for chain in PRODUCT_CHAINS]
    step_ms = {n: LAYERS * sum(median[(c, n)] for c in PRODUCT_CHAINS) / 1e3 for n in names}
    rows.append([f"sum, {LAYERS} layers (ms)"] + [f"{step_ms[n]:.2f}" for n in names])
    return markdown_table(["product s·h Bᵀ (µs)"] + names, rows)


def cases(tokens: int, rank: int) -> dict[str, tuple[int, dict[str, Callable[[], object]]]]:
    """Each GEMM of a layer, with how many times a layer runs it (0: a whole forward, outside the sums)."""
    return {
        "q/k/v forward x Sᵀ": (1, forward_rows(tokens, HIDDEN, sum(QKV), 3 * rank)),
        "o forward x Sᵀ": (1, forward_rows(tokens, HIDDEN, HIDDEN, rank)),
        "down forward x Sᵀ": (1, forward_rows(tokens, MLP, HIDDEN, rank)),
        "o dx [dy, g] S": (1, dx_rows(tokens, HIDDEN, HIDDEN, rank)),
        "down dx [dy, g] S": (1, dx_rows(tokens, MLP, HIDDEN, rank)),
        "gate/up forward buf T": (2, forward_wide(tokens, HIDDEN, MLP, rank)),
        "gate/up backward dy Tᵀ": (2, backward_wide(tokens, HIDDEN, MLP, rank)),
        "q/k/v forward whole (split: wide)": (0, forward_whole(tokens, HIDDEN, QKV, rank)),
        "o forward whole (split: wide)": (0, forward_whole(tokens, HIDDEN, (HIDDEN,), rank)),
        "down forward whole (split: wide)": (0, forward_whole(tokens, MLP, (HIDDEN,), rank)),
        "o backward g, dx (split: wide)": (0, backward_one(tokens, HIDDEN, HIDDEN, rank)),
        "down backward g, dx (split: wide)": (0, backward_one(tokens, MLP, HIDDEN, rank)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    forms = ("stacked", "base", "split", "pad128", "pad256")
    every = cases(args.tokens, args.rank)
    timed_forms = {(name, form): fns[form] for name, (_, fns) in every.items() for form in forms if form in fns}
    median = median_times(timed_forms, args.rounds, CALLS)
    counts = {name: count for name, (count, _) in every.items()}
    rows, totals = [], dict.fromkeys(forms, 0.0)
    for name, count in counts.items():
        base = median[(name, "base")]
        rows.append([name, count] + [("—" if (name, f) not in median else f"{median[(name, f)]:.1f}" +
                                      ("" if f == "base" else f" ({median[(name, f)] - base:+.1f})")) for f in forms])
        for form in forms:
            if (name, form) in median:
                totals[form] += count * LAYERS * (median[(name, form)] - base) / 1e3
    rows.append([f"excess over base, {LAYERS} layers (ms)", ""] + [f"{totals[f]:.2f}" for f in forms])
    table = markdown_table(["GEMM", "per layer"] + [f"{f} µs (− base)" for f in forms], rows)
    products = product_table(args.tokens, args.rank, args.rounds)
    text = (f"{environment_line()}\ntokens {args.tokens}, rank {args.rank}, {args.rounds} rounds\n\n{table}\n\n"
            f"{products}\n")
    print(text)
    write_out_text("stacked_gemm_shapes.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
