"""The explicit backward of LoHa/LoKr (kernels/structured.py and the ops in adapters/loha.py, lokr.py) against
PyTorch autograd on the dense formula, in float64: the product helpers, every op (structured and folded), with
scales, rank-dropout masks, frozen parameters and inputs that need no gradient; and no autograd inside backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.core.products import (add_mix_, cols_kr, cols_kr_grad, kron_grad, lowrank_grad, mix, mix_backward,
                                    rows_kr, rows_kr_grad, sum_bmm, tucker_grad, tucker_weight)
from slimtune.core.structured import folded_apply, structured_apply
from slimtune.methods.loha import LohaLayer, loha_delta_weight
from slimtune.methods.loha.math import core_kr, core_kr_grad
from slimtune.methods.lokr import LokrLayer, lokr_delta_weight, lokr_factors
from slimtune.methods.lokr.function import KronLinearFunction
from tests.helpers import perturb_adapters, rel_err

TOL = 1e-10
G = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def assert_grads(out: torch.Tensor, inputs: list[torch.Tensor], explicit: list[torch.Tensor | None]) -> None:
    """``explicit`` (our formulas for upstream gradient ``g``) equals autograd's for ``out``."""
    g = randn(*out.shape)
    want = torch.autograd.grad(out, inputs, g)
    got = explicit(g)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and rel_err(a, b) < TOL, i


# -- product helpers --------------------------------------------------------------------------------
@pytest.mark.parametrize("r,s,n", [(3, 4, 7), (1, 5, 2), (4, 4, 1), (6, 2, 9)])
def test_face_splitting_products(r, s, n):
    a, b = leaves(randn(r, n), randn(s, n))
    assert_grads(rows_kr(a, b), [a, b], lambda g: rows_kr_grad(g, a, b, True, True))
    a, b = leaves(randn(n, r), randn(n, s))
    assert_grads(cols_kr(a, b), [a, b], lambda g: cols_kr_grad(g, a, b, True, True))
    assert rows_kr_grad(randn(r * s, n), a.t(), b.t(), False, True)[0] is None


@pytest.mark.parametrize("m,r,n", [(5, 2, 7), (1, 3, 4), (8, 8, 1)])
def test_lowrank_product(m, r, n):
    a, b = leaves(randn(m, r), randn(r, n))
    assert_grads(a @ b, [a, b], lambda g: lowrank_grad(g, a, b, True, True))


@pytest.mark.parametrize("core,out,inp", [((2, 2, 3, 3), 5, 4), ((3, 3, 1, 1), 6, 2), ((2, 2, 5, 1), 3, 7)])
def test_tucker_product(core, out, inp):
    t, wa, wb = leaves(randn(*core), randn(core[0], out), randn(core[1], inp))
    assert_grads(tucker_weight(t, wa, wb), [t, wa, wb], lambda g: tucker_grad(g, t, wa, wb, (True,) * 3))


@pytest.mark.parametrize("r,k,kernel", [(2, (3, 3), (3, 3)), (3, (1, 1), (1, 1)), (2, (5, 1), (5,)), (1, (3, 1), (3,))])
def test_tucker_core_product(r, k, kernel):
    t1, t2 = leaves(randn(r, r, *k), randn(r, r, *k))  # PEFT's core shape (Conv1d: [r, r, k, 1])
    assert_grads(core_kr(t1, t2, kernel), [t1, t2], lambda g: core_kr_grad(g, t1, t2, True, True))


@pytest.mark.parametrize("a_shape,b_shape", [((3, 4), (5, 2)), ((2, 3, 1, 1), (4, 5, 3, 3)), ((3, 2), (4, 5, 3)),
                                             ((1, 7), (6, 1)), ((2, 2), (2, 6))])
def test_kronecker_product(a_shape, b_shape):
    a, b = leaves(randn(*a_shape), randn(*b_shape))
    assert_grads(torch.kron(a, b), [a, b], lambda g: kron_grad(g, a, b, True, True))


@pytest.mark.parametrize("n,m,p,k", [(5, 3, 4, 6), (4, 9, 8, 2)])  # both branches of sum_bmm
def test_sum_bmm(n, m, p, k):
    a, b = randn(n, m, k), randn(n, p, k)
    assert rel_err(sum_bmm(a, b), torch.einsum("nmk,npk->mp", a, b)) < TOL


