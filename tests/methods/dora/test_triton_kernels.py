"""The fused DoRA compose kernels against their PyTorch references, under ``TRITON_INTERPRET=1`` on the CPU.

Triton picks interpreter or compiler when a kernel is defined (at import of ``slimtune.methods.dora.triton_kernels``),
so the checks run in a fresh subprocess with the variable set; it prints one JSON line of relative errors.
Small shapes, float32 and float16 (the CPU interpreter mishandles bfloat16).
"""
import pytest

from tests.helpers import run_interpreted

pytest.importorskip("triton")

SCRIPT = r"""
import json, torch
import slimtune
from slimtune.core.triton import use_triton
from slimtune.methods.dora.compose import compose_backward_reference, compose_forward_reference, compose_stats_reference
from slimtune.methods.dora.norm import dora_vectors_reference
from slimtune.methods.dora import triton_kernels as T, triton_norm as TN
from tests.helpers import dora_layer_errors, rel_err

torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float16):
    name = str(dtype).split(".")[-1]
    for n, d in ((7, 5), (33, 130), (70, 300)):
        base, lora = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
        gm1, bias = torch.randn(d) * 1e-2, torch.randn(d).to(dtype)
        dy = torch.randn(n, d).to(dtype)
        for tag, lo, bi in (("z", None, None), ("full", lora, bias)):
            key = f"{name}/{n}x{d}/{tag}"
            out, sums = T.compose_forward(base, gm1, lo, 0.5, bi, stats=True)
            results[key + "/fwd"] = rel_err(out, compose_forward_reference(base, gm1, lo, 0.5, bi))
            results[key + "/stats"] = rel_err(sums, compose_stats_reference(base, gm1, lo, 0.5))
            db, dm, ds = T.compose_backward(dy, base, gm1 + 1, lo, 0.5, shift=bi, dy_sum=True)
            rdb, rdm, rds = compose_backward_reference(dy, base, gm1 + 1, lo, 0.5, shift=bi, dy_sum=True)
            results[key + "/dbase"], results[key + "/dm"] = rel_err(db, rdb), rel_err(dm, rdm)
            results[key + "/dysum"] = rel_err(ds, rds)
        # in place (out / dbase = base), a 3-D input, and a stride-0 gradient, as .sum() gives
        z = base.clone().view(1, n, d)
        out, none = T.compose_forward(z, gm1, bias=bias, out=z)
        assert none is None and out is z
        results[f"{name}/{n}x{d}/inplace_fwd"] = rel_err(out.view(n, d),
                                                         compose_forward_reference(base, gm1, bias=bias))
        ones = torch.ones((), dtype=dtype).expand(n, d)
        z = base.clone()
        db, dm, none = T.compose_backward(ones, z, gm1 + 1, dbase_out=z)
        assert none is None
        rdb, rdm, _ = compose_backward_reference(ones, base, gm1 + 1)
        results[f"{name}/{n}x{d}/inplace_expanded_bwd"] = max(rel_err(db, rdb), rel_err(dm, rdm))
        # the first sums scaled by a [D] vector inside the kernel (per row chunk), both sums fp32
        scale = torch.rand(d) + 0.5
        _, dm, ds = T.compose_backward(dy, base, gm1 + 1, shift=bias, dy_sum=True, scale=scale)
        _, rdm, rds = compose_backward_reference(dy, base, gm1 + 1, shift=bias, dy_sum=True)
        assert dm.dtype == ds.dtype == torch.float32
        results[f"{name}/{n}x{d}/finish"] = max(rel_err(dm, rdm * scale), rel_err(ds, rds))

    # the whole DoRA Linear through the kernels (use_triton is on for CPU tensors under the interpreter):
    # output path (no bias), a zero and a tiny magnitude on it (floored: no fallback needed), recompute mode,
    # with a bias (z saved); fp16 saves z too
    for case in ("output", "zero_m", "recompute", "bias"):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(40, 36, bias=case in ("recompute", "bias"))).to(dtype)
        slimtune.adapt(model, slimtune.LoraConfig(r=4, alpha=8, target_modules=["0"], use_dora=True,
                                                  dora_recompute=case == "recompute"))
        layer = model[0]
        assert use_triton(layer.lora_A)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)
            layer.magnitude.mul_(1.1)
            if case == "zero_m":
                layer.magnitude[5] = 0
                layer.magnitude[6] = -1e-30 if dtype == torch.float32 else 0
        x = torch.randn(3, 9, 40).to(dtype).requires_grad_()
        y = model(x)
        route = {"recompute": "recompute", "bias": "z"}.get(case, "output" if dtype == torch.float32 else "z")
        assert y.grad_fn.route == route, (case, y.grad_fn.route)
        dy = torch.randn_like(y)
        y.backward(dy)
        results[f"{name}/layer/{case}"] = max(dora_layer_errors(layer, x, y, dy).values())
# the [d_out] vectors (g − 1, g, 1/‖V‖, 1/m') from W Aᵀ, the Gram matrix and B (B (A Aᵀ) formed in the kernel,
# over one or several rank blocks), magnitudes floored; B in fp32 and fp16
def norm_parts(d_out, r, b_dtype):  # (W Aᵀ, A Aᵀ, B, ‖W‖², m) of a random layer; m with a zero and a tiny negative
    a = torch.randn(r, 50)
    wa, b = torch.randn(d_out, r), (torch.randn(d_out, r) * 0.1).to(b_dtype)
    gram = a @ a.t()
    wsq = torch.rand(d_out) * 4 + 1 + (b.float() @ gram * b.float()).sum(1)
    m = torch.rand(d_out) + 0.5
    m[0], m[-1] = 0.0, -1e-30
    return wa, gram, b, wsq, m


for d_out, r in ((5, 3), (300, 70), (70, 130)):
    for b_dtype in (torch.float32, torch.float16):
        wa, gram, b, wsq, m = norm_parts(d_out, r, b_dtype)
        for eps in (0.0, 2.0 ** -63):
            got = TN.dora_vectors(wa, gram, b, wsq, m, 0.7, eps)
            want = dora_vectors_reference(wa.double(), gram.double(), b.double(), wsq.double(), m.double(), 0.7,
                                            eps)
            ok = torch.isfinite(want)
            assert torch.equal(torch.isfinite(got), ok)
            results[f"vec/{d_out}x{r}/{str(b_dtype)[-7:]}/{eps > 0}"] = rel_err(got[ok], want[ok])
# the vectors and the forward compose in one launch (each row chunk forms its columns' vectors, the first writes
# them): several column blocks and row chunks, ranks up to FUSED_MAX_RANK, a bias, g far from 1, m = 0 and a tiny
# negative m, z in fp32 and fp16 (B in z's dtype, as the layer passes it)
for n, d_out, r in ((7, 5, 3), (70, 130, 64), (40, 300, 16)):
    for dtype in (torch.float32, torch.float16):
        wa, gram, b, wsq, m = norm_parts(d_out, r, dtype)
        m[1] = 9.0
        z, bias = torch.randn(n, d_out).to(dtype), torch.randn(d_out).to(dtype)
        for eps, bi in ((0.0, None), (2.0 ** -63, bias)):
            y, vec = TN.vectors_and_compose(z, wa, gram, b, wsq, m, 0.7, eps, bi)
            want = dora_vectors_reference(wa.double(), gram.double(), b.double(), wsq.double(), m.double(), 0.7,
                                          eps)
            ok = torch.isfinite(want)
            assert torch.equal(torch.isfinite(vec), ok)
            want_y = compose_forward_reference(z, want[0].float(), bias=bi, g=want[1].float())
            key = f"fused/{str(dtype)[-7:]}/{n}x{d_out}x{r}/{eps > 0}"
            results[key] = max(rel_err(vec[ok], want[ok]), rel_err(y, want_y))

print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(SCRIPT, timeout=300)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 1e-3)])
def test_compose_kernels_match_reference(interpreted, dtype, tol):
    errors = {k: v for k, v in interpreted.items() if k.startswith(dtype + "/") and "/layer/" not in k}
    assert len(errors) == 3 * (2 * 5 + 3)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, bad


def test_vectors_kernel_matches_reference(interpreted):
    errors = {k: v for k, v in interpreted.items() if k.startswith("vec/")}
    assert len(errors) == 12
    bad = {k: v for k, v in errors.items() if not v < 1e-6}
    assert not bad, bad


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 1e-3)])
def test_vectors_and_compose_in_one_launch_match_reference(interpreted, dtype, tol):
    errors = {k: v for k, v in interpreted.items() if k.startswith(f"fused/{dtype[-7:]}/")}
    assert len(errors) == 6
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, bad


@pytest.mark.parametrize("case", ["output", "zero_m", "recompute", "bias"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 5e-3)])
def test_dora_layer_through_the_kernels(interpreted, dtype, tol, case):
    assert interpreted[f"{dtype}/layer/{case}"] < tol
