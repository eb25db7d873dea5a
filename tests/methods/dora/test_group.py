"""DoRA siblings as one Function (``methods/dora/group.py``): the Function against each member's DoRA by its definition,
and a DoRA Llama that trains fused as it trains with every layer alone — every route, mixed routes, the layers that
must stay alone (a bias: the ``"z"`` route)."""
import pytest
import torch
from torch import nn

import slimtune
from slimtune.core.siblings import ACTIVE, OFF, set_sibling_fusion
from slimtune.methods.dora import DoraLinear
from slimtune.methods.dora.group import grouped_dora_linear
from slimtune.methods.dora.norm import dora_linear_reference, magnitude_floor, weight_row_norm_sq
from tests.core.test_siblings import _assert_same_training, _fusion_on, _llama as _lora_llama, _train  # noqa: F401
from tests.helpers import BF16_TOL, FP32_TOL, backward_against_reference, perturb_adapters, rel_err

OUTS, RANKS = (7, 5, 5), (3, 2, 3)


def _members(dtype=torch.float64, seed=0):
    """x [2, 6, 10] and per member W, A, B (non-zero), m (away from the norms: g ≠ 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    weights = [torch.randn(d, 10, generator=g, dtype=torch.float64) / 10 ** 0.5 for d in OUTS]
    downs = [torch.randn(r, 10, generator=g, dtype=torch.float64) / 10 ** 0.5 for r in RANKS]
    ups = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip(OUTS, RANKS)]
    mags = [w.norm(dim=1) * (1 + 0.3 * torch.rand(w.shape[0], generator=g, dtype=torch.float64)) for w in weights]
    conv = lambda ts: [t.to(dtype) for t in ts]
    return x.to(dtype), conv(weights), conv(downs), conv(ups), conv(mags)


def _grouped(x, weights, downs, ups, mags, scaling, routes, squares=None):
    floors = [magnitude_floor(x.dtype) if r == "output" else 0.0 for r in routes]
    return grouped_dora_linear(x, weights, [None] * len(weights), downs, ups, mags,
                               squares or [None] * len(weights), scaling, routes, floors)


ROUTES = [("output", "output", "output"), ("recompute", "recompute", "output"), ("recompute", None, "output")]


@pytest.mark.parametrize("routes", ROUTES)
def test_gradcheck_float64(routes):
    """x and m (the norm does not depend on them; A's and B's gradients treat the norm as a constant, DoRA §4.3, so
    they are checked against the definition below instead)."""
    x, weights, downs, ups, mags = _members()
    leaves = [x, *(m for m, r in zip(mags, routes) if r is not None)]
    for t in leaves:
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *_: _grouped(x, weights, downs, ups, mags, 0.7, routes), tuple(leaves))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("routes", ROUTES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_matches_each_member_by_definition(device, routes, dtype, tol):
    x64, w64, a64, b64, m64 = _members()
    x, weights, downs, ups, mags = ([t.to(device) for t in ts] if isinstance(ts, list) else ts.to(device)
                                    for ts in _members(dtype))
    x64.requires_grad_()
    x.requires_grad_()
    params64 = [*a64, *b64, *m64]
    params = [t.float() for t in (*downs, *ups, *mags)]  # fp32 master adapters
    for t in (*params64, *params):
        t.requires_grad_()
    n = len(OUTS)
    ref = [dora_linear_reference(x64, w, None, a, b, m, 1.3) for w, a, b, m in zip(w64, *(
        params64[k * n:(k + 1) * n] for k in range(3)))]
    got = _grouped(x, weights, params[:n], params[n:2 * n], params[2 * n:], 1.3, routes)
    backward_against_reference(got, ref, device, dtype, tol)
    assert rel_err(x.grad, x64.grad) < tol
    for i, (p, p64) in enumerate(zip(params, params64)):
        if i >= 2 * n and routes[i - 2 * n] is None:  # a frozen magnitude's route: no dm
            assert p.grad is None
            continue
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, p64.grad) < tol


def test_cached_norms_and_an_unused_output():
    x, weights, downs, ups, mags = _members()
    x.requires_grad_()
    for t in (*downs, *ups, *mags):
        t.requires_grad_()
    squares = [weight_row_norm_sq(w) for w in weights]
    routes = ("recompute", "output", "output")
    ys = _grouped(x, weights, downs, ups, mags, 0.5, routes, squares)
    (ys[0].sum() + ys[2].square().sum()).backward()
    assert downs[1].grad is None and ups[1].grad is None and mags[1].grad is None
    refs = [[t.detach().clone().requires_grad_() for t in ts] for ts in (downs, ups, mags)]
    x_ref = x.detach().clone().requires_grad_()
    ref = [dora_linear_reference(x_ref, w, None, a, b, m, 0.5) for w, a, b, m in zip(weights, *refs)]
    (ref[0].sum() + ref[2].square().sum()).backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-10
    for k, got in enumerate((downs, ups, mags)):
        for i in (0, 2):
            assert rel_err(got[i].grad, refs[k][i].grad) < 1e-10


def test_saves_what_the_members_save_alone():
    x, weights, downs, ups, mags = _members(torch.float32)
    x.requires_grad_()
    for t in (*downs, *ups, *mags):
        t.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = _grouped(x, weights, downs, ups, mags, 1.0, ("recompute", "recompute", "output"))
    big = [t for t in saved if t.shape[:-1] == x.shape[:-1]]  # [.., N, d] tensors: x once and v's output
    assert len(big) == 2 and any(t is x for t in big) and any(t is ys[2] for t in big)


def test_refuses_mixed_or_unknown_routes():
    x, weights, downs, ups, mags = _members()
    with pytest.raises(ValueError, match="routes"):
        _grouped(x, weights, downs, ups, mags, 1.0, ("output", "z", "output"))
    with pytest.raises(ValueError, match="one weight"):
        _grouped(x, weights[:2], downs, ups, mags, 1.0, ("output",) * 3)


# -- the model: siblings learnt, then trained as alone ------------------------------------------------------------
def _llama(dtype=torch.float64, **config):
    return _lora_llama(dtype, use_dora=True, **config)


def _grad_nodes(model):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(type(out.grad_fn).__name__))
             for m in model.modules() if isinstance(m, DoraLinear)]
    model(input_ids=torch.randint(0, 128, (1, 5))).logits.sum().backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return seen


@pytest.mark.parametrize("recompute", ["auto", True, False, ["k_proj", "up_proj"]])
def test_llama_dora_trains_fused_as_alone(recompute):
    model = _llama(dora_recompute=recompute)
    fused = _train(model, steps=4)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.siblings.state == ACTIVE and mlp.gate_proj.siblings.state == ACTIVE
    assert attn.q_proj.siblings.chains == {attn.q_proj: (attn.q_proj, attn.k_proj, attn.v_proj)}
    nodes = _grad_nodes(model)
    assert nodes.count("GroupedDoraFunctionBackward") == 2 * 5  # q, k, v, gate, up of 2 layers
    set_sibling_fusion(False)
    _assert_same_training(fused, _train(_llama(dora_recompute=recompute), steps=4))


def test_a_frozen_magnitude_joins_the_group():
    model = _llama(dora_recompute=False)
    for layer in model.model.layers:
        layer.self_attn.k_proj.magnitude.requires_grad_(False)
    fused = _train(model)
    assert "GroupedDoraFunctionBackward" in _grad_nodes(model)
    set_sibling_fusion(False)
    ref = _llama(dora_recompute=False)
    for layer in ref.model.layers:
        layer.self_attn.k_proj.magnitude.requires_grad_(False)
    _assert_same_training(fused, _train(ref))


class _BiasedQkv(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def test_biased_layers_keep_z_and_run_alone():
    torch.manual_seed(0)
    model = slimtune.adapt(nn.Sequential(_BiasedQkv()).double(),
                           slimtune.LoraConfig(r=2, use_dora=True, target_modules=["q", "k", "v"]))
    perturb_adapters(model, seed=2)
    x = torch.randn(3, 6, dtype=torch.float64)
    for _ in range(3):
        model(x).sum().backward()
    group = model[0].q.siblings
    assert group.state in (ACTIVE, OFF)
    y = model(x)
    assert y.grad_fn is not None and "Grouped" not in type(model[0].q(x).grad_fn).__name__


def test_no_grad_forward_equals_alone():
    model = _llama()
    _train(model, steps=2)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        set_sibling_fusion(False)
        alone = model(input_ids=ids).logits
    assert rel_err(fused, alone) < 1e-12


def test_under_autocast_the_group_runs_in_the_autocast_dtype():
    model = _llama(torch.float32, dora_recompute=["k_proj"])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    step()
    fused = step()
    assert "GroupedDoraFunctionBackward" in _grad_nodes(model)
    set_sibling_fusion(False)
    alone = step()
    assert rel_err(fused[0], alone[0]) < BF16_TOL
    for g, g_ref in zip(fused[1], alone[1]):
        assert rel_err(g, g_ref) < 5 * BF16_TOL  # bf16 GEMMs summed in another order
