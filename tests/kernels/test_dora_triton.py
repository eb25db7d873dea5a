"""The fused DoRA compose kernels against their PyTorch references, under ``TRITON_INTERPRET=1`` on the CPU.

Triton picks interpreter or compiler when a kernel is defined (at import of ``slimtune.kernels.dora_triton``),
so the checks run in a fresh subprocess with the variable set; it prints one JSON line of relative errors.
Small shapes, float32 and float16 (the CPU interpreter mishandles bfloat16).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, torch
import slimtune
from slimtune.kernels import dora as K, dora_triton as T
from tests.helpers import rel_err

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
            results[key + "/fwd"] = rel_err(out, K.compose_forward_reference(base, gm1, lo, 0.5, bi))
            results[key + "/stats"] = rel_err(sums, K.compose_stats_reference(base, gm1, lo, 0.5))
            db, dm, ds = T.compose_backward(dy, base, gm1 + 1, lo, 0.5, shift=bi, dy_sum=True)
            rdb, rdm, rds = K.compose_backward_reference(dy, base, gm1 + 1, lo, 0.5, shift=bi, dy_sum=True)
            results[key + "/dbase"], results[key + "/dm"] = rel_err(db, rdb), rel_err(dm, rdm)
            results[key + "/dysum"] = rel_err(ds, rds)
        # in place (out / dbase = base), a 3-D input, and a stride-0 gradient, as .sum() gives
        z = base.clone().view(1, n, d)
        out, none = T.compose_forward(z, gm1, bias=bias, out=z)
        assert none is None and out is z
        results[f"{name}/{n}x{d}/inplace_fwd"] = rel_err(out.view(n, d),
                                                         K.compose_forward_reference(base, gm1, bias=bias))
        ones = torch.ones((), dtype=dtype).expand(n, d)
        z = base.clone()
        db, dm, none = T.compose_backward(ones, z, gm1 + 1, dbase_out=z)
        assert none is None
        rdb, rdm, _ = K.compose_backward_reference(ones, base, gm1 + 1)
        results[f"{name}/{n}x{d}/inplace_expanded_bwd"] = max(rel_err(db, rdb), rel_err(dm, rdm))

    # the whole DoRA Linear through the kernels (use_triton is on for CPU tensors under the interpreter):
    # output path, a zero magnitude (falls back to recomputing z), recompute mode, with a bias
    for case in ("output", "zero_m", "recompute"):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(40, 36)).to(dtype)
        slimtune.adapt(model, slimtune.LoraConfig(r=4, alpha=8, target_modules=["0"], use_dora=True,
                                                  dora_recompute=case == "recompute"))
        layer = model[0]
        assert K.use_triton(layer.lora_A)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)
            layer.magnitude.mul_(1.1)
            if case == "zero_m":
                layer.magnitude[5] = 0
        x = torch.randn(3, 9, 40).to(dtype).requires_grad_()
        y = model(x)
        if case != "recompute":
            assert bool(y.grad_fn.unusable) == (case == "zero_m")
        dy = torch.randn_like(y)
        y.backward(dy)
        w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
        leaves = [p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
        x64 = x.detach().double().requires_grad_()
        ref = K.dora_linear_reference(x64, w, b, *leaves, layer.scaling)
        ref.backward(dy.double())
        got = (y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad)
        want = (ref, x64.grad) + tuple(p.grad for p in leaves)
        results[f"{name}/layer/{case}"] = max(rel_err(g, w_) for g, w_ in zip(got, want))
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 1e-3)])
def test_compose_kernels_match_reference(interpreted, dtype, tol):
    errors = {k: v for k, v in interpreted.items() if k.startswith(dtype + "/") and "/layer/" not in k}
    assert len(errors) == 3 * (2 * 5 + 2)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, bad


@pytest.mark.parametrize("case", ["output", "zero_m", "recompute"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 5e-3)])
def test_dora_layer_through_the_kernels(interpreted, dtype, tol, case):
    assert interpreted[f"{dtype}/layer/{case}"] < tol
