"""DoRA chains on stacked rows (compiled layers): the Function against DoRA's definition in float64, and compiled
Llama layers with DoRA stacking their chains and training as the eager model does."""
from __future__ import annotations

import copy

import pytest
import torch

import slimtune
from slimtune.core import stacked_rows as sr
from slimtune.methods.dora import DoraLinear
from slimtune.methods.dora.norm import dora_linear_reference, magnitude_floor
from slimtune.methods.dora.stacked import StackedDoraFunction
from tests.core.test_stacked_rows import _steps, one_process_group  # noqa: F401 (a fixture)
from tests.helpers import BF16_TOL, FP32_TOL, backward_against_reference, perturb_adapters, rel_err

D_IN, OUTS, RANKS = 10, (7, 5, 5), (3, 2, 3)


def _chain(count: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """``(x, rows, weights, A's (views of rows), B's, magnitudes)`` of a chain of ``count`` members, from float64
    values: non-zero B's, magnitudes away from the norms (g ≠ 1); x, B's and magnitudes in float64 on ``device``,
    the rows (and the A's) in ``dtype`` there."""
    g = torch.Generator().manual_seed(seed)
    outs, ranks = OUTS[:count], RANKS[:count]
    x = torch.randn(2, 6, D_IN, generator=g, dtype=torch.float64)
    weights = [torch.randn(d, D_IN, generator=g, dtype=torch.float64) / D_IN ** 0.5 for d in outs]
    downs = [torch.randn(r, D_IN, generator=g, dtype=torch.float64) / D_IN ** 0.5 for r in ranks]
    ups = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip(outs, ranks)]
    mags = [w.norm(dim=1) * (1 + 0.3 * torch.rand(w.shape[0], generator=g, dtype=torch.float64)) for w in weights]
    rows = torch.cat(weights + downs).to(device, dtype)
    views, start = [], sum(outs)
    for r in ranks:
        views.append(torch.nn.Parameter(rows[start:start + r]))
        start += r
    on = lambda ts: [t.to(device) for t in ts]
    return x.to(device), rows, weights, downs, views, on(ups), on(mags)


def _apply(x, rows, downs, ups, mags, scaling):
    widths = tuple(u.shape[0] for u in ups)
    return StackedDoraFunction.apply(x, scaling, None, widths, magnitude_floor(x.dtype), *downs, *ups, *mags, rows)


@pytest.mark.parametrize("count", [1, 3])
def test_gradcheck_float64(count):
    """x and the magnitudes (A's and B's gradients treat the norm as a constant, DoRA §4.3: checked against the
    definition below); a chain of one takes its g and dB from dy (``stacked_rows._scaled_one``)."""
    x, rows, _, _, downs, ups, mags = _chain(count, torch.float64)
    leaves = [x.requires_grad_(), *(m.requires_grad_() for m in mags)]
    assert torch.autograd.gradcheck(lambda *_: _apply(x, rows, downs, ups, mags, 0.7), tuple(leaves))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 GEMMs with fp32 outputs)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_matches_each_member_by_definition(device, count, dtype, tol, x_grad):
    x64, _, w64, a64, _, b64, m64 = _chain(count, torch.float64)
    x, rows, _, _, downs, ups, mags = _chain(count, dtype, device=device)
    x, x64 = x.to(dtype).requires_grad_(x_grad), x64.requires_grad_(x_grad)
    params64 = [t.requires_grad_() for t in (*a64, *b64, *m64)]
    params = [t.float().requires_grad_() for t in (*ups, *mags)]  # fp32 master B's and magnitudes
    ref = [dora_linear_reference(x64, w, None, a, b, m, 1.3) for w, a, b, m in zip(w64, a64, b64, m64)]
    got = _apply(x, rows, downs, params[:count], params[count:], 1.3)
    backward_against_reference(list(got), ref, device, dtype, tol)
    for p, p64 in zip((*downs, *params), params64):
        assert p.grad is not None and rel_err(p.grad, p64.grad) < tol
    assert all(a.grad.dtype == dtype for a in downs) and all(p.grad.dtype == torch.float32 for p in params)
    assert (x.grad is None) if not x_grad else rel_err(x.grad, x64.grad) < tol
    assert rows.grad is None


def test_an_unused_output_gives_its_member_no_gradients_and_the_others_theirs():
    x64, _, w64, a64, _, b64, m64 = _chain(3, torch.float64)
    x, rows, _, _, downs, ups, mags = _chain(3, torch.float64)
    params = [t.requires_grad_() for t in (*ups, *mags)]
    params64 = [t.requires_grad_() for t in (*a64, *b64, *m64)]
    ref = [dora_linear_reference(x64, w, None, a, b, m, 0.5) for w, a, b, m in zip(w64, a64, b64, m64)]
    got = _apply(x, rows, downs, params[:3], params[3:], 0.5)
    (ref[0].sum() + ref[2].square().sum()).backward()
    (got[0].sum() + got[2].square().sum()).backward()
    for p, p64 in zip((*downs, *params), params64):
        assert (p.grad is None) if p64.grad is None else rel_err(p.grad, p64.grad) < FP32_TOL
    assert downs[1].grad is None and ups[1].grad is None and mags[1].grad is None


