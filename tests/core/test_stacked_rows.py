"""Stacked rows (a LoRA chain's frozen weights and A's in one buffer): the Function against float64 references, and
the stacks ``compile_layers`` keeps — equal steps, moved models stacked again, plain models and copies unshared."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch

import slimtune
from slimtune.core import stacked_rows as sr
from slimtune.core.lowrank_group import grouped_lowrank_reference
from tests.helpers import BF16_TOL, FP32_TOL, backward_against_reference, perturb_adapters, rel_err

D_IN, OUTS, RANKS = 10, (7, 5, 5), (3, 2, 3)


def _chain(count: int, dtype: torch.dtype, seed: int = 0):
    """``(x, rows, weights, A's (parameters, views of rows), B's)`` of a chain of ``count`` members; float64 values."""
    g = torch.Generator().manual_seed(seed)
    outs, ranks = OUTS[:count], RANKS[:count]
    x = torch.randn(2, 6, D_IN, generator=g, dtype=torch.float64)
    weights = [torch.randn(d, D_IN, generator=g, dtype=torch.float64) / D_IN ** 0.5 for d in outs]
    downs = [torch.randn(r, D_IN, generator=g, dtype=torch.float64) / D_IN ** 0.5 for r in ranks]
    ups = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip(outs, ranks)]  # non-zero B
    rows = torch.cat(weights + downs).to(dtype)
    params, start = [], sum(outs)
    for r in ranks:
        p = torch.nn.Parameter(torch.empty(0, dtype=dtype))
        p.data = rows[start:start + r]
        params.append(p)
        start += r
    return x, rows, weights, downs, params, ups


def _apply(x, rows, downs, ups, scaling, widths):
    return sr.StackedLowRankFunction.apply(x, scaling, None, tuple(widths), *downs, *ups, rows)


def test_gradcheck_float64():
    x, rows, _, _, downs, ups = _chain(3, torch.float64)
    x.requires_grad_()
    ups = [u.requires_grad_() for u in ups]

    def f(*_):
        return _apply(x, rows, downs, ups, 0.7, OUTS)

    assert torch.autograd.gradcheck(f, (x, *downs, *ups))


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_matches_float64_reference(count, dtype, tol, x_grad):
    x64, _, weights, downs64, _, ups64 = _chain(count, torch.float64)
    x, rows, _, _, downs, ups = _chain(count, dtype)
    x = x.to(dtype).requires_grad_(x_grad)
    x64.requires_grad_(x_grad)
    ups = [u.float().requires_grad_() for u in ups]  # fp32 master B's
    leaves64 = [t.requires_grad_() for t in (*downs64, *ups64)]
    ref = grouped_lowrank_reference(x64, weights, [None] * count, downs64, ups64, 1.3)
    got = _apply(x, rows, downs, ups, 1.3, OUTS[:count])
    backward_against_reference(list(got), list(ref), "cpu", dtype, tol)
    for p, p64 in zip((*downs, *ups), leaves64):
        assert p.grad is not None and rel_err(p.grad, p64.grad) < tol
    assert all(a.grad.dtype == dtype for a in downs) and all(b.grad.dtype == torch.float32 for b in ups)
    assert (x.grad is None) if not x_grad else rel_err(x.grad, x64.grad) < tol
    assert rows.grad is None


def test_an_unused_output_gives_its_member_no_gradients_and_the_others_theirs():
    x64, _, weights, downs64, _, ups64 = _chain(3, torch.float64)
    x, rows, _, _, downs, ups = _chain(3, torch.float64)
    ups = [u.requires_grad_() for u in ups]
    for t in (*downs64, *ups64):
        t.requires_grad_()
    ref = grouped_lowrank_reference(x64, weights, [None] * 3, downs64, ups64, 0.5)
    got = _apply(x, rows, downs, ups, 0.5, OUTS)
    (ref[0].sum() + ref[2].square().sum()).backward()
    (got[0].sum() + got[2].square().sum()).backward()
    for p, p64 in zip((*downs, *ups), (*downs64, *ups64)):
        assert (p.grad is None) if p64.grad is None else rel_err(p.grad, p64.grad) < FP32_TOL
    assert downs[1].grad is None and ups[1].grad is None


def test_compiles_without_a_graph_break():
    x, rows, _, _, downs, ups = _chain(3, torch.float32)
    x, ups = x.float(), [u.float().requires_grad_() for u in ups]
    torch.compiler.reset()
    f = torch.compile(lambda t: sum(y.sum() for y in _apply(t, rows, downs, ups, 0.5, OUTS)), fullgraph=True,
                      backend="aot_eager")
    f(x).backward()
    want = [p.grad.clone() for p in (*downs, *ups)]
    for p in (*downs, *ups):
        p.grad = None
    sum(y.sum() for y in _apply(x, rows, downs, ups, 0.5, OUTS)).backward()
    assert all(rel_err(p.grad, w) < FP32_TOL for p, w in zip((*downs, *ups), want))


# -- the stacks compile_layers keeps -----------------------------------------------------------------------------
_RANK = {"r": 2}


@pytest.fixture(autouse=True, params=[2, 8], ids=["rank 2", "rank 8, gate/up wide"])
def _lora_rank(request):
    """Every model test runs with rank 2 (every chain stacked as rows) and rank 8 (gate/up stacked wide:
    :mod:`slimtune.core.wide_rows`)."""
    _RANK["r"] = request.param
    yield
    _RANK["r"] = 2


def _llama(layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = slimtune.adapt(transformers.LlamaForCausalLM(config), slimtune.LoraConfig(
        r=_RANK["r"], target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    perturb_adapters(model)
    return model


def _heads(model):
    return [m for m in model.modules() if sr.MEMBERS in m.__dict__]


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compiled_pair(layers: int = 2):
    from slimtune.models.layers import compile_layers

    eager = _llama(layers)
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    compile_layers(model, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    _grads(model, ids)  # the first step learns the chains, eagerly
    _grads(model, ids)  # the second stacks them and runs compiled
    assert _heads(model)
    return eager, model, ids


def test_compiled_layers_stack_their_chains_and_step_as_before():
    eager, model, ids = _compiled_pair()
    names = {id(p): n for n, p in model.named_parameters()}
    loss, grads = _grads(model, ids)
    heads = _heads(model)
    assert len(heads) == 2 * 4  # q/k/v, o, gate/up, down in each layer
    gate_up = sr.stacked_rows(model.model.layers[0].mlp.gate_proj, 2)
    assert gate_up is not None and (gate_up.dim() == 1) == (_RANK["r"] == 8)  # stacked wide where aligned
    attention = model.model.layers[0].self_attn
    rows = sr.stacked_rows(attention.q_proj, 3)
    assert rows is not None and rows.shape == (32 + 16 + 16 + 3 * _RANK["r"], 32)
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert proj.base_layer.weight.untyped_storage() is rows.untyped_storage()
        assert proj.lora_A.untyped_storage() is rows.untyped_storage()
    assert {id(p): n for n, p in model.named_parameters()} == names  # the same parameters, the same names
    assert sr.ROWS not in model.state_dict() and not any(sr.ROWS in k for k in model.state_dict())
    loss_ref, grads_ref = _grads(eager, ids)
    assert rel_err(loss, loss_ref) < FP32_TOL
    assert grads.keys() == grads_ref.keys()
    assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads)


def test_an_optimizer_step_reaches_the_rows():
    _, model, ids = _compiled_pair(1)
    _grads(model, ids)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_A.add_(1.0)  # as an optimizer's in-place update
    rows = sr.stacked_rows(q, 3)
    assert torch.equal(rows[64:64 + _RANK["r"]], q.lora_A)


def test_a_moved_model_is_stacked_again():
    eager, model, ids = _compiled_pair(1)
    left = [weakref.ref(h.__dict__[sr.ROWS]) for h in _heads(model)]
    for m in (model, eager):
        m.double()
        perturb_adapters(m, seed=7)  # new A's, which rows left behind by .to() would not see
    assert _heads(model) and not any(sr.intact(h) for h in _heads(model))  # .to(): a storage for every tensor
    loss, grads = _grads(model, ids)
    assert _heads(model) and all(sr.intact(h) for h in _heads(model))
    assert all(ref() is None for ref in left)  # the rows left behind are freed once stacked again
    loss_ref, grads_ref = _grads(eager, ids)
    assert rel_err(loss, loss_ref) < FP32_TOL
    assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads)


def test_adapters_loaded_by_assignment_are_stacked_again():
    eager, model, ids = _compiled_pair(1)
    perturb_adapters(eager, seed=5)
    fresh = {k: v.clone() for k, v in eager.state_dict().items() if "lora_" in k}
    model.load_state_dict(fresh, strict=False, assign=True)
    loss, _ = _grads(model, ids)
    assert rel_err(loss, _grads(eager, ids)[0]) < FP32_TOL


def test_registrations_are_counted():
    """:func:`~slimtune.core.stacked_rows.intact` reads a stack's members through their modules again only after
    some module registered a parameter or a base layer: torch's global registration hooks must see both kinds of
    assignment. Other submodules (a ModuleList sliced each forward) are not counted."""
    linear = torch.nn.Linear(3, 3)
    before = sr._Registrations.count
    linear.weight = torch.nn.Parameter(torch.zeros(3, 3))
    assert sr._Registrations.count == before + 1
    holder = torch.nn.Module()
    holder.base_layer = linear
    assert sr._Registrations.count == before + 2
    holder.inner = linear
    torch.nn.ModuleList([holder, linear])[:1]
    assert sr._Registrations.count == before + 2


def test_a_compiled_step_reads_no_member_through_its_module():
    """In a steady compiled step no stack goes back to its modules: every check uses the tensors it noted (the
    registration count stands still through transformers' forward)."""
    _, model, ids = _compiled_pair(1)
    _grads(model, ids)
    count = sr._Registrations.count
    heads = _heads(model)
    held = [h.__dict__[sr.MEMBERS].held for h in heads]
    _grads(model, ids)
    assert sr._Registrations.count == count and _heads(model) == heads
    assert all(h.__dict__[sr.MEMBERS].held is noted is not None for h, noted in zip(heads, held))


@pytest.mark.parametrize("replace", ["weight", "base_layer"])
def test_a_frozen_weight_given_by_assignment_is_used(replace):
    """A member's frozen weight replaced after stacking, as a new parameter or with its base layer: the compiled
    step computes with the new weight (its member leaves the stack: it no longer holds the weight noted)."""
    eager, model, ids = _compiled_pair(1)
    _, stale = _grads(model, ids)
    for m in (eager, model):
        q = m.model.layers[0].self_attn.q_proj
        new = 30 * torch.randn_like(q.base_layer.weight, generator=torch.Generator().manual_seed(4))
        if replace == "weight":
            q.base_layer.weight = torch.nn.Parameter(new, requires_grad=False)
        else:
            q.base_layer = torch.nn.Linear(32, 32, bias=False).requires_grad_(False)
            with torch.no_grad():
                q.base_layer.weight.copy_(new)
    loss, grads = _grads(model, ids)
    loss_ref, grads_ref = _grads(eager, ids)
    assert rel_err(loss, loss_ref) < FP32_TOL
    assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads_ref)
    assert max(rel_err(grads[n], stale[n]) for n in grads) > 0.1  # not the gradients of the rows' stale W_q
    assert sr.stacked_rows(model.model.layers[0].self_attn.q_proj, 3) is None