@pytest.mark.parametrize("transposed", [False, True])
def test_channel_mix(transposed):
    h, w = leaves(randn(2, 5, 3, 4), randn(7, 5))
    w_op = w.detach().t().contiguous().t() if transposed else w.detach()
    ref = F.conv2d(h, w[:, :, None, None])
    assert rel_err(mix(h.detach(), w_op), ref) < TOL
    y = randn(2, 7, 3, 4)
    assert rel_err(add_mix_(y.clone(), h.detach(), w_op), y + ref) < TOL
    y_cl = y.clone().contiguous(memory_format=torch.channels_last)  # not contiguous: added out of place
    assert rel_err(add_mix_(y_cl, h.detach(), w_op), y + ref) < TOL

    def explicit(g):
        dh, dw = mix_backward(g, h.detach(), w_op, True, True, w_transposed=transposed)
        return dh, (dw.t() if transposed else dw)

    assert_grads(ref, [h, w], explicit)


# -- every op, through its Function, against the dense formula -------------------------------------
def dense_delta(layer: nn.Module, params: list[torch.Tensor], scale: float, mask: torch.Tensor | None
                ) -> torch.Tensor:
    """``ΔW`` of the layer's math (float64, autograd-differentiable), rows times ``mask``."""
    names = layer._names
    if isinstance(layer, LohaLayer):
        p = dict(zip(names, params))
        delta = loha_delta_weight(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"],
                                     p.get("hada_t1"), p.get("hada_t2"), scale, layer.weight_shape)
    else:
        w1, w2 = lokr_factors(names, tuple(params), torch.float64)
        delta = lokr_delta_weight(w1, w2, scale, layer.weight_shape)
    return delta if mask is None else delta * mask.view(-1, *(1,) * (delta.dim() - 1))


def base_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        return F.linear(x, w, b)
    conv = F.conv2d if w.dim() == 4 else F.conv1d
    return conv(x, w, b, base.stride, base.padding, base.dilation, base.groups)


def check_op(layer: nn.Module, x_shape: tuple[int, ...], path: str, scale: float = 1.0, masked: bool = False,
             frozen: tuple[int, ...] = (), need_x: bool = True, need_w: bool = False) -> None:
    """The layer's op through its Function (path ``path``) = the dense formula under autograd, float64: output,
    dx, d(base weight), d(bias) and every parameter's gradient; ``frozen``: parameter indices without grad."""
    base = layer.base_layer
    d_out = layer.weight_shape[0]
    mask = (torch.rand(d_out, generator=G) > 0.3).double() * 1.7 if masked else None
    params = list(layer._params())
    need = [i not in frozen for i in range(len(params))]
    ours = [p.detach().clone().requires_grad_(n) for p, n in zip(params, need)]
    theirs = [p.detach().clone().requires_grad_(n) for p, n in zip(params, need)]
    x = randn(*x_shape)
    xs, xr = x.clone().requires_grad_(need_x), x.clone().requires_grad_(need_x)
    w = base.weight.detach()
    ws, wr = w.clone().requires_grad_(need_w), w.clone().requires_grad_(need_w)
    b = base.bias.detach() if base.bias is not None else None
    bs = br = None if b is None else b.clone().requires_grad_()
    if isinstance(layer, LohaLayer):
        op_scale = scale if mask is None else mask * scale
    else:
        op_scale = (scale, mask)
    if path == "folded":
        y = folded_apply(xs, ws, bs, layer._fold_op, op_scale, *ours)
    elif isinstance(layer, LokrLayer) and layer.conv is None:  # a LoKr Linear's structured path: one Function
        y = KronLinearFunction.apply(xs, ws, bs, layer._geometry, layer._factors, *op_scale, *ours)
    else:
        y = structured_apply(xs, ws, bs, layer._op, op_scale, *ours)
    ref = base_op(layer, xr, wr + dense_delta(layer, theirs, scale, mask), br)
    assert rel_err(y, ref) < TOL
    dy = randn(*y.shape)
    y.backward(dy)
    ref.backward(dy)
    pairs = [(xs, xr)] * need_x + [(ws, wr)] * need_w + [(bs, br)] * (b is not None)
    pairs += [(o, t) for o, t, n in zip(ours, theirs, need) if n]
    for i, (o, t) in enumerate(pairs):
        assert o.grad is not None and rel_err(o.grad, t.grad) < TOL, i
    assert all(o.grad is None for o, n in zip(ours, need) if not n)


