"""HRA: low-rank WY application vs the dense reflection product, PEFT agreement, merge, regulariser."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune
from slimtune.methods.hra import HraConfig, HraLayer, orthogonality_loss
from slimtune.methods.hra.math import hra_dense_transform, orthogonality_penalty, wy_factors
from tests.helpers import BF16_TOL, FP32_TOL, check_merge_round_trip, perturb_adapters, rel_err


def _reference(layer: nn.Module, u: torch.Tensor, x: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    w = layer.weight.double()
    h = hra_dense_transform(u, apply_gs)
    w_h = (w.reshape(w.shape[0], -1) @ h).view_as(w)
    bias = layer.bias.double() if layer.bias is not None else None
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w_h, bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, w_h, bias)


def _layers():
    return [("linear", lambda: nn.Linear(48, 24), (3, 5, 48)),
            ("conv", lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 9, 9))]


@pytest.mark.parametrize("kind,make,shape", _layers())
@pytest.mark.parametrize("r", [1, 2, 7, 32])
@pytest.mark.parametrize("apply_gs", [False, True])
def test_output_and_gradients_match_dense_reference_float64(kind, make, shape, r, apply_gs):
    torch.manual_seed(r)
    layer = make().double()
    hra = HraLayer(layer, r, apply_GS=apply_gs, init_weights=False)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = hra(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().clone().requires_grad_()
    u64 = hra.hra_u.detach().clone().requires_grad_()
    ref = _reference(layer, u64, x64, apply_gs)
    ref.backward(dy)
    assert rel_err(y, ref) < 1e-10
    assert rel_err(x.grad, x64.grad) < 1e-10
    assert rel_err(hra.hra_u.grad, u64.grad) < 1e-9


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_low_precision_against_float64(dtype, tol):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    hra = HraLayer(layer, 8, init_weights=False).to(dtype)
    x = torch.randn(4, 64)
    y = hra(x.to(dtype))
    ref = _reference(layer.double(), hra.hra_u.detach().double(), x.double(), False)
    assert y.dtype == dtype and rel_err(y, ref) < tol


def test_even_rank_init_is_identity_and_odd_warns():
    layer = nn.Linear(16, 8)
    hra = HraLayer(layer, 4)
    x = torch.randn(3, 16)
    assert rel_err(hra(x), layer(x)) < 1e-6
    with pytest.warns(UserWarning, match="even r"):
        HraLayer(layer, 3)


def test_wy_factors_are_exact():
    u = torch.randn(20, 6, dtype=torch.float64)
    for gs in (False, True):
        unit, t = wy_factors(u, gs)
        h = torch.eye(20, dtype=torch.float64) - unit @ t @ unit.t()
        assert (h - hra_dense_transform(u, gs)).abs().max() < 1e-12
        assert (h @ h.t() - torch.eye(20, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("kind,make,shape", _layers())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(kind, make, shape, dtype):
    torch.manual_seed(0)
    layer = make().to(dtype)
    check_merge_round_trip(HraLayer(layer, 5, init_weights=False), torch.randn(shape).to(dtype))


def test_matches_peft_hra_on_the_same_weights():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 16)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, img):
            return self.fc(x), self.conv(img)

    for apply_gs in (False, True):
        torch.manual_seed(0)
        base = Net()
        ours = Net()
        ours.load_state_dict(base.state_dict())
        theirs = peft.get_peft_model(base, peft.HRAConfig(r=6, target_modules=["fc", "conv"], apply_GS=apply_gs,
                                                          init_weights=False))
        slimtune.adapt(ours, HraConfig(r=6, target_modules=["fc", "conv"], apply_GS=apply_gs))
        with torch.no_grad():
            for name in ("fc", "conv"):
                getattr(ours, name).hra_u.copy_(theirs.base_model.model.get_submodule(name).hra_u["default"])
        x, img = torch.randn(5, 32), torch.randn(2, 3, 8, 8)
        for got, want in zip(ours(x, img), theirs(x, img)):
            assert rel_err(got, want) < FP32_TOL


def test_orthogonality_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    slimtune.adapt(net, HraConfig(r=4, target_modules=["0", "1"], orth_reg_weight=0.5, init_weights=False))
    loss = orthogonality_loss(net)
    expected = 0.5 * sum(orthogonality_penalty(m.hra_u) for m in (net[0], net[1]))
    assert torch.allclose(loss, expected) and loss > 0
    loss.backward()
    assert net[0].hra_u.grad is not None
    q, _ = torch.linalg.qr(torch.randn(16, 4))
    assert orthogonality_penalty(q) < 1e-10


def test_bad_targets_and_values():
    with pytest.raises(slimtune.TargetError, match="groups"):
        slimtune.adapt(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), HraConfig(target_modules=["0"], r=2))
    with pytest.raises(slimtune.TargetError, match="Conv1d"):
        slimtune.adapt(nn.Sequential(nn.Conv1d(4, 4, 3)), HraConfig(target_modules=["0"], r=2))
    with pytest.raises(slimtune.ConfigError, match="exceeds"):
        slimtune.adapt(nn.Sequential(nn.Linear(4, 4)), HraConfig(target_modules=["0"], r=6))
    with pytest.raises(slimtune.ConfigError, match="orth_reg_weight"):
        HraConfig(target_modules=["0"], orth_reg_weight=-1)
    with pytest.raises(slimtune.ConfigError, match="adapter_dtype"):
        HraConfig(target_modules=["0"], adapter_dtype=torch.int8)


# -- factors shared across layers (slimtune.methods.hra.factors) ----------------------------------------------------
class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.d = nn.Linear(8, 16)

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


def _hra_stack(dtype=torch.float64, apply_gs=False):
    torch.manual_seed(0)
    model = Stack().to(dtype)
    slimtune.adapt(model, HraConfig(r=4, target_modules=["a", "b", "c", "d"], apply_GS=apply_gs, init_weights=False))
    return model


@pytest.mark.parametrize("apply_gs", [False, True])
def test_batched_factors_equal_per_layer_factors(apply_gs):
    model = _hra_stack(apply_gs=apply_gs)
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x).sum().backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    y = model(x).detach()
    for m in model.modules():
        if isinstance(m, HraLayer):
            m.factor_cache, m.hra_u.grad = None, None
    assert rel_err(model(x), y) < 1e-12
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, batched[n]) < 1e-10, n


def test_factors_are_computed_once_per_pass_per_group(monkeypatch):
    from slimtune.methods.hra import factors as kernels

    calls = []
    real = kernels.batched_wy_factors
    monkeypatch.setattr(kernels, "batched_wy_factors", lambda u, gs: calls.append(u.shape) or real(u, gs))
    model = _hra_stack()
    model(torch.randn(2, 16, dtype=torch.float64))
    assert sorted(calls) == [(1, 8, 4), (3, 16, 4)]  # a, b, c share [16, 4]; d has [8, 4]
    model(torch.randn(2, 16, dtype=torch.float64))
    assert len(calls) == 4  # a new pass recomputes


def test_changed_u_is_never_served_stale_and_accumulation_works():
    model = _hra_stack()
    x = torch.randn(3, 16, dtype=torch.float64)
    model(x).sum().backward()
    model(x).sum().backward()  # gradient accumulation: a second pass, a second graph
    opt = torch.optim.SGD(slimtune.trainable_parameters(model), lr=0.5)
    before = model.a(x).detach()
    opt.step()  # changes hra_u in place: its version counter moves
    after = model.a(x)  # called directly: no root pre-hook, the version check must catch it
    ref = _reference(model.a.base_layer, model.a.hra_u.detach(), x, False)
    assert rel_err(after, ref) < 1e-12 and rel_err(after, before) > 1e-6
    with torch.no_grad():
        model(x)
    model(x).sum().backward()  # factors cached under no_grad are not reused with grad
    assert model.a.hra_u.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """The per-pass factor cache is formed in the root pre-hook, so a checkpointed layer's recomputation sees
    the same factors (non-reentrant), or builds a private graph inside backward (reentrant)."""
    from tests.toy_models import tiny_llama

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        slimtune.adapt(model, HraConfig(r=4, target_modules="all-linear"))
        perturb_adapters(model, seed=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    assert rel_err(grads[1], grads[0]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cached", [True, False])
def test_fresh_layer_computes_its_base_bit_for_bit_and_still_learns(dtype, cached):
    """PEFT's symmetric init cancels the reflections in pairs: the output is the base model's exactly (the WY
    form's roundoff residue is removed), while the gradient is the exact product's, so training leaves the identity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24, bias=False)).to(dtype)
    x = torch.randn(5, 32, dtype=dtype)
    with torch.no_grad():
        base = model(x)
    slimtune.adapt(model, HraConfig(r=4, target_modules=["0"]))
    if not cached:
        model[0].factor_cache = None
    y = model(x)
    assert torch.equal(y, base)
    dy = torch.randn_like(y)
    y.backward(dy)
    u = model[0].hra_u.detach().double().requires_grad_(True)
    w = model[0].base_layer.weight.detach().double()
    ref = x.double() @ (w @ hra_dense_transform(u)).t()
    ref.backward(dy.double())
    assert rel_err(model[0].hra_u.grad, u.grad) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    assert model[0].hra_u.grad.abs().sum() > 0
    with torch.no_grad():
        model[0].hra_u[:, 0].mul_(1.5)  # the pairs no longer cancel: the full product runs
    assert not torch.equal(model(x), base)