def test_unloading_gives_every_weight_its_own_storage():
    _, model, ids = _compiled_pair(1)
    _grads(model, ids)
    assert _heads(model)
    plain = slimtune.unload(model)
    assert not _heads(plain)
    for p in plain.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_a_saved_stacked_adapter_loads_back(tmp_path):
    _, model, ids = _compiled_pair(1)
    _grads(model, ids)
    slimtune.save_adapter(model, tmp_path / "adapter")
    other = _llama(1)
    slimtune.load_adapter(other, tmp_path / "adapter")
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_a_copy_of_a_stacked_model_is_not_stacked():
    eager, model, ids = _compiled_pair(1)
    _grads(model, ids)
    twin = copy.deepcopy(model)
    q = twin.model.layers[0].self_attn.q_proj
    assert sr.stacked_rows(q, 3) is None and not sr.intact(q)
    with torch.no_grad():
        q.lora_A.add_(1.0)  # the copy's own parameters, no stale rows behind them
        eager.model.layers[0].self_attn.q_proj.lora_A.add_(1.0)
    x = torch.randn(1, 3, 32)
    assert torch.allclose(q(x), eager.model.layers[0].self_attn.q_proj(x), atol=1e-5)


def test_what_cannot_be_stacked_is_left_as_it_is():
    model = _llama(1)
    attention = model.model.layers[0].self_attn
    chain = (attention.q_proj, attention.k_proj, attention.v_proj)
    attention.k_proj.lora_A.data = attention.k_proj.lora_A.data.double()  # A's of another dtype than the weights
    assert not sr.stackable(chain) and not sr.stack(chain)
    assert sr.stacked_rows(attention.q_proj, 3) is None
    assert sr.stack((attention.o_proj,))
    attention.o_proj.base_layer.bias = torch.nn.Parameter(torch.zeros(32))
    assert not sr.stackable((attention.o_proj,))


