"""A stacked DoRA chain's norm parts on the GPU: ``S Aᵀ`` and ``‖W‖²_row`` from one Triton pass over S
(slimtune.methods.dora.triton_rows) against what a compiled step ran before it (cuBLAS's GEMM with fp32 output and
Inductor's reduction, each reading S), for the 3B model's chains at r = 32, compiled on both sides (so that the
kernel's split-K partial sums are fused as in a step), with a few of the kernel's launch configurations.

    python benchmarks/rows_parts_bench.py [--rank 32] [--dtype bf16]

Prints microseconds per call (triton.testing.do_bench, median) and S's bytes over that time.
"""
from __future__ import annotations

import argparse

import torch

#: (chain, weight rows Σd, K = d_in) of the 3B shape (hidden 3072, 8 KV heads of 128, MLP 8192)
CHAINS = (("q/k/v", 3072 + 1024 + 1024, 3072), ("o", 3072, 3072), ("gate/up", 2 * 8192, 3072), ("down", 3072, 8192))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args()
    import triton
    from triton.testing import do_bench

    from slimtune.core.triton import cdiv, next_power_of_2
    from slimtune.methods.dora import stacked, triton_rows

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    reference = torch.compile(stacked.rows_norm_parts_reference, dynamic=False)
    fused = torch.compile(lambda s, total: [t.sum() for t in stacked.rows_norm_parts(s, total)], dynamic=False)
    ref_summed = torch.compile(lambda s, total: [t.sum() for t in stacked.rows_norm_parts_reference(s, total)],
                               dynamic=False)
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
          f"r={args.rank} {args.dtype}")
    print("| chain | S MB | reference µs (GB/s) | kernel, compiled µs (GB/s) | reference, compiled µs | "
          "configs (BLOCK_M, warps, stages) × K slices: kernel alone µs |")
    print("|---|---|---|---|---|---|")
    for name, total, k in CHAINS:
        members = 3 if name == "q/k/v" else 2 if name == "gate/up" else 1
        rank = members * args.rank
        rows = torch.randn(total + rank, k, device="cuda", dtype=dtype)
        mb = rows.numel() * rows.element_size() / 1e6
        assert stacked.rows_kernel_takes(rows, total)
        got, want = stacked.rows_norm_parts(rows, total), stacked.rows_norm_parts_reference(rows, total)
        errors = [float((a - b).norm() / b.norm()) for a, b in zip(got, want)]
        assert max(errors) < 1e-4, errors
        t_ref = do_bench(lambda: reference(rows, total))
        t_fused = do_bench(lambda: fused(rows, total))
        t_ref_summed = do_bench(lambda: ref_summed(rows, total))
        configs = []
        auto = triton_rows.splits_for(cdiv(rows.shape[0], 64), k, rows.device)
        for block_m, warps, stages, splits in ((64, 4, 3, auto), (64, 4, 4, auto), (128, 8, 3, auto), (32, 4, 4, auto),
                                               (64, 4, 3, max(1, auto // 2)), (64, 4, 3, 1), (128, 8, 4, 2 * auto)):
            per = cdiv(cdiv(k, splits), 64) * 64
            splits = cdiv(k, per)
            blocks = cdiv(rows.shape[0], block_m)
            parts = torch.empty(splits, rows.shape[0], rank, device="cuda")
            squares = torch.empty(splits, rows.shape[0], device="cuda")

            def launch():
                triton_rows._rows_parts_kernel[(blocks, splits)](
                    rows, parts, squares, rows.shape[0], k, rank, total, rows.stride(0), per, BLOCK_M=block_m,
                    BLOCK_K=64, BLOCK_R=max(16, next_power_of_2(rank)), num_warps=warps, num_stages=stages)
            configs.append(f"({block_m}, {warps}, {stages}) ×{splits}: {do_bench(launch) * 1e3:.1f}")
        print(f"| {name} | {mb:.1f} | {t_ref * 1e3:.1f} ({mb / t_ref:.0f}) | {t_fused * 1e3:.1f} "
              f"({mb / t_fused:.0f}) | {t_ref_summed * 1e3:.1f} | {'; '.join(configs)} |")


if __name__ == "__main__":
    main()
