"""Compiled stacked rows' forward products ``s·h Bᵀ`` (K = the chain's ranks, at most 128) from Triton instead of
cuBLAS, which runs them in a 64x32-tile kernel (run 181: 4.11 ms of a seq-2048 3B step, about 40% of HBM's rate;
run 183: 2.5 ms timed back to back), and whether one kernel should also add the base.

The kernel: each program takes a ``[BM, BN]`` tile of the output, one ``tl.dot`` of h's ``[BM, K]`` rows against
``Bᵀ``'s ``[K, BN]`` columns (fp32, any strides: compiled rows pass ``Bᵀ`` as a transposed view), optionally adds the
base's tile, and writes once. Forms timed at 8192 tokens, bf16, for q/k/v (K = 96, d = 5120: base a column slice of
the stacked output ``[N, 5216]``), o and down (K = 32, d = 3072, base a slice of ``[N, 3104]``), each 10 times in one
CUDA graph, median of ``--rounds`` rounds, back to back and with L2 flushed after each call (a 256 MB write, its own
time taken off: in a step the product follows GEMMs that leave L2 full):

* ``cuBLAS product``: ``h @ Bᵀ`` (what compiled rows launch; the kernel that reads the base reads it too);
* ``Triton BMxBN/warps``: the kernel, product alone, at each of :data:`TILES`;
* ``Triton op (autotuned)``: :func:`scaled_product_op`, the same as a ``torch.library.triton_op`` that
  ``torch.compile`` keeps in its graph (``paired_steps.py``'s ``tritonproduct`` configuration);
* ``Triton product-sum``: the kernel adding the base (run 183: no gain, it moves the bytes the product's write and
  read move).

``--check`` compares the kernel with PyTorch in float64 on small shapes (on the CPU with ``TRITON_INTERPRET=1``).
Usage: ``python benchmarks/product_sum_kernel.py [--rounds 7]`` (a GPU), or
``TRITON_INTERPRET=1 python benchmarks/product_sum_kernel.py --check``.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from _common import environment_line, markdown_table, write_out_text

#: (name, K, d, the stacked output's width) at the 3B shape, r = 32
CHAINS = (("q/k/v", 96, 5120, 5216), ("o", 32, 3072, 3104), ("down", 32, 3072, 3104))
CALLS, LAYERS = 10, 28


@triton.jit
def _product_sum_kernel(base_ptr, h_ptr, bt_ptr, y_ptr, n, d, k, stride_base, stride_h, stride_hk, stride_btk,
                        stride_btd, stride_y, scale, HAS_BASE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok, col_ok, k_ok = rows < n, cols < d, ks < k
    h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :] * stride_hk,
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    bt = tl.load(bt_ptr + ks[:, None] * stride_btk + cols[None, :] * stride_btd, mask=k_ok[:, None] & col_ok[None, :],
                 other=0.0)
    y = scale * tl.dot(h, bt)  # fp32
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BASE:
        base = tl.load(base_ptr + rows[:, None].to(tl.int64) * stride_base + cols[None, :], mask=ok, other=0.0)
        y += base.to(tl.float32)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


#: (BM, BN, warps) tried for the product alone (the step's op autotunes among them)
TILES = ((64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 256, 8))
_tuned_kernel = triton.autotune([triton.Config({"BM": m, "BN": n}, num_warps=w) for m, n, w in TILES],
                                key=["n", "d", "k"])(_product_sum_kernel)


def _launch(kernel, grid, base: torch.Tensor | None, h: torch.Tensor, bt: torch.Tensor, y: torch.Tensor,
            scale: float, **tiles: int) -> None:
    n, k = h.shape
    kernel[grid](base if base is not None else h, h, bt, y, n, bt.shape[1], k,
                 base.stride(0) if base is not None else 0, h.stride(0), h.stride(1), bt.stride(0), bt.stride(1),
                 y.stride(0), scale, HAS_BASE=base is not None, BK=max(16, triton.next_power_of_2(k)), **tiles)


def product_sum(base: torch.Tensor | None, h: torch.Tensor, bt: torch.Tensor, scale: float,
                block_m: int = 128, block_n: int = 128, warps: int = 4) -> torch.Tensor:
    """``base + scale·h bt`` ``[N, d]`` (base ``[N, d]`` with unit column stride, or None: the product alone; h
    ``[N, K]``, bt ``[K, d]``, any strides, K ≤ 128), written once."""
    n, d = h.shape[0], bt.shape[1]
    assert (base is None or base.stride(1) == 1) and h.shape[1] <= 128
    y = torch.empty(n, d, dtype=h.dtype, device=h.device)
    grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_n))
    _launch(_product_sum_kernel, grid, base, h, bt, y, scale, BM=block_m, BN=block_n, num_warps=warps)
    return y


@torch.library.triton_op("slimtune_bench::scaled_product", mutates_args=())
def scaled_product_op(h: torch.Tensor, bt: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale·h bt`` ``[N, d]`` as a custom op that ``torch.compile`` keeps in its graph (the kernel autotuned among
    :data:`TILES`): the ``tritonproduct`` configuration of ``paired_steps.py`` puts it where compiled stacked rows
    call ``scaled_product``."""
    y = torch.empty(h.shape[0], bt.shape[1], dtype=h.dtype, device=h.device)

    def grid(meta):
        return triton.cdiv(h.shape[0], meta["BM"]), triton.cdiv(bt.shape[1], meta["BN"])
    _launch(torch.library.wrap_triton(_tuned_kernel), grid, None, h, bt, y, scale)
    return y


