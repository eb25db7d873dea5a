"""Wide rows (a chain of two LoRA layers, each member's frozen weight and B one matrix read against ``[s·h, x]``): the
Function against float64 references, the stack's views, and a compiled model's steps with AdamW against eager ones.
The stacks ``compile_layers`` keeps (moves, copies, checkpoints, FSDP, DDP) are tested in ``test_stacked_rows.py``,
where a model with rank 8 stacks its gate/up wide."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import slimtune
from slimtune.core import stacked_rows as sr
from slimtune.core import wide_rows as wr
from slimtune.core.compute import is_column_major
from slimtune.core.lowrank_group import grouped_lowrank_reference
from slimtune.methods.lora.linear import LoraLinear
from tests.core.test_stacked_rows import _steps
from tests.helpers import BF16_TOL, FP32_TOL, backward_against_reference, perturb_adapters, rel_err

D_IN, OUTS, RANKS = 16, (24, 16, 8), (8, 16, 8)


def _chain(count: int, dtype: torch.dtype, seed: int = 0) -> list[LoraLinear]:
    """``count`` LoRA layers over frozen Linear layers of one input width, B's non-zero."""
    torch.manual_seed(seed)
    chain = []
    for d, r in zip(OUTS[:count], RANKS[:count]):
        layer = LoraLinear(nn.Linear(D_IN, d, bias=False), r=r, alpha=2 * r).to(dtype)
        layer.base_layer.weight.requires_grad_(False)
        chain.append(layer)
    perturb_adapters(nn.ModuleList(chain), std=0.3, seed=seed)
    return chain