def test_a_model_unstacked_between_compiled_calls_runs_the_plain_path():
    eager, model, ids = _compiled_pair(1)
    assert sr.unstack(model) == 4 and not _heads(model)
    perturb_adapters(model, seed=9)  # new A's: a stale stack would not see them
    perturb_adapters(eager, seed=9)
    loss, grads = _grads(model, ids)
    loss_ref, grads_ref = _grads(eager, ids)
    assert rel_err(loss, loss_ref) < FP32_TOL
    assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads)


def test_a_bias_given_after_stacking_is_not_dropped():
    model = _llama(1)
    o = model.model.layers[0].self_attn.o_proj
    assert sr.stack((o,))
    o.base_layer.bias = torch.nn.Parameter(torch.randn(32))
    x = torch.randn(1, 3, 32)
    want = o.base_layer(x) + o.scaling * (x @ o.lora_A.t() @ o.lora_B.t())
    assert rel_err(o(x), want) < FP32_TOL


def test_the_state_dict_holds_each_a_as_its_own_tensor(tmp_path):
    _, model, _ = _compiled_pair(1)
    state = model.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    for key, tensor in lora.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), key
    torch.save(lora, tmp_path / "lora.pt")  # the adapters' bytes, not the stacked frozen weights behind them
    assert (tmp_path / "lora.pt").stat().st_size < 3 * sum(t.numel() * t.element_size() for t in lora.values())
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(state["model.layers.0.self_attn.q_proj.lora_A"], q.lora_A)
    assert model.state_dict(keep_vars=True)["model.layers.0.self_attn.q_proj.lora_A"] is q.lora_A


