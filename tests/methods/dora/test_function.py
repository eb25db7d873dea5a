"""DoRA's factored norm, composition tail and scale Function; what the Linear path saves and forms."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

import slimtune
from slimtune.core.frozen import materialize
from slimtune.methods.dora.compose import (DoraScaleFunction, compose_backward_reference, compose_forward,
                                           compose_forward_reference, compose_stats_reference)
from slimtune.methods.dora.function import dora_linear
from slimtune.methods.dora.norm import (dense_row_norm, dora_linear_reference, factored_row_norm_sq, magnitude_floor,
                                        saves_output, weight_row_norm_sq)
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
    got = factored_row_norm_sq(w, a, b, s).sqrt()
    ref = dense_row_norm(w, a, b, s)
    assert got.dtype == torch.float64
    assert ((got - ref).abs() / ref).max().item() < 1e-10


@pytest.mark.parametrize("d_out,d_in,r,w_scale,b_scale,s", [(24, 40, 4, 1.0, 1.0, 2.0), (16, 200, 24, 1e-3, 1e3, 1.0),
                                                         (64, 96, 16, 1.0, 1e-6, 0.5)])
def test_traced_factored_norm_equals_dense_float64(d_out, d_in, r, w_scale, b_scale, s):
    """The form Dynamo traces (the quadratic term as one reduction, ‖W‖² in one expression) against the dense sum."""
    w, a, b = _factors(d_out, d_in, r, w_scale, b_scale)
    torch.compiler.reset()
    traced = torch.compile(factored_row_norm_sq, fullgraph=True, backend="eager")
    got = traced(w, a, b, s).sqrt()
    ref = dense_row_norm(w, a, b, s)
    assert got.dtype == torch.float64
    assert ((got - ref).abs() / ref).max().item() < 1e-10


def test_weight_row_norm_is_chunked_and_exact(monkeypatch):
    w, _, _ = _factors(50, 30, 2)
    full = w.pow(2).sum(1)
    monkeypatch.setattr("slimtune.methods.dora.norm._NORM_CHUNK", 64)  # 2 rows at a time
    assert torch.allclose(weight_row_norm_sq(w), full, rtol=1e-14, atol=0)
    assert weight_row_norm_sq(w.to(torch.bfloat16)).dtype == torch.float32


def test_factored_norm_in_low_precision_is_close():
    w, a, b = _factors(64, 128, 8, b_scale=0.3)
    ref = dense_row_norm(w, a, b, 2.0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 5e-3)):
        got = factored_row_norm_sq(w.to(dtype), a.to(dtype), b.to(dtype), 2.0).sqrt()
        assert got.dtype == torch.float32
        assert rel_err(got, ref) < tol


# -- the composition tail ------------------------------------------------------------------------------------
def test_compose_reference_is_the_formula():
    g = torch.Generator().manual_seed(1)
    base, lora = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    gm1, bias = torch.randn(7, generator=g) * 1e-3, torch.randn(7, generator=g)
    out = compose_forward_reference(base, gm1, lora, 0.5, bias)
    gg = 1 + gm1.double()
    v = gg * base.double() + gg * 0.5 * lora.double()
    assert rel_err(out, v + bias.double()) < 1e-7
    assert rel_err(compose_stats_reference(base, gm1, lora, 0.5), v.abs().sum((0, 1))) < 1e-7
    dy = torch.randn(2, 5, 7, generator=g)
    dbase, dm_sum, dy_sum = compose_backward_reference(dy, base, gg.float(), lora, 0.5)
    assert dy_sum is None
    assert rel_err(dbase, dy.double() * gg) < 1e-7
    assert rel_err(dm_sum, (dy.double() * (base.double() + 0.5 * lora.double())).sum((0, 1))) < 1e-7
    _, shifted, dy_sum = compose_backward_reference(dy, base, gg.float(), shift=bias, dy_sum=True)
    assert rel_err(shifted, (dy.double() * (base.double() - bias.double())).sum((0, 1))) < 1e-7
    assert rel_err(dy_sum, dy.double().sum((0, 1))) < 1e-7
    # g = 1 gives the input back bit for bit
    assert torch.equal(compose_forward_reference(base, torch.zeros(7)), base)


def test_compose_along_channel_axis():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    gm1, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out = compose_forward_reference(x, gm1, bias=bias, dim=1)
    assert torch.allclose(out, x * (1 + gm1).view(1, 3, 1, 1) + bias.view(1, 3, 1, 1))
    out2, sums = compose_forward(x.clone(), gm1, bias=bias, dim=1, stats=True)
    assert torch.equal(out2, out)
    assert torch.allclose(sums, (x * (1 + gm1).view(1, 3, 1, 1)).abs().sum((0, 2, 3)))


@pytest.mark.parametrize("dim,shape", [(-1, (2, 4, 6)), (1, (2, 6, 3, 3))])
def test_scale_function_gradcheck_float64(dim, shape):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    mag = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    norm = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda z, m, b: DoraScaleFunction.apply(z, m, norm, b, dim), (z, mag, bias))


# -- the Linear path: against the dense definition, what it saves, what it forms ---------------------------------
def _layer(d_in=24, d_out=20, r=4, dtype=torch.float32, bias=True, seed=0, recompute=False):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=bias)).to(dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=r, alpha=2 * r, target_modules=["0"], use_dora=True,
                                              dora_recompute=recompute))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape) * 0.2)
        layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape).to(dtype))
    return layer


def _check_linear_function(layer, x, bias, tol, dy_from_z=False):
    """dora_linear on ``layer``'s tensors vs :func:`dora_linear_reference` in float64 (output and every
    gradient); returns the output and dm's error per channel relative to the size of its terms."""
    w = layer.base_layer.weight
    x = x.detach().clone().requires_grad_()
    params = (layer.lora_A, layer.lora_B, layer.magnitude)
    for p in params:
        p.grad = None
    bias_t = bias.detach().clone().requires_grad_() if bias is not None else None
    y = dora_linear(x, w, bias_t, *params, layer.scaling, weight_sq=weight_row_norm_sq(w),
                      recompute=layer.recompute)
    leaves = [p.detach().double().requires_grad_() for p in params]
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    ref = dora_linear_reference(x64, w.double(), b64, *leaves, layer.scaling)
    with torch.no_grad():
        v = w.double() + layer.scaling * leaves[1] @ leaves[0]
        z = torch.nn.functional.linear(x64, v)
    # dy = z: dm = Σ z² / ‖V‖ has no cancellation, so each channel's dm is checked to the dtype's accuracy
    dy = z.clone() if dy_from_z else torch.randn(ref.shape, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64)
    y.backward(dy.to(y.dtype))
    ref.backward(dy)
    errors = {"y": rel_err(y, ref), "x": rel_err(x.grad, x64.grad)}
    errors.update({n: rel_err(p.grad, leaf.grad) for n, p, leaf in zip("ABm", params, leaves)})
    if bias is not None:
        errors["bias"] = rel_err(bias_t.grad, b64.grad)
    assert all(e < tol for e in errors.values()), errors
    # per channel, relative to Σ_tokens |dy ⊙ z| / ‖V‖ (the size of dm's terms: a sum may cancel to ~0)
    size = (dy * z).abs().reshape(-1, v.shape[0]).sum(0) / v.norm(dim=1)
    return y, (layer.magnitude.grad.double() - leaves[2].grad).abs() / size


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_dora_linear_function_matches_definition_float64(recompute, bias):
    layer = _layer(dtype=torch.float64, recompute=recompute, bias=bias)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    y, _ = _check_linear_function(layer, x, layer.base_layer.bias, 1e-12)
    assert y.grad_fn.route == ("recompute" if recompute else "z" if bias else "output")


