"""The GEMM helpers: the fp32-output GEMM (where it takes the one-GEMM path — CUDA bf16/fp16, and the estimator's
simulated CUDA step on meta tensors — and that its result is the fp32 product everywhere), and the GEMM with its scale
in the epilogue."""
from __future__ import annotations

import pytest
import torch

from slimtune.core import simulation
from slimtune.core.compute import add_product, fp32_out_gemm, mm_fp32, mm_scaled


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


@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_add_product_in_place_eagerly_and_the_same_sum_compiled(alpha):
    """Eagerly the sum lands in y itself (``addmm_``); compiled (``fullgraph=True``, strided columns of a wider
    buffer as the grouped Function passes them), the same values out of place, y untouched."""
    gen = torch.Generator().manual_seed(3)
    y0, wide = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 9, generator=gen,
                                                                                   dtype=torch.float64)
    a, b = wide[:, 2:5], torch.randn(3, 4, generator=gen, dtype=torch.float64)
    ref = y0 + alpha * (a @ b)
    y = y0.clone()
    assert add_product(y, a, b, alpha) is y and torch.allclose(y, ref, rtol=1e-14, atol=1e-14)
    y = y0.clone()
    compiled = torch.compile(lambda y, a, b: add_product(y, a, b, alpha), fullgraph=True, backend="aot_eager")
    got = compiled(y, a, b)
    assert got.shape == (6, 4) and torch.allclose(got, ref, rtol=1e-14, atol=1e-14) and torch.equal(y, y0)


def test_mm_scaled_on_meta_keeps_the_shape():
    a, b = torch.empty(6, 5, device="meta"), torch.empty(5, 4, device="meta")
    assert mm_scaled(a, b, 0.5).shape == (6, 4)
