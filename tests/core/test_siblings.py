"""LoRA layers that read the same input run as one Function once learnt (q/k/v, gate/up), with the same results as
each running alone — and the cases where they must not: other inputs, dropout, a changed input, checkpointing."""
import copy

import pytest
import torch
from torch import nn

import slimtune
from slimtune.methods.dora import DoraLinear
from slimtune.methods.lora import LoraLinear
from slimtune.core.inject import detach
from slimtune.core.siblings import ACTIVE, LEARNING, OFF, SiblingGroup, set_sibling_fusion
from tests.helpers import perturb_adapters, rel_err
from tests.toy_models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fusion_on():
    set_sibling_fusion(True)
    yield
    set_sibling_fusion(True)


def _llama(dtype=torch.float64, **config):
    model = tiny_llama().to(dtype).train()
    config.setdefault("target_modules", TARGETS)
    config.setdefault("lora_alpha", 8)
    model = slimtune.adapt(model, slimtune.LoraConfig(r=4, **config))
    perturb_adapters(model, seed=1)
    return model


def _groups(model):
    return list({id(m.siblings): m.siblings for m in model.modules() if getattr(m, "siblings", None)}.values())


def _train(model, steps=3, **kwargs):
    """Losses and the adapters' gradients of each step (SGD in between, so each step sees new weights)."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    out = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _assert_same_training(got, want, tol=1e-10):
    for (loss, grads), (loss_ref, grads_ref) in zip(got, want):
        assert rel_err(loss, loss_ref) < tol
        for g, g_ref in zip(grads, grads_ref):
            assert rel_err(g, g_ref) < tol


def test_llama_learns_qkv_and_gate_up_then_trains_as_alone():
    model = _llama()
    groups = _groups(model)
    assert len(groups) == 4 and all(g.state == LEARNING for g in groups)  # self_attn and mlp of 2 layers
    fused = _train(model, steps=4)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.q_proj.siblings.state == ACTIVE and mlp.gate_proj.siblings.state == ACTIVE
    assert attn.q_proj.siblings.chains == {attn.q_proj: (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert mlp.gate_proj.siblings.chains == {mlp.gate_proj: (mlp.gate_proj, mlp.up_proj)}
    set_sibling_fusion(False)
    alone = _train(_llama(), steps=4)
    _assert_same_training(fused, alone)


def test_fused_step_runs_fewer_functions():
    model = _llama(torch.float32)
    _train(model, steps=2)
    ids = torch.randint(0, 128, (1, 5))
    seen = []

    def count(module, args, output):
        node = output.grad_fn
        seen.append(type(node).__name__ if node is not None else None)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, LoraLinear)]
    model(input_ids=ids).logits.sum().backward()
    for h in hooks:
        h.remove()
    assert seen.count("GroupedLowRankFunctionBackward") == 2 * 5  # q, k, v, gate, up of 2 layers
    assert seen.count("LowRankLinearFunctionBackward") == 2 * 2  # o and down


class _CrossAttention(nn.Module):
    """q reads the hidden states, k and v the context."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(5, 4), nn.Linear(5, 4)

    def forward(self, x, context):
        return (self.q(x) @ self.k(context).transpose(-1, -2)).softmax(-1) @ self.v(context)


def _cross():
    torch.manual_seed(0)
    model = slimtune.adapt(nn.Sequential(_CrossAttention()).double(),
                           slimtune.LoraConfig(r=2, target_modules=["q", "k", "v"]))
    perturb_adapters(model, seed=2)
    return model


def test_cross_attention_fuses_k_and_v_only():
    model = _cross()
    attn = model[0]
    x, context = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    for _ in range(3):
        attn(x, context).sum().backward()
    group = attn.q.siblings
    assert group.state == ACTIVE and group.chains == {attn.k: (attn.k, attn.v)}
    got = attn(x, context)
    set_sibling_fusion(False)
    assert rel_err(got, attn(x, context)) < 1e-12  # the stacked x Aᵀ GEMM may sum in another order


