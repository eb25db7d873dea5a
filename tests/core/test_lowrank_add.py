"""``y = base + s·h upᵀ`` (slimtune.core.lowrank_add): the Triton kernel (a ``triton_op``) against the float64
reference under ``TRITON_INTERPRET=1`` (float32 and float16; bf16 on the GPU: ``test_lowrank_add_cuda.py``) — on
strided slices of wider buffers, ranks over one block of the kernel's loop, edges of partial tiles; then in the
stacked chain's Function (eagerly: the interpreter's kernel cannot be traced; compiled on the GPU)."""
from __future__ import annotations

import torch

from slimtune.core.lowrank_add import lowrank_add_kernel_loaded, lowrank_add_reference

from ..helpers import check_interpreted_errors

INTERPRETED = r'''
import json, torch
from slimtune.core import stacked_rows as sr
from slimtune.core.lowrank_add import lowrank_add_kernel_loaded
from tests.helpers import rel_err

g = torch.Generator().manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float16):
    assert lowrank_add_kernel_loaded(torch.empty(0, dtype=torch.float16))
    errors = []
    for m, n, r in ((37, 150, 5), (130, 129, 70), (1, 16, 16)):
        wide = torch.randn(m, n + r + 7, generator=g, dtype=torch.float64)
        base, h = wide[:, 3:3 + n], wide[:, n + 3:n + 3 + r]  # strided rows, as slices of the stacked output
        up = torch.randn(n, r, generator=g, dtype=torch.float64)
        want = base + 0.5 * h @ up.t()
        wide_c = wide.to(dtype)
        got = torch.ops.slimtune.lowrank_add(wide_c[:, 3:3 + n], wide_c[:, n + 3:n + 3 + r], up.to(dtype), 0.5)
        assert got.shape == (m, n) and got.dtype == dtype and got.is_contiguous()
        errors.append(rel_err(got, want))
    results[f"{dtype}/op".replace("torch.", "")] = errors
    # the chain's Function with the kernel's sums, eagerly and compiled: outputs and gradients against float64
    widths, ranks = (24, 16), (4, 3)
    x = torch.randn(2, 5, 20, generator=g, dtype=torch.float64)
    weights = [torch.randn(d, 20, generator=g, dtype=torch.float64) / 20 ** 0.5 for d in widths]
    downs = [torch.randn(r, 20, generator=g, dtype=torch.float64) / 20 ** 0.5 for r in ranks]
    ups = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip(widths, ranks)]
    dys = [torch.randn(2, 5, d, generator=g, dtype=torch.float64) for d in widths]
    leaves = [t.clone().requires_grad_() for t in (x, *downs, *ups)]
    refs = [leaves[0] @ w.t() + 2.0 * (leaves[0] @ a.t()) @ b.t() for w, a, b in zip(weights, leaves[1:3], leaves[3:])]
    torch.autograd.backward(refs, dys)
    for name, run in (("eager", sr.StackedLowRankFunction.apply),):  # compiled: on the GPU (the interpreter's
        # kernel cannot be traced)
        rows = torch.cat(weights + downs).to(dtype)
        a_views = [rows[24 + 16:24 + 16 + 4].requires_grad_(), rows[24 + 16 + 4:].requires_grad_()]
        a_leaves = [torch.nn.Parameter(t.detach()) for t in a_views]
        for p, view in zip(a_leaves, a_views):
            p.data = view.detach()
        xc = x.to(dtype).requires_grad_()
        bs = [torch.nn.Parameter(u.to(dtype)) for u in ups]
        outs = run(xc, 2.0, None, widths, True, *a_leaves, *bs, rows)
        torch.autograd.backward(outs, [d.to(dtype) for d in dys])
        errs = [rel_err(o, r) for o, r in zip(outs, refs)]
        errs += [rel_err(t.grad, leaf.grad) for t, leaf in zip((xc, *a_leaves, *bs), leaves)]
        results[f"{dtype}/{name}".replace("torch.", "")] = errs
print("RESULTS " + json.dumps(results))
'''


def test_kernel_against_float64_interpreted():
    check_interpreted_errors(INTERPRETED, cases=4, fp32_tol=1e-6, half_tol=2e-3)


def test_kernel_declines_what_it_does_not_take(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not lowrank_add_kernel_loaded(torch.empty(2, dtype=torch.bfloat16))  # the CPU, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not lowrank_add_kernel_loaded(torch.empty(2, dtype=torch.float32))  # fp32: cuBLAS's full precision


def test_reference_is_one_addmm():
    g = torch.Generator().manual_seed(1)
    base, h, up = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 6), (4, 2), (6, 2)))
    assert torch.allclose(lowrank_add_reference(base, h, up, 0.25), base + 0.25 * h @ up.t())