def test_stacks_are_checked_while_the_layers_learn_again_after_a_checkpoint(tmp_path):
    eager, model, ids = _compiled_pair(1)
    slimtune.save_adapter(model, tmp_path / "adapter")  # the sibling groups learn again (siblings.relearn)
    for m in (model, eager):
        m.double()
        perturb_adapters(m, seed=11)
    for _ in range(2):  # the learning step (eager), then compiled again
        loss, grads = _grads(model, ids)
        loss_ref, grads_ref = _grads(eager, ids)
        assert rel_err(loss, loss_ref) < FP32_TOL
        assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads)
    assert _heads(model) and all(sr.intact(h) for h in _heads(model))


def test_stacks_built_under_inference_mode_still_train():
    model = _llama(1)
    attention = model.model.layers[0].self_attn
    chain = (attention.q_proj, attention.k_proj, attention.v_proj)
    with torch.inference_mode():
        assert sr.stack(chain)
    rows = sr.stacked_rows(attention.q_proj, 3)
    assert not rows.is_inference() and not attention.q_proj.lora_A.is_inference()
    x = torch.randn(1, 3, 32, requires_grad=True)
    sum(y.sum() for y in sr.stacked_lowrank_linear(x, chain, rows)).backward()
    assert attention.q_proj.lora_A.grad is not None and x.grad is not None