def test_a_fresh_chain_outputs_its_base_bit_for_bit():
    """B = 0 and m = ‖W‖ (rounded to the magnitude's dtype, as a fresh layer's): every output is x Wᵀ of the stacked
    GEMM exactly (g − 1 = 0), in bf16."""
    x, rows, weights, _, downs, ups, _ = _chain(3, torch.bfloat16)
    x = x.to(torch.bfloat16)
    ups = [torch.zeros_like(u, dtype=torch.bfloat16) for u in ups]
    mags = [w.to(torch.bfloat16).float().norm(dim=1).to(torch.bfloat16) for w in weights]
    got = _apply(x, rows, downs, ups, mags, 2.0)
    base = torch.nn.functional.linear(x.reshape(-1, D_IN), rows)
    for y, b in zip(got, base[:, :sum(OUTS)].split(OUTS, dim=1)):
        assert torch.equal(y.reshape(-1, y.shape[-1]), b)


def test_compiles_without_a_graph_break():
    x, rows, _, _, downs, ups, mags = _chain(3, torch.float32)
    x = x.float()
    params = [t.float().requires_grad_() for t in (*ups, *mags)]
    torch.compiler.reset()
    f = torch.compile(lambda t: sum(y.square().sum() for y in _apply(t, rows, downs, params[:3], params[3:], 0.5)),
                      fullgraph=True, backend="aot_eager")
    f(x).backward()
    want = [p.grad.clone() for p in (*downs, *params)]
    for p in (*downs, *params):
        p.grad = None
    sum(y.square().sum() for y in _apply(x, rows, downs, params[:3], params[3:], 0.5)).backward()
    assert all(rel_err(p.grad, w) < FP32_TOL for p, w in zip((*downs, *params), want))


# -- compiled Llama layers with DoRA --------------------------------------------------------------------------
def _llama(layers: int = 2, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2)
    model = slimtune.adapt(transformers.LlamaForCausalLM(llama), slimtune.LoraConfig(
        r=2, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], **config))
    perturb_adapters(model)
    with torch.no_grad():  # magnitudes away from the norms: g ≠ 1
        for m in model.modules():
            if isinstance(m, DoraLinear):
                m.magnitude.mul_(1 + 0.2 * torch.rand_like(m.magnitude))
    return model


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compiled_pair(layers: int = 2, backend: str = "aot_eager", **config):
    from slimtune.models.layers import compile_layers

    eager = _llama(layers, **config)
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    compile_layers(model, backend=backend)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    return eager, model, ids


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dora_layers_stack_their_chains_and_step_as_eager(backend):
    eager, model, ids = _compiled_pair(backend=backend)
    calls = {"n": 0}
    original = StackedDoraFunction.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    for step in range(3):  # the first learns the chains eagerly, the next stack them and run compiled
        loss, grads = _grads(model, ids)
        loss_ref, grads_ref = _grads(eager, ids)
        assert rel_err(loss, loss_ref) < FP32_TOL
        assert grads.keys() == grads_ref.keys()
        assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads), step
        for optimizer_model in (model, eager):
            with torch.no_grad():
                for p in optimizer_model.parameters():
                    if p.grad is not None:
                        p.sub_(0.05 * p.grad)
    heads = [m for m in model.modules() if sr.MEMBERS in m.__dict__]
    assert len(heads) == 2 * 4  # q/k/v, o, gate/up, down in each layer: stacked as rows (never wide)
    gate_up = sr.stacked_rows(model.model.layers[0].mlp.gate_proj, 2)
    assert gate_up is not None and gate_up.dim() == 2
    torch.compiler.reset()  # traced again: the stacked Function is what the graph holds
    StackedDoraFunction.forward = staticmethod(counted)
    try:
        _grads(model, ids)
    finally:
        StackedDoraFunction.forward = staticmethod(original)
    # q/k/v, o, gate/up, down in each of the two graphs (the first layer's input needs no gradient, the second's does)
    assert calls["n"] == 8


def test_a_layer_with_biases_is_not_stacked_and_still_steps_as_eager():
    """Biased projections (a Llama with ``attention_bias``) keep z: their chains run the grouped Function compiled,
    and nothing is stacked."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                     mlp_bias=True)
    from slimtune.models.layers import compile_layers

    eager = slimtune.adapt(transformers.LlamaForCausalLM(llama), slimtune.LoraConfig(
        r=2, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]))
    perturb_adapters(eager)
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    compile_layers(model, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss, grads = _grads(model, ids)
        loss_ref, grads_ref = _grads(eager, ids)
        assert rel_err(loss, loss_ref) < FP32_TOL
        assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads)
    assert not any(sr.MEMBERS in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("wrapper", ["DDP", "FSDP2"])
def test_compiled_dora_under_a_process_group_steps_as_eager(one_process_group, wrapper):
    """DDP keeps the stacks (rows, as LoRA's); FSDP2 around the model leaves every chain unstacked
    (:func:`~slimtune.core.stacked_rows.sharded`). Both step as the eager model does (a gloo group of one process)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    eager, model, ids = _compiled_pair(layers=1)
    wrapped = DistributedDataParallel(model) if wrapper == "DDP" else fully_shard(model)
    losses = _steps(wrapped, ids, 4)
    heads = [m for m in model.modules() if sr.MEMBERS in m.__dict__]
    assert len(heads) == (4 if wrapper == "DDP" else 0)
    want = _steps(eager, ids, 4)
    assert all(rel_err(torch.tensor(g), torch.tensor(w)) < FP32_TOL for g, w in zip(losses, want)), (losses, want)