@pytest.mark.parametrize("recompute", [False, True])
def test_dora_linear_function_gradcheck_float64(recompute):
    """Numerical gradients in x, the bias and m (the norm depends on A and B only, so it is a true constant
    here; dm goes through the saved output, or through the recomputed z)."""
    layer = _layer(d_in=6, d_out=5, r=2, dtype=torch.float64)
    w, a, b = layer.base_layer.weight, layer.lora_A.detach(), layer.lora_B.detach()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    bias = layer.base_layer.bias.detach().clone().requires_grad_()
    m = layer.magnitude.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, bias, m: dora_linear(x, w, bias, a, b, m, layer.scaling, recompute=recompute), (x, bias, m))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
def test_zero_or_tiny_magnitude_keeps_the_output_path_and_exact_gradients(dtype, tol):
    """m = 0, m tiny and a tiny negative m: no fallback needed — the floored m' keeps g·z normal, so the saved
    output still gives z / ‖V‖, and every gradient (dm of those channels included) matches float64."""
    layer = _layer(dtype=dtype, bias=False)
    with torch.no_grad():
        layer.magnitude[3] = 0.0
        layer.magnitude[7] = 1e-30
        layer.magnitude[9] = -1e-36
    x = torch.randn(3, 5, 24).to(dtype)
    y, dm_err = _check_linear_function(layer, x, None, tol, dy_from_z=True)
    assert y.grad_fn.route == "output"
    assert dm_err[[3, 7, 9]].max() < tol
    # the floor's price: channel 3 outputs ε·z, not 0 — below 2^-63·|z| (fp64: 2^-511)
    eps = magnitude_floor(dtype)
    assert 0 < y[..., 3].abs().max() <= 2 * eps * y.abs().max() * 1e3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
def test_dominating_bias_and_fp16_save_z(dtype, tol):
    """A bias (which could dominate its channel: y − b would cancel) or fp16 (narrow exponent): z is saved, by a
    host-side rule; gradients exact even with a bias of 1e4 on one channel."""
    layer = _layer(dtype=dtype)
    bias = layer.base_layer.bias.detach()
    x = torch.randn(6, 24).to(dtype)
    big = bias.clone()
    big[2] = 1e4 if dtype != torch.float16 else 3e3
    y, dm_err = _check_linear_function(layer, x, big, tol, dy_from_z=True)
    assert y.grad_fn.route == "z"
    assert dm_err[2] < tol
    layer = _layer(dtype=dtype, bias=False)
    y, _ = _check_linear_function(layer, x, None, tol)
    assert y.grad_fn.route == ("z" if dtype == torch.float16 else "output")


