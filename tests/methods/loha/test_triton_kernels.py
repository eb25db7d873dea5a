"""LoHa's fused fold kernels against their references, under ``TRITON_INTERPRET=1`` on the CPU.

The kernels (``slimtune.methods.loha.triton_kernels``) against the float64 dense formulas, and whole LoHa layers on the
folded path (Linear, Conv1d/Conv2d with stride, groups, rank dropout) through them against the float64 dense
reference; fp32 and fp16 (the interpreter mishandles bf16). One subprocess (the interpreter is chosen at import).
"""
import pytest
import torch

from tests.helpers import run_interpreted

pytest.importorskip("triton")

SCRIPT = r"""
import itertools, json, torch
from torch import nn
from slimtune.methods.loha import LohaLayer
from slimtune.methods.loha import triton_kernels as L
from tests.methods.loha.test_module import dense_reference, _params64
from tests.helpers import rel_err

torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float16):
    name = str(dtype).split(".")[-1]
    for M, K, r in ((5, 7, 3), (70, 130, 20), (130, 200, 128), (33, 65, 1)):
        w = torch.randn(M, K).to(dtype)
        w1a, w2a = torch.randn(M, r).to(dtype), torch.randn(M, r).to(dtype)
        w1b, w2b = torch.randn(r, K).to(dtype), torch.randn(r, K).to(dtype)
        for tag, scale in (("s", 0.5), ("rows", torch.rand(M).to(dtype))):
            s = scale if isinstance(scale, float) else scale.double()[:, None]
            leaves = [p.double().requires_grad_() for p in (w1a, w1b, w2a, w2b)]
            delta = (s * (leaves[0] @ leaves[1])) * (leaves[2] @ leaves[3])
            key = f"{name}/{M}x{K}r{r}/{tag}"
            results[key + "/fold"] = rel_err(L.fold(w, w1a, w1b, w2a, w2b, scale), w.double() + delta)
            inplace = w.clone()
            assert L.fold(inplace, w1a, w1b, w2a, w2b, scale, out=inplace) is inplace
            results[key + "/fold_inplace"] = rel_err(inplace, w.double() + delta)
            g = torch.randn(M, K).to(dtype)
            delta.backward(g.double())
            grads = L.fold_grads(g, w1a, w1b, w2a, w2b, scale)
            assert grads[4] is None
            results[key + "/grads"] = max(rel_err(a, b.grad) for a, b in zip(grads[:4], leaves))
            both = L.fold_grads(g, w1a, w1b, w2a, w2b, scale, w=w)  # W' written by the same launch
            results[key + "/grads+fold"] = max([rel_err(both[4], w.double() + delta.detach())]
                                               + [rel_err(a, b) for a, b in zip(both[:4], grads[:4])])

# the tile side is a module setting (benchmarks sweep it): 32 gives the same results
L.BLOCK = 32
w, g = torch.randn(70, 130), torch.randn(70, 130)
f = [torch.randn(70, 20), torch.randn(20, 130), torch.randn(70, 20), torch.randn(20, 130)]
leaves = [p.double().requires_grad_() for p in f]
delta = 0.5 * (leaves[0] @ leaves[1]) * (leaves[2] @ leaves[3])
delta.backward(g.double())
got = L.fold_grads(g, *f, 0.5, w=w)
dense = w.double() + delta.detach()
results["block32"] = max([rel_err(got[4], dense), rel_err(L.fold(w, *f, 0.5), dense)]
                         + [rel_err(a, b.grad) for a, b in zip(got[:4], leaves)])
L.BLOCK = 64

# fold_grads split into parts (fp32 partial sums, one reduction): the same results, including empty parts
for parts, dtype, (M, K, r) in itertools.product((2, 3, 5), (torch.float32, torch.float16),
                                                 ((70, 130, 20), (5, 7, 3))):
    L.GRAD_PARTS = parts
    scale = torch.rand(M).to(dtype)
    w, g = torch.randn(M, K).to(dtype), torch.randn(M, K).to(dtype)
    f = [torch.randn(M, r).to(dtype), torch.randn(r, K).to(dtype), torch.randn(M, r).to(dtype),
         torch.randn(r, K).to(dtype)]
    leaves = [p.double().requires_grad_() for p in f]
    delta = (scale.double()[:, None] * (leaves[0] @ leaves[1])) * (leaves[2] @ leaves[3])
    delta.backward(g.double())
    got = L.fold_grads(g, *f, scale, w=w)
    key = f"parts{parts}/{str(dtype)[6:]}/{M}x{K}"
    results[key] = max([rel_err(got[4], w.double() + delta.detach())]
                       + [rel_err(a, b.grad) for a, b in zip(got[:4], leaves)])
    results[key + "/dtypes"] = sorted({str(t.dtype)[6:] for t in got})
L.GRAD_PARTS = None
results["counters left zero"] = all(int(c.abs().sum()) == 0 for c in L._COUNTERS.values())
results["auto-parts"] = [L.grad_parts(70, 130, torch.device("cpu")), L.grad_parts(4096, 4096, torch.device("cpu"))]

layers = {
    "linear": (lambda: nn.Linear(40, 36), (3, 5, 40), 4),
    "linear-nobias": (lambda: nn.Linear(24, 20, bias=False), (7, 24), 6),
    "conv2d-k3-s2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9), 3),
    "conv1d-k3": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 11), 3),
    "conv2d-groups2": (lambda: nn.Conv2d(6, 8, 3, groups=2), (2, 6, 7, 7), 2),
}
for dtype in (torch.float32, torch.float16):
    name = str(dtype).split(".")[-1]
    for case, (make, shape, r) in layers.items():
        for dropout in (0.0, 0.5):
            torch.manual_seed(1)
            base = make().to(dtype).requires_grad_(False)  # frozen, as slimtune.adapt leaves it
            layer = LohaLayer(base, r, alpha=2 * r, init_weights=False, path="folded", rank_dropout=dropout)
            assert layer._fold_op.fused(layer.base_layer.weight)
            x = torch.randn(shape).to(dtype).requires_grad_()
            torch.manual_seed(5)  # the rank-dropout draw, replayed below
            y = layer(x)
            dy = torch.randn_like(y)
            y.backward(dy)
            params = _params64(layer)
            x64 = x.detach().double().requires_grad_()
            if dropout:
                torch.manual_seed(5)
                mask = (torch.rand(layer.out_features) > dropout).double()
                mask /= mask.mean().clamp_min(1 / layer.out_features)
                params_masked = dict(params)
                view = (-1,) + (1,) * (params["hada_w1_a"].dim() - 1)
                params_masked["hada_w1_a"] = params["hada_w1_a"] * mask.view(view)
                ref = dense_reference(layer, x64, params_masked)
            else:
                ref = dense_reference(layer, x64, params)
            ref.backward(dy.double())
            got = [y, x.grad] + [p.grad for p in layer.peft_parameters().values()]
            want = [ref, x64.grad] + [p.grad for p in params.values()]
            results[f"{name}/layer/{case}/{dropout}"] = max(rel_err(g, w) for g, w in zip(got, want))
            results[f"function/{name}/{case}/{dropout}"] = type(y.grad_fn).__name__

# FusedLohaLinear with fp32 factors over an fp16 base (cast in, fp32 gradients out) and an input without grad
torch.manual_seed(2)
layer = LohaLayer(nn.Linear(40, 36).half().requires_grad_(False), 4, alpha=8, init_weights=False, path="folded",
                  adapter_dtype=torch.float32)
x = torch.randn(6, 40).half()
y = layer(x)
dy = torch.randn_like(y)
y.backward(dy)
params = _params64(layer)
ref = dense_reference(layer, x.double(), params)
ref.backward(dy.double())
results["fp32-factors/function"] = type(y.grad_fn).__name__
results["fp32-factors/grad dtypes"] = sorted({str(p.grad.dtype) for p in layer.peft_parameters().values()})
results["fp32-factors/err"] = max([rel_err(y, ref)] + [rel_err(p.grad, q.grad) for p, q in
                                                        zip(layer.peft_parameters().values(), params.values())])
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(SCRIPT, timeout=600)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3)])
def test_fold_kernels_match_float64(interpreted, dtype, tol):
    errors = {k: v for k, v in interpreted.items() if k.startswith(dtype + "/") and "/layer/" not in k}
    assert len(errors) == 4 * 2 * 4
    assert interpreted["block32"] < 1e-6
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, bad
    # split into parts
    parts = {k: v for k, v in interpreted.items() if k.startswith("parts") and f"/{dtype}/" in k
             and not k.endswith("dtypes")}
    assert len(parts) == 6, parts
    bad = {k: v for k, v in parts.items() if not v < tol}
    assert not bad, bad
    assert all(interpreted[k + "/dtypes"] == [dtype] for k in parts)  # the partial sums cast back
    assert interpreted["counters left zero"]  # each launch resets its block counters for the next


def test_fold_grads_splits_only_thin_grids(interpreted, monkeypatch):
    """Few blocks stay one part; on a 132-SM GPU the 3B shapes split until ~4 programs per SM."""
    assert interpreted["auto-parts"] == [1, 1]
    from slimtune.methods.loha import triton_kernels as L

    monkeypatch.setattr(L, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    parts = {shape: L.grad_parts(*shape, cuda) for shape in ((3072, 3072), (1024, 3072), (8192, 3072), (70, 130))}
    assert parts == {(3072, 3072): 6, (1024, 3072): 4, (8192, 3072): 3, (70, 130): 1}
    monkeypatch.setattr(L, "GRAD_PARTS", 2)
    assert L.grad_parts(70, 130, cuda) == 2


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 5e-3)])
def test_folded_layers_through_the_kernels_match_dense_reference(interpreted, dtype, tol):
    errors = {k: v for k, v in interpreted.items() if k.startswith(dtype + "/layer/")}
    assert len(errors) == 5 * 2
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, bad


def test_dense_linear_layers_take_the_one_function_path(interpreted):
    """A folded LoHa on a dense Linear runs as FusedLohaLinear; convolutions through the generic FoldedFunction."""
    functions = {k: v for k, v in interpreted.items() if k.startswith("function/")}
    assert len(functions) == 2 * 5 * 2
    for key, name in functions.items():
        assert name == ("FusedLohaLinearBackward" if "/linear" in key else "FoldedFunctionBackward"), key


def test_fp32_factors_over_a_half_base(interpreted):
    assert interpreted["fp32-factors/function"] == "FusedLohaLinearBackward"
    assert interpreted["fp32-factors/grad dtypes"] == ["torch.float32"]
    assert interpreted["fp32-factors/err"] < 5e-3