def test_a_member_called_on_its_own_after_a_move_uses_its_own_tensors():
    """Called directly (not through its compiled layer, whose wrapper checks the stacks), a member of a stack that
    ``.to()`` broke computes from its own tensors, not from the rows left behind."""
    _, model, _ = _compiled_pair(1)
    model.double()
    down = model.model.layers[0].mlp.down_proj
    perturb_adapters(model, seed=9)
    assert not sr.intact(down) and sr.stacked_rows(down, 1) is None
    x = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = x @ down.base_layer.weight.t() + down.scaling * (x @ down.lora_A.t()) @ down.lora_B.t()
    assert rel_err(down(x), want) < FP32_TOL


def test_a_base_weight_that_trains_is_not_stacked():
    """A frozen weight is what a stack holds: one set to train (before stacking or after) takes its member out of
    the stack, so that it gets its gradient as the plain path gives it."""
    eager, model, ids = _compiled_pair(1)
    for m in (eager, model):
        m.model.layers[0].self_attn.k_proj.base_layer.weight.requires_grad_(True)
    loss, grads = _grads(model, ids)
    loss_ref, grads_ref = _grads(eager, ids)
    name = "model.layers.0.self_attn.k_proj.base_layer.weight"
    assert name in grads and rel_err(grads[name], grads_ref[name]) < FP32_TOL
    assert all(rel_err(grads[n], grads_ref[n]) < FP32_TOL for n in grads_ref)
    assert sr.stacked_rows(model.model.layers[0].self_attn.q_proj, 3) is None


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process (FSDP2 and DDP run on it as on many), taken down after the test."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable here, or a process group is already up")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _steps(model, ids, count: int, optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """``count`` training steps' losses (SGD unless an optimizer is given)."""
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(count):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fsdp", ["FSDP2", "FSDP1"])
@pytest.mark.parametrize("order", ["compiled, then sharded", "sharded, then compiled"])
def test_fsdp_above_the_compiled_model_stacks_nothing(one_process_group, order, fsdp):
    """FSDP on a module above the one ``compile_layers`` was given (on the whole model only; FSDP1 with
    ``use_orig_params=True``, as PEFT needs): its forwards get weights all-gathered into FSDP's own buffers, whose
    storage it frees after. Stacked, FSDP2's losses from the third step on differed from the eager model's (stale
    rows). The weights changed since ``compile_layers`` (the parameters are FSDP's now) keep every chain unstacked."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    def shard(module):
        if fsdp == "FSDP2":
            fully_shard(module)
            return module
        return FullyShardedDataParallel(module, use_orig_params=True, device_id=torch.device("cpu"))

    from slimtune.models.layers import compile_layers

    eager = _llama(1)
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    if order.startswith("compiled"):
        compile_layers(model.model, backend="aot_eager")
    wrapped = shard(model)
    if order.startswith("sharded"):
        compile_layers(model.model, backend="aot_eager")
    losses = _steps(wrapped, ids, 4)
    assert not _heads(model)
    want = _steps(eager, ids, 4)
    assert all(rel_err(torch.tensor(g), torch.tensor(w)) < FP32_TOL for g, w in zip(losses, want)), (losses, want)


def test_ddp_keeps_the_stacks(one_process_group):
    """DDP trains the model's own parameters: its compiled layers are stacked, and step as the eager model does; the
    stacks add no module buffer, which DDP would broadcast before every forward."""
    from torch.nn.parallel import DistributedDataParallel

    from slimtune.models.layers import compile_layers

    eager = _llama(1)
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    compile_layers(model, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    buffers = [name for name, _ in model.named_buffers()]
    losses = _steps(DistributedDataParallel(model), ids, 4)
    assert len(_heads(model)) == 4
    # the rows are no module buffer: DDP broadcasts every buffer before each forward (all the frozen weights)
    assert [name for name, _ in model.named_buffers()] == buffers
    # never wide under a process group: DDP's buckets keep each B's layout as it was wrapped (wide_rows)
    assert sr.stacked_rows(model.model.layers[0].mlp.gate_proj, 2).dim() == 2
    want = _steps(eager, ids, 4)
    assert all(rel_err(torch.tensor(g), torch.tensor(w)) < FP32_TOL for g, w in zip(losses, want)), (losses, want)
