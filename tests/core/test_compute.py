"""The GEMM helpers: the fp32-output GEMM (where it takes the one-GEMM path — CUDA bf16/fp16, and the estimator's
simulated CUDA step on meta tensors — and that its result is the fp32 product everywhere), and the GEMM with its scale
in the epilogue."""
from __future__ import annotations

import pytest
import torch

from slimtune.core import simulation
from slimtune.core.compute import fp32_out_gemm, mm_fp32, mm_scaled


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("s", [1.0, 0.37, 2.0])
def test_mm_scaled_is_the_scaled_product(dtype, s):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 5, generator=gen).to(dtype), torch.randn(5, 4, generator=gen).to(dtype)
    ref = s * (a.double() @ b.double())
    out = mm_scaled(a, b, s)
    assert out.dtype == dtype and out.shape == (6, 4) and torch.isfinite(out).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    # into strided columns of a wider buffer (the grouped backward's layout), the other columns untouched
    wide = torch.full((6, 9), 7.0, dtype=dtype)
    mm_scaled(a, b, s, out=wide[:, 2:6])
    assert torch.equal(wide[:, 2:6], out) and (wide[:, :2] == 7).all() and (wide[:, 6:] == 7).all()


def test_mm_scaled_under_torch_compile_matches_eager():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 5, generator=gen), torch.randn(5, 4, generator=gen)
    compiled = torch.compile(lambda a, b: mm_scaled(a, b, 0.5), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(a, b), mm_scaled(a, b, 0.5))


def test_mm_scaled_on_meta_keeps_the_shape():
    a, b = torch.empty(6, 5, device="meta"), torch.empty(5, 4, device="meta")
    assert mm_scaled(a, b, 0.5).shape == (6, 4)
