"""A stacked DoRA chain's norm parts from one pass over its rows (slimtune.methods.dora.triton_rows, a ``triton_op``):
``S Aᵀ`` and ``‖W‖²_row`` against float64 under ``TRITON_INTERPRET=1`` in fp16 (K split or not, partial tiles, ranks
from 1 to 128, rows strided as a slice of a wider tensor), the chain's Function with the kernel against DoRA's
definition; on a GPU in bf16, eagerly and compiled (``fullgraph=True``: the graph holds the op)."""
from __future__ import annotations

import pytest
import torch

from slimtune.methods.dora.norm import dora_linear_reference
from slimtune.methods.dora.stacked import rows_kernel_takes, rows_norm_parts, rows_norm_parts_reference
from tests.helpers import BF16_TOL, backward_against_reference, rel_err, run_interpreted

from .test_stacked import _apply, _chain

INTERPRETED = r'''
import json, torch
from slimtune.methods.dora import stacked
from slimtune.methods.dora.norm import dora_linear_reference, magnitude_floor
from tests.helpers import rel_err

g = torch.Generator().manual_seed(0)
results = {"op": [], "function": [], "took": []}
# (weight rows, rank rows, K): one K slice and several, tiles cut at every edge, ranks 1 and 128
for total, rank, k in ((37, 5, 70), (130, 1, 600), (64, 128, 256), (3, 16, 2100)):
    wide = torch.randn(total + rank, k + 9, generator=g, dtype=torch.float64)
    rows64 = wide[:, 4:4 + k]  # a column slice: row stride k + 9
    rows = wide.half()[:, 4:4 + k]
    results["took"].append(stacked.rows_kernel_takes(rows, total))
    parts, weight_sq = stacked.rows_norm_parts(rows, total)
    want_parts = rows.double() @ rows[total:].double().t()  # the fp16 values, exactly
    want_sq = rows[:total].double().pow(2).sum(1)
    assert parts.shape == (total + rank, rank) and weight_sq.shape == (total,)
    assert parts.dtype == weight_sq.dtype == torch.float32
    results["op"] += [rel_err(parts, want_parts), rel_err(weight_sq, want_sq)]
# the chain's Function (three members) with the kernel's parts, against DoRA's definition in float64
outs, ranks, d_in = (40, 24, 24), (4, 3, 5), 96
x = torch.randn(3, 7, d_in, generator=g, dtype=torch.float64)
weights = [torch.randn(d, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5 for d in outs]
downs = [torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5 for r in ranks]
ups = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip(outs, ranks)]
mags = [w.norm(dim=1) * 1.2 for w in weights]
rows = torch.cat(weights + downs).half()
ref = [dora_linear_reference(x, w, None, a, b, m, 0.8) for w, a, b, m in zip(weights, downs, ups, mags)]
views, start = [], sum(outs)
for r in ranks:
    views.append(torch.nn.Parameter(rows[start:start + r]))
    start += r
got = stacked.StackedDoraFunction.apply(x.half(), 0.8, None, outs, magnitude_floor(torch.float16), *views,
                                        *[u.half() for u in ups], *[m.float() for m in mags], rows)
results["function"] = [rel_err(y, r) for y, r in zip(got, ref)]
print("RESULTS " + json.dumps(results))
'''


def test_kernel_against_float64_interpreted():
    pytest.importorskip("triton")
    results = run_interpreted(INTERPRETED)
    assert results["took"] == [True] * 4  # the kernel ran (not the reference)
    assert all(e < 1e-6 for e in results["op"]), results["op"]  # fp32 sums of exact fp16 products
    assert all(e < 5e-3 for e in results["function"]), results["function"]  # fp16 outputs


def test_the_kernel_declines_what_it_does_not_take(monkeypatch):
    rows = torch.randn(12, 16, dtype=torch.float16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not rows_kernel_takes(rows, 8)  # the CPU without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not rows_kernel_takes(rows.float(), 8)  # fp32: cuBLAS's full precision (tl.dot would round to tf32)
    assert not rows_kernel_takes(torch.randn(16, 12, dtype=torch.float16).t(), 8)  # columns strided
    assert not rows_kernel_takes(torch.randn(8 + 129, 16, dtype=torch.float16), 8)  # R over 128
    assert not rows_kernel_takes(rows, 12)  # no A rows
    monkeypatch.delenv("TRITON_INTERPRET")
    parts, weight_sq = rows_norm_parts(rows, 8)  # the reference where the kernel declines
    want_parts, want_sq = rows_norm_parts_reference(rows, 8)
    assert torch.equal(parts, want_parts) and torch.equal(weight_sq, want_sq) and parts.dtype == torch.float32


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("total,rank,k", [(3072 + 2048, 96, 3072), (3104 - 32, 32, 8192), (100, 7, 130)])
def test_kernel_on_the_gpu_in_bf16(total, rank, k):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(total + rank, k, generator=g, dtype=torch.float64).to("cuda", torch.bfloat16)
    assert rows_kernel_takes(rows, total)
    parts, weight_sq = rows_norm_parts(rows, total)
    exact = rows.double()
    assert rel_err(parts, exact @ exact[total:].t()) < 1e-5
    assert rel_err(weight_sq, exact[:total].pow(2).sum(1)) < 1e-5


@CUDA
@pytest.mark.parametrize("count", [1, 3])
def test_the_compiled_chain_holds_the_kernel_and_matches_the_definition(count):
    """Inductor, ``fullgraph=True``, bf16 on the GPU: outputs and gradients against float64 as eagerly
    (``test_stacked.test_matches_each_member_by_definition``)."""
    pytest.importorskip("triton")
    x64, _, w64, a64, _, b64, m64 = _chain(count, torch.float64)
    x, rows, _, _, downs, ups, mags = _chain(count, torch.bfloat16, device="cuda")
    x, x64 = x.to(torch.bfloat16).requires_grad_(), x64.requires_grad_()
    params64 = [t.requires_grad_() for t in (*a64, *b64, *m64)]
    params = [t.float().requires_grad_() for t in (*ups, *mags)]
    ref = [dora_linear_reference(x64, w, None, a, b, m, 1.3) for w, a, b, m in zip(w64, a64, b64, m64)]
    torch.compiler.reset()
    run = torch.compile(lambda t, *p: _apply(t, rows, downs, p[:count], p[count:], 1.3), fullgraph=True)
    got = run(x, *params)
    backward_against_reference(list(got), ref, "cuda", torch.bfloat16, BF16_TOL)
    for p, p64 in zip((*downs, *params, x), (*params64, x64)):
        assert p.grad is not None and rel_err(p.grad, p64.grad) < BF16_TOL