def test_route_rule_and_floor():
    assert saves_output(None, torch.bfloat16) and saves_output(None, torch.float32)
    assert not saves_output(torch.zeros(2), torch.bfloat16) and not saves_output(None, torch.float16)
    assert magnitude_floor(torch.bfloat16) == magnitude_floor(torch.float32) == 2.0 ** -63
    assert magnitude_floor(torch.float64) == 2.0 ** -511
    # g·z stays normal for |z| ≥ 2^-63 at the floor
    assert torch.tensor(2.0 ** -63, dtype=torch.bfloat16) * 2.0 ** -63 >= torch.finfo(torch.bfloat16).tiny


def test_training_step_reads_nothing_back():
    """No ``.item()`` / ``bool(tensor)`` / device-to-host read anywhere in DoRA's forward or backward: the route is
    decided on the host (the only scalar read in the module is dropout's CPU seed, absent here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                        torch.ops.aten.equal.default):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    for dtype, bias in ((torch.float32, False), (torch.float32, True), (torch.float16, False)):
        layer = _layer(dtype=dtype, bias=bias)
        x = torch.randn(3, 5, 24).to(dtype).requires_grad_()
        with Watch():
            layer(x).float().square().sum().backward()
        assert not reads, (dtype, bias, reads)



def _saved_during(fn):
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("bias", [False, True])
def test_saved_tensors_hold_no_dense_weight_and_no_activation_but_the_output(bias):
    """Saved: x, W itself, A, B, the [4, d_out] fp32 vectors, and of shape [N, d_out] only the output object itself
    (stored once with whatever next op saves it) — never x Aᵀ, no fp32 copies; with a bias, z instead of y."""
    n, d_in, d_out, r = 30, 24, 20, 4
    layer = _layer(d_in, d_out, r, dtype=torch.bfloat16, bias=bias)
    x = torch.randn(2, n // 2, d_in, dtype=torch.bfloat16, requires_grad=True)
    y, saved = _saved_during(lambda: layer(x))
    weight = layer.base_layer.weight
    dense = [t for t in saved if tuple(t.shape) == (d_out, d_in)]
    assert dense and all(t.data_ptr() == weight.data_ptr() for t in dense), "only the base weight itself"
    activations = [t for t in saved if t.numel() >= n * min(d_in, d_out)]
    assert all(t.dtype == torch.bfloat16 for t in activations), "no fp32 activation copy"
    big_out = [t for t in saved if t.numel() == n * d_out and t.shape[-1] == d_out]
    assert len(big_out) == 1 and (big_out[0] is not y if bias else big_out[0] is y), "y itself, or z (bias)"
    inputs = [t for t in saved if t.numel() == n * d_in]
    assert inputs and all(t is x for t in inputs), "x itself"
    assert all(t.numel() != n * r for t in saved), "no x Aᵀ"
    assert {tuple(t.shape) for t in saved} <= {tuple(x.shape), tuple(y.shape), (d_out, d_in), (r, d_in),
                                               (d_out, r), (4, d_out)}
    y.float().sum().backward()
    assert layer.magnitude.grad is not None and x.grad is not None


@pytest.mark.parametrize("case", ["recompute", "frozen_magnitude"])
def test_no_activation_of_the_output_size_is_saved_when_dm_needs_none(case):
    layer = _layer(recompute=case == "recompute")
    layer.magnitude.requires_grad_(case == "recompute")
    x = torch.randn(7, 24, requires_grad=True)
    y, saved = _saved_during(lambda: layer(x))
    assert not [t for t in saved if tuple(t.shape) == (7, 20)]
    y.pow(2).sum().backward()
    assert x.grad is not None and layer.lora_B.grad is not None


def test_modifying_the_output_in_place_raises_instead_of_a_wrong_gradient():
    layer = _layer(bias=False)  # the output route (with a bias z is saved and y is free to change)
    y = layer(torch.randn(2, 3, 24))
    assert not y._is_view()  # in-place use is allowed where nothing saved it (no_grad, frozen magnitude, ...)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


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


@pytest.mark.parametrize("recompute", [False, True])
def test_saved_output_is_released_before_dx_is_allocated(monkeypatch, recompute):
    """The backward's transient peak stays LoRA's: what the tail saved ([N, d_out]) is freed when the product's
    backward dequantises / casts W for dx."""
    from torch.multiprocessing.reductions import StorageWeakRef

    layer = _layer(recompute=recompute)
    x = torch.randn(5, 24, requires_grad=True)
    y = layer(x)
    ref = StorageWeakRef(y.untyped_storage())
    loss = y.pow(2).sum()
    del y
    seen = []
    real = materialize

    def spy(weight, dtype):
        seen.append(ref.expired())
        return real(weight, dtype)

    for module in ("function", "product"):  # the recompute's z and the product's dx
        monkeypatch.setattr(f"slimtune.methods.dora.{module}.materialize", spy)
    loss.backward()
    assert seen and seen[-1], "the product's dx GEMM runs after the tail released its saved tensors"