def product_sum_reference(base: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`product_sum` in plain PyTorch, in float64."""
    return base.double() + scale * (h.double() @ bt.double())


def check() -> float:
    """The kernel, with a base and without (B's transpose strided, as compiled rows pass it), against
    :func:`product_sum_reference` on small shapes (float32 and float16: the interpreter's bf16 is wrong); returns the
    largest relative error (``tests/test_benchmark_kernels.py`` runs it interpreted)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worst = 0.0
    for dtype in (torch.float32, torch.float16):
        for n, k, d, wide in ((37, 24, 40, 56), (64, 32, 96, 128), (20, 96, 72, 168)):
            out = torch.randn(n, wide, device=device).to(dtype)
            h, up = torch.randn(n, k, device=device).to(dtype), torch.randn(d, k, device=device).to(dtype)
            for base in (out[:, :d], None):
                got = product_sum(base, h, up.t(), 0.5, block_m=32, block_n=32)
                ref = product_sum_reference(base if base is not None else torch.zeros_like(got), h, up.t(), 0.5)
                err = ((got.double() - ref).norm() / ref.norm()).item()
                worst = max(worst, err)
                assert err < (1e-4 if dtype == torch.float32 else 1e-2), (dtype, n, k, d, base is None, err)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--check", action="store_true", help="compare the kernel with float64 on small shapes")
    args = parser.parse_args()
    if args.check:
        print(f"product_sum matches float64 (largest relative error {check():.2e})")
        return 0
    from skinny_gemm_forms import median_times

    torch.manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # twice or more any GPU's L2
    fns: dict[tuple[str, str, bool], object] = {("flush", "flush", True): flush.zero_}
    errors = {}
    for name, k, d, wide in CHAINS:
        out = torch.randn(args.tokens, wide, device="cuda", dtype=torch.bfloat16)
        base, h = out[:, :d], out[:, d:].contiguous()[:, :k].contiguous()
        bt = (torch.randn(d, k, device="cuda", dtype=torch.bfloat16) * 0.05).t()  # strided, as the step's
        ref = product_sum_reference(base, h, bt, 2.0)
        got = product_sum(base, h, bt, 2.0)
        alone = scaled_product_op(h, bt, 2.0)
        errors[name] = max(((got.double() - ref).norm() / ref.norm()).item(),
                           ((alone.double() + base.double() - ref).norm() / ref.norm()).item())
        forms = {"cuBLAS product": lambda h=h, bt=bt: h @ bt,
                 **{f"Triton {m}x{n}/{w}": (lambda h=h, bt=bt, m=m, n=n, w=w: product_sum(None, h, bt, 2.0, m, n, w))
                    for m, n, w in TILES},
                 "Triton op (autotuned)": lambda h=h, bt=bt: scaled_product_op(h, bt, 2.0),
                 "Triton product-sum": lambda h=h, bt=bt, base=base: product_sum(base, h, bt, 2.0)}
        for form, fn in forms.items():
            fns[(name, form, False)] = fn
            fns[(name, form, True)] = lambda fn=fn: (fn(), flush.zero_())
    median = median_times(fns, args.rounds, CALLS)
    flushed = median.pop(("flush", "flush", True))
    names = list(dict.fromkeys(form for _, form, _ in median))
    text = f"{environment_line()}\ntokens {args.tokens}, {args.rounds} rounds; L2 flushed: a 256 MB write after each " \
           f"call ({flushed:.1f} µs, taken off)\n"
    for cold in (False, True):
        rows = [[name, f"{errors[name]:.1e}"] + [f"{median[(name, f, cold)] - cold * flushed:.1f}" for f in names]
                for name, *_ in CHAINS]
        rows.append([f"sum, {LAYERS} layers (ms)", ""] +
                    [f"{LAYERS * sum(median[(c, f, cold)] - cold * flushed for c, *_ in CHAINS) / 1e3:.2f}"
                     for f in names])
        text += f"\n{'L2 flushed' if cold else 'back to back'}:\n\n" + markdown_table(
            ["chain", "Triton rel. error (bf16)"] + [f"{f} µs" for f in names], rows) + "\n"
    print(text)
    write_out_text("product_sum_kernel.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