class _Switching(nn.Module):
    """Reads one input with both layers at first, then feeds them different inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.split = False

    def forward(self, x):
        return self.a(x) * self.b(x + 1 if self.split else x)


def test_a_sibling_fed_another_input_runs_alone_and_turns_fusion_off():
    torch.manual_seed(0)
    model = slimtune.adapt(nn.Sequential(_Switching()).double(), slimtune.LoraConfig(r=2, target_modules=["a", "b"]))
    perturb_adapters(model, seed=3)
    net = model[0]
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(2):
        net(x).sum().backward()
    assert net.a.siblings.state == ACTIVE
    net.split = True
    got = net(x)
    set_sibling_fusion(False)
    assert rel_err(got, net.a(x) * net.b(x + 1)) < 1e-12
    set_sibling_fusion(True)
    got.sum().backward()
    net(x)  # the next first call after a backward pass: off
    assert net.a.siblings.state == OFF


def test_an_input_changed_in_place_between_siblings_is_not_served_stale():
    torch.manual_seed(0)

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            ya = self.a(x)
            if self.change:
                x.mul_(2)
            return ya, self.b(x)

    model = slimtune.adapt(nn.Sequential(InPlace()).double(), slimtune.LoraConfig(r=2, target_modules=["a", "b"]))
    perturb_adapters(model, seed=5)
    net = model[0]
    net.change = False
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(2):
        sum(y.sum() for y in net(x.clone())).backward()
    assert net.a.siblings.state == ACTIVE
    net.change = True
    with torch.no_grad():
        xc = x.clone()
        _, yb = net(xc)
        assert torch.allclose(yb, net.b(2 * x))


def test_dropout_in_training_runs_alone_and_eval_fuses():
    model = _llama(lora_dropout=0.1)
    _train(model, steps=2)
    group = model.model.layers[0].self_attn.q_proj.siblings
    assert group.state == ACTIVE
    ids = torch.randint(0, 128, (1, 5))
    nodes = []
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda m, a, out: nodes.append(type(out.grad_fn).__name__))
    model(input_ids=ids)  # training: dropout draws per layer
    model.eval()
    model(input_ids=ids)
    hook.remove()
    assert nodes == ["LowRankLinearFunctionBackward", "GroupedLowRankFunctionBackward"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_as_alone(reentrant):
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    model = _llama()
    model.gradient_checkpointing_enable(**kwargs)
    fused = _train(model, steps=4)
    assert model.model.layers[0].self_attn.q_proj.siblings.state == ACTIVE
    set_sibling_fusion(False)
    plain = _llama()
    plain.gradient_checkpointing_enable(**kwargs)
    _assert_same_training(fused, _train(plain, steps=4))


def test_disabled_and_merged_adapters_give_the_base_output():
    model = _llama()
    _train(model, steps=2)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        with slimtune.disable_adapters(model):
            off = model(input_ids=ids).logits
        assert torch.equal(off, slimtune.unload(copy.deepcopy(model))(input_ids=ids).logits)
        fused = model(input_ids=ids).logits
        slimtune.merge(model)
        assert rel_err(model(input_ids=ids).logits, fused) < 1e-10


def test_copies_learn_afresh_and_removal_takes_the_groups_away():
    model = _llama()
    _train(model, steps=2)
    for clone in (copy.deepcopy(model),):
        groups = _groups(clone)
        assert groups and all(g.state == LEARNING and not g.chains for g in groups)
        assert all(m.siblings in groups for m in clone.modules() if isinstance(m, LoraLinear))
        _train(clone, steps=2)
        assert clone.model.layers[0].self_attn.q_proj.siblings.state == ACTIVE
    adapters = detach(model)
    assert all(m.siblings is None for _, m in adapters.adapters)


def test_groups_hold_one_kind_of_layer_and_two_or_more_of_them():
    model = slimtune.adapt(tiny_llama().train(), slimtune.LoraConfig(r=4, use_dora=True, target_modules=TARGETS))
    assert len(_groups(model)) == 4 and all(type(m) is DoraLinear for g in _groups(model) for m in g.members)
    apart = _llama(target_modules=["q_proj", "o_proj"])  # siblings that never read one input
    _train(apart, steps=2)
    assert all(g.state == OFF for g in _groups(apart))
    assert not _groups(_llama(target_modules=["q_proj", "gate_proj"]))  # one member per parent: nothing to fuse


def test_setting_is_checked():
    with pytest.raises(TypeError, match="True or False"):
        set_sibling_fusion("yes")
    assert isinstance(SiblingGroup([]).state, str)


def test_saving_a_checkpoint_sends_the_groups_back_to_learning(tmp_path):
    """A run resumed from a checkpoint starts learning; the run that goes on learns from the same step, so both
    compute the same next steps (fused and lone layers round differently)."""
    model = _llama()
    _train(model, steps=2)
    assert all(g.state == ACTIVE for g in _groups(model))
    slimtune.save_adapter(model, tmp_path / "adapter")
    assert all(g.state == LEARNING and not g.chains for g in _groups(model))
    _train(model, steps=2)
    assert all(g.state == ACTIVE for g in _groups(model))


def test_a_deleted_model_frees_its_layers_without_the_garbage_collector():
    """The group holds its members weakly: no reference cycle keeps a deleted model's weights alive until a
    collection."""
    import gc
    import weakref

    model = _llama()
    _train(model, steps=2)
    q = model.model.layers[0].self_attn.q_proj
    refs = [weakref.ref(q), weakref.ref(q.base_layer.weight)]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model, q
        assert all(ref() is None for ref in refs)
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("use_dora", [False, True])
def test_inference_mode_runs_and_agrees_with_no_grad(use_dora):
    """Under ``torch.inference_mode`` (inference tensors have no version counter) an adapted model runs, with the
    siblings' groups learnt and active, and gives what ``no_grad`` gives; training afterwards still works."""
    model = _llama(use_dora=use_dora)
    _train(model, steps=2)  # the groups learn, then fuse
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-12
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- under torch.compile: chains learnt eagerly run as one Function inside the graph --------------------------------
def _gemms_in_step(model, ids):
    """The matrix-product calls (mm, addmm, bmm) of one forward+backward, from PyTorch's profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(e.name in ("aten::mm", "aten::addmm", "aten::bmm") for e in prof.events())


@pytest.mark.parametrize("checkpointing, alpha", [(False, 8), (True, 8), (False, 4)])
def test_compiled_layers_run_learnt_chains_as_one(checkpointing, alpha):
    """``compile_layers``: the first step runs eagerly while q/k/v and gate/up learn; the next ones are compiled
    (``fullgraph=True``) with each chain as one Function — fewer GEMMs a step than the compiled layers with fusion
    off, and the same losses and gradients (float64; also with slimtune's checkpointing around the compiled layers,
    whose recomputation runs the same graph; and at scaling 1, whose products take no epilogue scale)."""
    from slimtune.memory.recompute import checkpoint_layers
    from slimtune.models.layers import compile_layers

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    runs, gemms = {}, {}
    for fuse in (True, False):
        set_sibling_fusion(fuse)
        torch.compiler.reset()
        model = _llama(lora_alpha=alpha)
        compile_layers(model, backend="aot_eager", fullgraph=True)
        if checkpointing:
            checkpoint_layers(model)
        runs[fuse] = _train(model, steps=3)
        gemms[fuse] = _gemms_in_step(model, ids)
        groups = _groups(model)
        assert all(g.state == (ACTIVE if fuse else LEARNING) for g in groups)
    _assert_same_training(runs[True], runs[False])
    # fusion off, every adapted layer is stacked alone (core.stacked_rows: dx one GEMM against [dy, g]); on, a layer
    # runs 3 fewer GEMMs forward (q/k/v's base outputs and x Aᵀ in one, gate/up's in one) and 4 fewer backward (dA
    # once a chain, q/k/v's dx in two): at least 6 fewer a layer, whose first needs no dx
    assert gemms[True] <= gemms[False] - 6 * 2


class _SelfAttentionOrNot(nn.Module):
    """q, k and v read x — or k reads ``other`` where given."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x, other=None):
        return self.q(x) * self.k(x if other is None else other) + self.v(x)