def loha(make, r=2, eff=False):
    torch.manual_seed(1)
    return LohaLayer(make().double(), r, 1.0, use_effective_conv2d=eff, init_weights=False)


def lokr(make, r=2, **kw):
    torch.manual_seed(1)
    return LokrLayer(make().double(), r, 1.0, init_weights=False, **kw)


LOHA = {
    "linear": (lambda: loha(lambda: nn.Linear(12, 20)), (3, 5, 12)),
    "linear-r2>d": (lambda: loha(lambda: nn.Linear(6, 5, bias=False), r=4), (7, 6)),
    "linear-1d-input": (lambda: loha(lambda: nn.Linear(7, 3), r=3), (7,)),
    "conv2d-k3-s2": (lambda: loha(lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1)), (2, 6, 9, 9)),
    "conv2d-k1": (lambda: loha(lambda: nn.Conv2d(6, 8, 1), r=3), (2, 6, 5, 4)),
    "conv1d-k3-dil": (lambda: loha(lambda: nn.Conv1d(5, 7, 3, padding=2, dilation=2), r=3), (2, 5, 11)),
    "tucker2d-k3-s2": (lambda: loha(lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), eff=True), (2, 6, 9, 9)),
    "tucker1d-k3": (lambda: loha(lambda: nn.Conv1d(6, 8, 3, stride=2), eff=True), (2, 6, 11)),
    "grouped": (lambda: loha(lambda: nn.Conv2d(6, 8, 3, groups=2)), (2, 6, 7, 7)),
}
LOKR = {
    "linear-auto": (lambda: lokr(lambda: nn.Linear(12, 20)), (3, 5, 12)),
    "linear-odd": (lambda: lokr(lambda: nn.Linear(15, 21, bias=False), r=1), (7, 15)),
    "linear-prime": (lambda: lokr(lambda: nn.Linear(7, 13), r=3), (4, 7)),
    "linear-factor4": (lambda: lokr(lambda: nn.Linear(24, 40), decompose_factor=4), (6, 24)),
    "linear-factor3-w1first": (lambda: lokr(lambda: nn.Linear(24, 36), decompose_factor=3), (5, 24)),
    "linear-decompose-both": (lambda: lokr(lambda: nn.Linear(64, 48), decompose_both=True), (5, 64)),
    "linear-full-w2": (lambda: lokr(lambda: nn.Linear(16, 16), r=8), (5, 16)),
    "conv2d-k3-s2": (lambda: lokr(lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1)), (2, 16, 9, 9)),
    "conv2d-k3-full": (lambda: lokr(lambda: nn.Conv2d(6, 8, 3, padding=1), r=4), (2, 6, 7, 7)),
    # a_out = 5 ≠ a_in = 3 (40 = 5·8, 12 = 3·4): the backward's adjoint route with unequal row groups
    "conv2d-uneven-dil": (lambda: lokr(lambda: nn.Conv2d(12, 40, 3, padding=2, dilation=2, stride=2)), (2, 12, 9, 8)),
    "conv2d-k1": (lambda: lokr(lambda: nn.Conv2d(16, 32, 1), use_effective_conv2d=True), (2, 16, 5, 4)),
    "conv2d-tucker-both": (lambda: lokr(lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), use_effective_conv2d=True,
                                        decompose_both=True), (2, 16, 9, 9)),
    "conv1d-lowrank": (lambda: lokr(lambda: nn.Conv1d(16, 32, 3, padding=1)), (2, 16, 11)),
    "conv1d-tucker-s2": (lambda: lokr(lambda: nn.Conv1d(16, 32, 5, stride=2), use_effective_conv2d=True), (2, 16, 13)),
    "conv1d-full-w2": (lambda: lokr(lambda: nn.Conv1d(4, 8, 3, padding=1), r=4), (2, 4, 9)),  # folded only
    "grouped": (lambda: lokr(lambda: nn.Conv2d(8, 12, 3, groups=2)), (2, 8, 6, 6)),  # folded only
}
CASES = [(f"loha-{k}", *v) for k, v in LOHA.items()] + [(f"lokr-{k}", *v) for k, v in LOKR.items()]


