"""The fp32-output GEMM helper: where it takes the one-GEMM path (CUDA bf16/fp16, and the estimator's simulated CUDA
step on meta tensors), and that its result is the fp32 product everywhere."""
from __future__ import annotations

import pytest
import torch

from slimtune.core import simulation
from slimtune.core.compute import fp32_out_gemm, mm_fp32


def test_the_fp32_output_gemm_runs_where_cuda_would_run_it():
    meta = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    assert not fp32_out_gemm(meta)  # outside a simulation
    with simulation.counting(simulation.Work(cuda=True)):
        assert fp32_out_gemm(meta) and not fp32_out_gemm(meta.float())
        assert mm_fp32(meta, meta.t()).dtype == torch.float32
    with simulation.counting(simulation.Work(cuda=False)):
        assert not fp32_out_gemm(meta)
    assert not fp32_out_gemm(torch.ones(2, 2, dtype=torch.bfloat16))  # the CPU has no such kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mm_fp32_is_the_product_in_fp32_or_wider(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen).to(dtype), torch.randn(7, 3, generator=gen).to(dtype)
    out = mm_fp32(a, b)
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    ref = a.double() @ b.double()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