def test_a_traced_chain_member_fed_another_input_runs_alone():
    """Chains learnt eagerly as (q, k, v); a compiled call that feeds k another tensor: k runs alone in the graph
    (the trace checks the input object), v still takes its held output, and the result is the eager one."""
    torch.manual_seed(0)
    model = slimtune.adapt(nn.Sequential(_SelfAttentionOrNot()).double(),
                           slimtune.LoraConfig(r=2, target_modules=["q", "k", "v"]))
    perturb_adapters(model, seed=2)
    attn = model[0]
    x, other = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    for _ in range(2):
        attn(x).sum().backward()
    assert attn.q.siblings.state == ACTIVE and attn.q.siblings.chains == {attn.q: (attn.q, attn.k, attn.v)}
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    got_same, got_other = compiled(x), compiled(x, other)
    attn.q.siblings.clear_traced()  # k's held output, untaken (compile_layers drops it after each call)
    set_sibling_fusion(False)
    assert rel_err(got_same, attn(x)) < 1e-12 and rel_err(got_other, attn(x, other)) < 1e-12


def test_a_compiled_layer_that_never_runs_backward_compiles_after_waiting():
    """Without gradients no backward pass ends the groups' learning: the layers run eagerly for
    ``MAX_EAGER_WAIT`` calls, then compiled (with the members alone)."""
    from slimtune.core.siblings import MAX_EAGER_WAIT
    from slimtune.models.layers import compile_layers

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    model = _llama(torch.float32).eval()
    compile_layers(model, backend=counting)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        for _ in range(MAX_EAGER_WAIT):
            model(input_ids=ids)
        assert not graphs
        model(input_ids=ids)
    assert graphs and all(g.state == LEARNING for g in _groups(model))
