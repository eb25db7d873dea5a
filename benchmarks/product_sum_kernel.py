"""Whether one Triton kernel for a stacked LoRA chain's forward sum ``y = base + s·h Bᵀ`` (K = the chain's ranks, at
most 128) beats what compiled rows run now: a cuBLAS product ``p = s·h Bᵀ`` written to memory (run 181: a 64x32-tile
kernel, 4.11 ms of a seq-2048 3B step, about 40% of HBM's rate) and read back, with the base, by the next kernel.

The kernel (an experiment, not in the package): each program takes a ``[BM, BN]`` tile of y, one ``tl.dot`` of h's
``[BM, K]`` rows against ``Bᵀ``'s ``[K, BN]`` columns (fp32), adds the base's tile and writes y once. Forms timed at
8192 tokens, bf16, for q/k/v (K = 96, d = 5120: base a column slice of the stacked output ``[N, 5216]``), o and down
(K = 32, d = 3072, base a slice of ``[N, 3104]``), each 10 times in one CUDA graph, median of ``--rounds`` rounds:

* ``cuBLAS product``: ``h @ Bᵀ`` alone (what the compiled layer launches; its consumer then reads base and p);
* ``cuBLAS product + read``: the same and one read of p and base by a sum (``torch.add``, which also writes y:
  an upper bound of what the compiled layer spends);
* ``Triton product-sum``: the kernel above;
* ``read base, write y``: ``y.copy_(base)``: the memory floor under the kernel.

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
def _product_sum_kernel(base_ptr, h_ptr, bt_ptr, y_ptr, n, d, k, stride_base, stride_h, stride_bt, stride_y, scale,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok, col_ok, k_ok = rows < n, cols < d, ks < k
    h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    bt = tl.load(bt_ptr + ks[:, None] * stride_bt + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    product = tl.dot(h, bt)  # fp32
    ok = row_ok[:, None] & col_ok[None, :]
    base = tl.load(base_ptr + rows[:, None].to(tl.int64) * stride_base + cols[None, :], mask=ok, other=0.0)
    y = base.to(tl.float32) + scale * product
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def product_sum(base: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, scale: float,
                block_m: int = 128, block_n: int = 128) -> torch.Tensor:
    """``base + scale·h bt`` ``[N, d]`` (base ``[N, d]`` with unit column stride, h ``[N, K]``, bt ``[K, d]``,
    K ≤ 128), written once."""
    n, d = base.shape
    k = h.shape[1]
    assert base.stride(1) == 1 and k <= 128
    h, bt = h.contiguous(), bt.contiguous()
    y = torch.empty(n, d, dtype=base.dtype, device=base.device)
    grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_n))
    _product_sum_kernel[grid](base, h, bt, y, n, d, k, base.stride(0), h.stride(0), bt.stride(0), y.stride(0), scale,
                              BM=block_m, BN=block_n, BK=max(16, triton.next_power_of_2(k)))
    return y


def product_sum_reference(base: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`product_sum` in plain PyTorch, in float64."""
    return base.double() + scale * (h.double() @ bt.double())


def check() -> float:
    """The kernel against :func:`product_sum_reference` on small shapes (float32 and float16: the interpreter's bf16
    is wrong); returns the largest relative error (``tests/test_benchmark_kernels.py`` runs it interpreted)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worst = 0.0
    for dtype in (torch.float32, torch.float16):
        for n, k, d, wide in ((37, 24, 40, 56), (64, 32, 96, 128), (20, 96, 72, 168)):
            out = torch.randn(n, wide, device=device).to(dtype)
            h, bt = torch.randn(n, k, device=device).to(dtype), torch.randn(k, d, device=device).to(dtype)
            got = product_sum(out[:, :d], h, bt, 0.5, block_m=32, block_n=32)
            ref = product_sum_reference(out[:, :d], h, bt, 0.5)
            err = ((got.double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            assert err < (1e-4 if dtype == torch.float32 else 1e-2), (dtype, n, k, d, err)
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
    fns: dict[tuple[str, str], object] = {}
    errors = {}
    for name, k, d, wide in CHAINS:
        out = torch.randn(args.tokens, wide, device="cuda", dtype=torch.bfloat16)
        base, h = out[:, :d], out[:, d:].contiguous()[:, :k].contiguous()
        bt = torch.randn(k, d, device="cuda", dtype=torch.bfloat16) * 0.05
        y = torch.empty(args.tokens, d, device="cuda", dtype=torch.bfloat16)
        ref = product_sum_reference(base, h, bt, 2.0)
        got = product_sum(base, h, bt, 2.0)
        errors[name] = ((got.double() - ref).norm() / ref.norm()).item()
        forms = {"cuBLAS product": lambda h=h, bt=bt: h @ bt,
               "cuBLAS product + read": lambda h=h, bt=bt, base=base: torch.add(base, h @ bt, alpha=2.0),
               "Triton product-sum": lambda h=h, bt=bt, base=base: product_sum(base, h, bt, 2.0),
               "read base, write y": lambda y=y, base=base: y.copy_(base)}
        fns.update({(name, form): fn for form, fn in forms.items()})
    median = median_times(fns, args.rounds, CALLS)
    names = list(dict.fromkeys(form for _, form in fns))
    rows = [[name, f"{errors[name]:.1e}"] + [f"{median[(name, f)]:.1f}" for f in names] for name, *_ in CHAINS]
    rows.append([f"sum, {LAYERS} layers (ms)", ""] +
                [f"{LAYERS * sum(median[(c, f)] for c, *_ in CHAINS) / 1e3:.2f}" for f in names])
    table = markdown_table(["chain", "kernel's rel. error (bf16)"] + [f"{f} µs" for f in names], rows)
    text = f"{environment_line()}\ntokens {args.tokens}, {args.rounds} rounds\n\n{table}\n"
    print(text)
    write_out_text("product_sum_kernel.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