def _reference(chain, x):
    """Float64 copies of the chain's tensors (leaves) and each member's output through PyTorch's autograd."""
    weights = [m.base_layer.weight.detach().double() for m in chain]
    downs = [m.lora_A.detach().double().requires_grad_() for m in chain]
    ups = [m.lora_B.detach().double().requires_grad_() for m in chain]
    return downs, ups, grouped_lowrank_reference(x, weights, [None] * len(chain), downs, ups, chain[0].scaling)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_matches_float64_reference(count, dtype, tol, x_grad):
    chain = _chain(count, dtype)
    x64 = torch.randn(2, 5, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    downs64, ups64, ref = _reference(chain, x64.requires_grad_(x_grad))
    flat = wr.build(chain)
    x = x64.detach().to(dtype).requires_grad_(x_grad)
    got = wr.wide_lowrank_linear(x, chain, flat)
    backward_against_reference(list(got), list(ref), "cpu", dtype, tol)
    for m, a64, b64 in zip(chain, downs64, ups64):
        assert rel_err(m.lora_A.grad, a64.grad) < tol and rel_err(m.lora_B.grad, b64.grad) < tol
        assert m.lora_B.grad.stride() == m.lora_B.stride()  # as B is laid out: autograd copies nothing
    assert (x.grad is None) if not x_grad else rel_err(x.grad, x64.grad) < tol
    assert flat.grad is None


def test_gradcheck_float64():
    chain = _chain(2, torch.float64)
    flat = wr.build(chain)
    x = torch.randn(3, D_IN, dtype=torch.float64, requires_grad=True)
    params = [m.lora_A for m in chain] + [m.lora_B for m in chain]

    def f(x, *_):
        return wr.wide_lowrank_linear(x, chain, flat)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_an_unused_output_gives_its_member_no_gradients_and_the_other_its_own():
    chain = _chain(2, torch.float64)
    x = torch.randn(4, D_IN, dtype=torch.float64, requires_grad=True)
    x64 = x.detach().clone().requires_grad_()
    downs64, ups64, ref = _reference(chain, x64)
    flat = wr.build(chain)
    got = wr.wide_lowrank_linear(x, chain, flat)
    got[1].square().sum().backward()
    ref[1].square().sum().backward()
    assert chain[0].lora_A.grad is None and chain[0].lora_B.grad is None
    assert rel_err(chain[1].lora_A.grad, downs64[1].grad) < FP32_TOL
    assert rel_err(chain[1].lora_B.grad, ups64[1].grad) < FP32_TOL
    assert rel_err(x.grad, x64.grad) < FP32_TOL


def test_the_stack_holds_every_tensor_as_a_view_with_its_values():
    chain = _chain(2, torch.float32)
    before = [[t.detach().clone() for t in (m.base_layer.weight, m.lora_A, m.lora_B)] for m in chain]
    assert wr.wide(chain) and sr.stack(chain)
    flat = sr.stacked_rows(chain[0], 2)
    assert flat.dim() == 1 and sr.intact(chain[0])
    for m, values in zip(chain, before):
        for t, value in zip((m.base_layer.weight, m.lora_A, m.lora_B), values):
            assert t.untyped_storage() is flat.untyped_storage() and torch.equal(t, value)
        assert is_column_major(m.lora_B)
    state = chain[0].state_dict()  # the adapters' entries: copies of their own, not views of the stack
    for key in ("lora_A", "lora_B"):
        assert state[key].untyped_storage().nbytes() == state[key].numel() * state[key].element_size()
    sr.unstack_member(chain[0])
    for m, values in zip(chain, before):
        for t, value in zip((m.base_layer.weight, m.lora_A, m.lora_B), values):
            assert torch.equal(t, value) and t.untyped_storage() is not flat.untyped_storage()
        assert m.base_layer.weight.is_contiguous() and m.lora_A.is_contiguous() and is_column_major(m.lora_B)


def test_a_gradient_held_when_stacked_is_laid_out_as_b_and_the_next_one_adds_to_it():
    """Stacked between two micro-batches (the chains are learnt in a step's first): B's gradient so far takes B's
    layout, and the second micro-batch's adds to it with no layout-contract warning (autograd would copy)."""
    chain = _chain(2, torch.float64)
    xs = [torch.randn(3, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]
    downs64, ups64, _ = _reference(chain, xs[0])
    for x in xs:
        ref = grouped_lowrank_reference(x, [m.base_layer.weight.double() for m in chain], [None] * 2, downs64, ups64,
                                        chain[0].scaling)
        sum(y.square().sum() for y in ref).backward()
    sum(m(xs[0]).square().sum() for m in chain).backward()  # unstacked: row-major gradients
    flat = wr.build(chain)
    assert all(is_column_major(m.lora_B.grad) for m in chain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sum(y.square().sum() for y in wr.wide_lowrank_linear(xs[1], chain, flat)).backward()
    for m, a64, b64 in zip(chain, downs64, ups64):
        assert rel_err(m.lora_A.grad, a64.grad) < FP32_TOL and rel_err(m.lora_B.grad, b64.grad) < FP32_TOL
        assert m.lora_B.grad.stride() == m.lora_B.stride()


def test_chains_that_are_not_two_aligned_members_stack_as_rows():
    three = _chain(3, torch.float32)  # q/k/v
    assert not wr.wide(three) and sr.stack(three) and sr.stacked_rows(three[0], 3).dim() == 2
    odd = [LoraLinear(nn.Linear(D_IN, 24, bias=False), r=6, alpha=6) for _ in range(2)]  # rank 6: not aligned
    for m in odd:
        m.base_layer.weight.requires_grad_(False)
    assert not wr.wide(odd) and sr.stack(odd) and sr.stacked_rows(odd[0], 2).dim() == 2


def test_compiles_without_a_graph_break():
    chain = _chain(2, torch.float32)
    flat = wr.build(chain)
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    torch.compiler.reset()
    f = torch.compile(lambda t: sum(y.square().sum() for y in wr.wide_lowrank_linear(t, chain, flat)),
                      fullgraph=True, backend="aot_eager")
    f(x).backward()
    params = [x] + [p for m in chain for p in (m.lora_A, m.lora_B)]
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    sum(y.square().sum() for y in wr.wide_lowrank_linear(x, chain, flat)).backward()
    assert all(rel_err(p.grad, w) < FP32_TOL for p, w in zip(params, want))


# -- a compiled model --------------------------------------------------------------------------------------------
def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = slimtune.adapt(transformers.LlamaForCausalLM(config), slimtune.LoraConfig(r=8, target_modules="all-linear"))
    perturb_adapters(model)
    return model


def _adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)


def test_a_compiled_model_stacks_gate_and_up_wide_and_trains_as_the_eager_one():
    """Once learnt, gate/up is stacked wide; AdamW's state for their B's, made row-major by the first (eager) step,
    is given their column-major layout before the next step (its foreach kernels take tensors of one layout)."""
    from slimtune.models.layers import compile_layers

    eager = _llama()
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    compile_layers(model, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    optimizer = _adamw(model)
    losses = _steps(model, ids, 4, optimizer)
    want = _steps(eager, ids, 4, _adamw(eager))
    assert all(rel_err(torch.tensor(g), torch.tensor(w)) < FP32_TOL for g, w in zip(losses, want)), (losses, want)
    mlp = model.model.layers[0].mlp
    flat = sr.stacked_rows(mlp.gate_proj, 2)
    assert flat is not None and flat.dim() == 1
    assert sr.stacked_rows(model.model.layers[0].self_attn.q_proj, 3).dim() == 2  # q/k/v: rows
    for p in (mlp.gate_proj.lora_B, mlp.up_proj.lora_B):
        state = optimizer.state[p]
        assert is_column_major(p) and state["exp_avg"].stride() == p.stride() == state["exp_avg_sq"].stride()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.requires_grad:
            assert rel_err(p, q) < FP32_TOL, name


def test_optimizer_state_loaded_after_stacking_takes_the_layout_of_its_b():
    chain = _chain(2, torch.float32)
    params = [p for m in chain for p in (m.lora_A, m.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(4, D_IN)

    def step():
        sum(y.square().sum() for y in sr.stacked_lowrank_linear(x, chain, sr.stacked_rows(chain[0], 2))).backward()
        optimizer.step()
        optimizer.zero_grad()

    assert sr.stack(chain)
    step()
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():  # as a checkpoint written row-major gives it back
        state.update({k: v.contiguous() for k, v in state.items() if v.dim() == 2})
    optimizer.load_state_dict(saved)
    b = chain[0].lora_B
    assert optimizer.state[b]["exp_avg"].stride() != b.stride()
    want = {k: v.clone() for k, v in optimizer.state[b].items()}
    step()
    state = optimizer.state[b]
    assert state["exp_avg"].stride() == b.stride() and state["exp_avg_sq"].stride() == b.stride()
    assert not torch.equal(state["exp_avg"], want["exp_avg"])  # a step ran on the values loaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 GEMMs as training runs them)")
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_on_cuda_matches_float64_reference(compiled):
    """A 3B-like pair at a smaller width: bf16 on the GPU, eager and under Inductor, against float64 on the CPU."""
    torch.manual_seed(0)
    chain = []
    for d in (512, 512):
        layer = LoraLinear(nn.Linear(256, d, bias=False), r=32, alpha=64).to("cuda", torch.bfloat16)
        layer.base_layer.weight.requires_grad_(False)
        chain.append(layer)
    perturb_adapters(nn.ModuleList(chain), std=0.3)
    x64 = torch.randn(4, 128, 256, dtype=torch.float64, requires_grad=True)
    downs64 = [m.lora_A.detach().double().cpu().requires_grad_() for m in chain]
    ups64 = [m.lora_B.detach().double().cpu().requires_grad_() for m in chain]
    ref = grouped_lowrank_reference(x64, [m.base_layer.weight.detach().double().cpu() for m in chain], [None, None],
                                    downs64, ups64, chain[0].scaling)
    flat = wr.build(chain)
    x = x64.detach().to("cuda", torch.bfloat16).requires_grad_()
    torch.compiler.reset()
    run = torch.compile(wr.wide_lowrank_linear, fullgraph=True) if compiled else wr.wide_lowrank_linear
    got = run(x, chain, flat)
    backward_against_reference(list(got), list(ref), "cuda", torch.bfloat16, BF16_TOL)
    assert rel_err(x.grad, x64.grad) < BF16_TOL
    for m, a64, b64 in zip(chain, downs64, ups64):
        assert rel_err(m.lora_A.grad, a64.grad) < BF16_TOL and rel_err(m.lora_B.grad, b64.grad) < BF16_TOL


def test_a_wide_stacked_model_saves_with_transformers_and_loads_back(tmp_path):
    """The state dict gives a wide stack's weights and B's row-major: ``save_pretrained`` (safetensors) takes them."""
    model = _llama()
    mlp = model.model.layers[0].mlp
    assert sr.stack((mlp.gate_proj, mlp.up_proj)) and sr.stacked_rows(mlp.gate_proj, 2).dim() == 1
    model.save_pretrained(tmp_path / "model")
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model" / "model.safetensors")
    gate = "model.layers.0.mlp.gate_proj."
    for key in ("base_layer.weight", "lora_A", "lora_B"):
        assert torch.equal(saved[gate + key], state[gate + key]), key
