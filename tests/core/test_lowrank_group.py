"""The sibling Function (one x, several low-rank layers) against each member through PyTorch's autograd."""
import pytest
import torch

from slimtune.core.lowrank_group import grouped_lowrank_linear, grouped_lowrank_reference
from tests.helpers import BF16_TOL, FP32_TOL, backward_against_reference, rel_err

OUTS, RANKS = (7, 5, 5), (3, 2, 3)


def _members(dtype=torch.float64, bias=(True, False, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    weights = [torch.randn(d, 10, generator=g, dtype=torch.float64) / 10 ** 0.5 for d in OUTS]
    biases = [torch.randn(d, generator=g, dtype=torch.float64) if has else None for d, has in zip(OUTS, bias)]
    downs = [torch.randn(r, 10, generator=g, dtype=torch.float64) / 10 ** 0.5 for r in RANKS]
    ups = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip(OUTS, RANKS)]  # non-zero B
    conv = lambda ts: [t.to(dtype) if t is not None else None for t in ts]
    return x.to(dtype), conv(weights), conv(biases), conv(downs), conv(ups)


def test_gradcheck_float64_every_input():
    x, weights, biases, downs, ups = _members()
    leaves = [x, *weights, *[b for b in biases if b is not None], *downs, *ups]
    for t in leaves:
        t.requires_grad_()

    def f(*_):
        return grouped_lowrank_linear(x, weights, biases, downs, ups, 0.7)

    assert torch.autograd.gradcheck(f, tuple(leaves))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_matches_float64_reference(device, dtype, tol, x_grad):
    ref_in = _members()
    got_in = [t.to(device) if isinstance(t, torch.Tensor) else [u.to(device) if u is not None else None for u in t]
              for t in _members(dtype)]
    x64, x = ref_in[0].requires_grad_(x_grad), got_in[0].requires_grad_(x_grad)
    params64 = [*ref_in[3], *ref_in[4]]
    params = [t.float().requires_grad_() for t in (*got_in[3], *got_in[4])]  # fp32 master adapters
    for t in params64:
        t.requires_grad_()
    n = len(OUTS)
    ref = grouped_lowrank_reference(x64, ref_in[1], ref_in[2], params64[:n], params64[n:], 1.3)
    got = grouped_lowrank_linear(x, got_in[1], got_in[2], params[:n], params[n:], 1.3)
    backward_against_reference(got, ref, device, dtype, tol)
    for p, p64 in zip(params, params64):
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, p64.grad) < tol
    assert (x.grad is None) if not x_grad else rel_err(x.grad, x64.grad) < tol


def test_an_unused_output_gives_its_member_no_gradients():
    x, weights, biases, downs, ups = _members()
    x.requires_grad_()
    for t in (*downs, *ups):
        t.requires_grad_()
    ys = grouped_lowrank_linear(x, weights, biases, downs, ups, 0.5)
    (ys[0].sum() + ys[2].square().sum()).backward()
    assert downs[1].grad is None and ups[1].grad is None  # as if the member's own Function had never run
    x_ref = x.detach().clone().requires_grad_()
    refs = [[t.detach().clone().requires_grad_() for t in ts] for ts in (downs, ups)]
    ref = grouped_lowrank_reference(x_ref, weights, biases, *refs, 0.5)
    (ref[0].sum() + ref[2].square().sum()).backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-12
    for got, want in zip((downs[0], downs[2], ups[0], ups[2]), (refs[0][0], refs[0][2], refs[1][0], refs[1][2])):
        assert rel_err(got.grad, want.grad) < 1e-12


def test_saves_x_once_and_no_products():
    x, weights, biases, downs, ups = _members(torch.float32)
    x.requires_grad_()
    for t in (*downs, *ups):
        t.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        grouped_lowrank_linear(x, weights, biases, downs, ups, 1.0)
    inputs = [x, *weights, *downs, *ups]
    assert len(saved) == len(inputs) and all(any(s is t for t in inputs) for s in saved)


def test_quantized_weights_are_dequantized_per_use():
    from slimtune.quant import NF4Linear, quantized_handle

    x, weights, biases, downs, ups = _members(torch.float32)
    layers = [NF4Linear.from_linear(torch.nn.Linear(10, d, bias=False).requires_grad_(False)) for d in OUTS]
    handles = [quantized_handle(layer) for layer in layers]
    dense = [h.dequantize(torch.float32) for h in handles]
    x.requires_grad_()
    got = grouped_lowrank_linear(x, handles, biases, downs, ups, 1.0)
    ref = grouped_lowrank_linear(x, dense, biases, downs, ups, 1.0)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    dx = torch.autograd.grad(sum(y.sum() for y in got), x)[0]
    dx_ref = torch.autograd.grad(sum(y.sum() for y in ref), x)[0]
    assert rel_err(dx, dx_ref) < 1e-6


def test_refuses_mismatched_member_lists():
    x, weights, biases, downs, ups = _members()
    with pytest.raises(ValueError, match="one weight, bias"):
        grouped_lowrank_linear(x, weights, biases[:2], downs, ups, 1.0)