def test_lokr_cases_cover_both_contraction_orders():
    orders = {LOKR[k][0]()._geometry[4] for k in ("linear-auto", "linear-factor3-w1first")}
    assert orders == {"w1", "w2"}


@pytest.mark.parametrize("path", ["structured", "folded"])
@pytest.mark.parametrize("name,make,x_shape", CASES, ids=[c[0] for c in CASES])
def test_op_matches_dense_autograd(name, make, x_shape, path):
    layer = make()
    if path == "structured" and not layer.structured_ok:
        pytest.skip("folded only")
    check_op(layer, x_shape, path, need_w=True)


@pytest.mark.parametrize("path", ["structured", "folded"])
@pytest.mark.parametrize("name", ["loha-linear", "loha-conv2d-k3-s2", "loha-tucker2d-k3-s2", "lokr-linear-auto",
                                  "lokr-linear-factor3-w1first", "lokr-linear-decompose-both", "lokr-conv2d-k3-s2", "lokr-conv2d-uneven-dil",
                                  "lokr-conv2d-tucker-both"])
def test_op_scale_mask_and_partial_needs(name, path):
    _, make, x_shape = next(c for c in CASES if c[0] == name)
    check_op(make(), x_shape, path, scale=0.6, masked=True)
    check_op(make(), x_shape, path, scale=1.3, frozen=(0,), need_x=False)  # first factor frozen, x without grad
    n = len(make()._params())
    check_op(make(), x_shape, path, frozen=tuple(range(1, n)))  # only the first factor trains
    check_op(make(), x_shape, path, frozen=tuple(range(n)))  # only dx


@pytest.mark.parametrize("variant", ["recompute", "gram"])
def test_loha_linear_backward_variants(variant, monkeypatch):
    monkeypatch.setattr("slimtune.core.lowrank.choose_backward", lambda *args: variant)
    _, make, x_shape = next(c for c in CASES if c[0] == "loha-linear")
    check_op(make(), x_shape, "structured", scale=0.8, masked=True)


class GradModeRecorder(torch.overrides.TorchFunctionMode):
    """Records whether grad mode was on at each torch call."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.modes.append(torch.is_grad_enabled())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["structured", "folded"])
@pytest.mark.parametrize("name,make,x_shape", CASES, ids=[c[0] for c in CASES])
def test_backward_runs_no_autograd(name, make, x_shape, path, monkeypatch):
    """No nested autograd: backward never calls torch.autograd.grad and computes with grad mode off."""
    layer = make()
    layer.path = path
    x = randn(*x_shape).requires_grad_()
    y = layer(x)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.autograd.grad called inside backward")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    recorder = GradModeRecorder()
    grads = []
    y.grad_fn.register_prehook(lambda g: recorder.__enter__() and None)
    y.grad_fn.register_hook(lambda gi, go: recorder.__exit__(None, None, None) and None)
    y.backward(torch.ones_like(y))
    grads = [p.grad for p in layer._params()]
    assert recorder.modes and not any(recorder.modes)
    assert all(g is not None for g in grads) and x.grad is not None


@pytest.mark.parametrize("method", ["lokr", "loha"])
@pytest.mark.parametrize("d_in,d_out", [(64, 48), (1280, 320)])
def test_strided_output_gradient(method, d_in, d_out):
    """A UNet's time-embedding projection hands backward a transposed dy (strides (1, N)): the ops must not
    assume a contiguous one (SD-1.5 LoKr failed on it)."""
    import slimtune

    config = (slimtune.LokrConfig if method == "lokr" else slimtune.LohaConfig)(r=4, target_modules=["0"])
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    slimtune.adapt(model, config)
    perturb_adapters(model, seed=3)
    x = torch.randn(5, d_in, requires_grad=True, generator=torch.Generator().manual_seed(0))
    w = torch.randn(d_out, 5, generator=torch.Generator().manual_seed(1))
    (model(x).t().contiguous() * w).sum().backward()
    strided = x.grad.clone()
    x.grad = None
    (model(x) * w.t()).sum().backward()
    assert rel_err(strided, x.grad) < 1e-6
