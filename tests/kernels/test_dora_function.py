"""DoRA's factored norm, composition tail and scale Function; what the Linear path saves and forms."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

import slimtune
from slimtune.kernels import dora as K
from tests.helpers import rel_err


def _factors(d_out, d_in, r, w_scale=1.0, b_scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * w_scale / d_in ** 0.5
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64) * b_scale
    return w.to(dtype), a.to(dtype), b.to(dtype)


# -- the factored norm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_out,d_in,r,w_scale,b_scale,s", [
    (24, 40, 4, 1.0, 1.0, 2.0),        # generic
    (64, 96, 16, 1.0, 1e-6, 0.5),      # near-unity: the update is tiny next to W
    (33, 17, 8, 1e3, 1e2, 3.0),        # large magnitudes
    (16, 200, 24, 1e-3, 1e3, 1.0),     # the update dominates W
    (8, 12, 12, 1.0, 1.0, 1e-4),       # r = d_in, tiny scaling
])
def test_factored_norm_equals_dense_float64(d_out, d_in, r, w_scale, b_scale, s):
    w, a, b = _factors(d_out, d_in, r, w_scale, b_scale)
    got = K.factored_row_norm_sq(w, a, b, s).sqrt()
    ref = K.dense_row_norm(w, a, b, s)
    assert got.dtype == torch.float64
    assert ((got - ref).abs() / ref).max().item() < 1e-10


def test_weight_row_norm_is_chunked_and_exact(monkeypatch):
    w, _, _ = _factors(50, 30, 2)
    full = w.pow(2).sum(1)
    monkeypatch.setattr(K, "_NORM_CHUNK", 64)  # 2 rows at a time
    assert torch.allclose(K.weight_row_norm_sq(w), full, rtol=1e-14, atol=0)
    assert K.weight_row_norm_sq(w.to(torch.bfloat16)).dtype == torch.float32


def test_factored_norm_in_low_precision_is_close():
    w, a, b = _factors(64, 128, 8, b_scale=0.3)
    ref = K.dense_row_norm(w, a, b, 2.0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 5e-3)):
        got = K.factored_row_norm_sq(w.to(dtype), a.to(dtype), b.to(dtype), 2.0).sqrt()
        assert got.dtype == torch.float32
        assert rel_err(got, ref) < tol


# -- the composition tail ------------------------------------------------------------------------------------
def test_compose_reference_is_the_formula():
    g = torch.Generator().manual_seed(1)
    base, lora = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    gm1, bias = torch.randn(7, generator=g) * 1e-3, torch.randn(7, generator=g)
    out = K.compose_forward_reference(base, gm1, lora, 0.5, bias)
    gg = 1 + gm1.double()
    want = gg * base.double() + gg * 0.5 * lora.double() + bias.double()
    assert rel_err(out, want) < 1e-7
    dy = torch.randn(2, 5, 7, generator=g)
    dbase, dm_sum = K.compose_backward_reference(dy, base, gg.float(), lora, 0.5)
    assert rel_err(dbase, dy.double() * gg) < 1e-7
    assert rel_err(dm_sum, (dy.double() * (base.double() + 0.5 * lora.double())).sum((0, 1))) < 1e-7
    # g = 1 gives the input back bit for bit
    assert torch.equal(K.compose_forward_reference(base, torch.zeros(7)), base)


def test_compose_along_channel_axis():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    gm1, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out = K.compose_forward_reference(x, gm1, bias=bias, dim=1)
    assert torch.allclose(out, x * (1 + gm1).view(1, 3, 1, 1) + bias.view(1, 3, 1, 1))


@pytest.mark.parametrize("dim,shape", [(-1, (2, 4, 6)), (1, (2, 6, 3, 3))])
def test_scale_function_gradcheck_float64(dim, shape):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    mag = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    norm = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda z, m, b: K.DoraScaleFunction.apply(z, m, norm, b, dim), (z, mag, bias))


# -- the Linear path: against the dense definition, what it saves, what it forms ---------------------------------
def _layer(d_in=24, d_out=20, r=4, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=bias)).to(dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=r, alpha=2 * r, target_modules=["0"], use_dora=True))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.2)
        layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape).to(dtype))
    return layer


def test_dora_linear_function_matches_definition_float64():
    layer = _layer(dtype=torch.float64)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    leaves = [p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    x2 = x.detach().clone().requires_grad_()
    norm = K.factored_row_norm_sq(w, layer.lora_A, layer.lora_B, layer.scaling).sqrt()
    y = K.dora_linear(x, w, b, layer.lora_A, layer.lora_B, layer.magnitude, norm, layer.scaling)
    ref = K.dora_linear_reference(x2, w, b, *leaves, layer.scaling)
    dy = torch.randn_like(ref)
    y.backward(dy)
    ref.backward(dy)
    assert rel_err(y, ref) < 1e-12
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad),
                         (x2.grad,) + tuple(p.grad for p in leaves)):
        assert rel_err(got, want) < 1e-12


def test_saved_tensors_hold_no_dense_weight_and_no_rank_activation():
    """Saved: x, W itself, A, B, z [N, d_out] in the activation dtype, [d_out] fp32 vectors — nothing else."""
    n, d_in, d_out, r = 30, 24, 20, 4
    layer = _layer(d_in, d_out, r, dtype=torch.bfloat16)
    x = torch.randn(n, d_in, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    shapes = [tuple(t.shape) for t in saved]
    weight = layer.base_layer.weight
    dense = [t for t in saved if tuple(t.shape) == (d_out, d_in)]
    assert all(t.data_ptr() == weight.data_ptr() for t in dense), "only the base weight itself may be saved"
    assert (n, r) not in shapes and (r, n) not in shapes, shapes
    big = [t for t in saved if t.numel() >= n * min(d_in, d_out)]
    assert all(t.dtype == torch.bfloat16 for t in big), "no fp32 activation copy"
    assert sum(tuple(t.shape) == (n, d_out) for t in saved) == 1, "z, once"
    assert {tuple(t.shape) for t in saved} <= {(n, d_in), (d_out, d_in), (r, d_in), (d_out, r), (n, d_out), (d_out,)}
    y.float().sum().backward()
    assert layer.magnitude.grad is not None and x.grad is not None


class _Shapes(TorchDispatchMode):
    """Shapes of the tensors the ops under it allocate."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Record the shape of every newly allocated output (views of inputs do not count)."""
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
        return out


def test_forward_and_backward_form_no_dense_product():
    d_in, d_out, r = 24, 20, 4
    layer = _layer(d_in, d_out, r)
    x = torch.randn(6, d_in, requires_grad=True)
    with _Shapes() as mode:
        layer(x).pow(2).sum().backward()
    assert (d_out, d_in) not in mode.shapes and (d_in, d_out) not in mode.shapes


def test_retain_graph_backward_twice_gives_the_same_gradients():
    layer = _layer()
    x = torch.randn(4, 24, requires_grad=True)
    y = layer(x).pow(2).sum()
    first = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B, layer.magnitude], retain_graph=True)
    second = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B, layer.magnitude])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
