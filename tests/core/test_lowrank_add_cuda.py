"""``y = base + s·h upᵀ`` (slimtune.core.lowrank_add) on a GPU, bf16 included (the CPU interpreter cannot check bf16):
the Triton kernel against the float64 reference; the stacked chain's Function with it, compiled with
``fullgraph=True`` (a ``triton_op``: no graph break), against float64; a Llama's compiled layers use it and step as
eagerly."""
from __future__ import annotations

import copy

import pytest
import torch

import slimtune
from slimtune.core import stacked_rows as sr
from slimtune.core.lowrank_add import lowrank_add_kernel_loaded

from ..helpers import BF16_TOL, perturb_adapters, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, r", [(2048, 1024, 32), (37, 150, 5), (130, 129, 70)])
def test_kernel_against_float64(dtype, m, n, r):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(m, n + r + 7, generator=g, dtype=torch.float64)
    up = torch.randn(n, r, generator=g, dtype=torch.float64) / r ** 0.5
    want = wide[:, 3:3 + n] + 0.5 * wide[:, n + 3:n + 3 + r] @ up.t()
    assert lowrank_add_kernel_loaded(torch.empty(0, dtype=dtype, device="cuda"))
    wide_c = wide.to("cuda", dtype)
    got = torch.ops.slimtune.lowrank_add(wide_c[:, 3:3 + n], wide_c[:, n + 3:n + 3 + r], up.to("cuda", dtype), 0.5)
    assert got.dtype == dtype and got.is_contiguous() and rel_err(got, want) < BF16_TOL


def test_chain_function_compiled_fullgraph_against_float64():
    g = torch.Generator().manual_seed(1)
    widths, ranks, d_in = (256, 128), (16, 8), 192
    x = torch.randn(4, 64, d_in, generator=g, dtype=torch.float64)
    weights = [torch.randn(d, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5 for d in widths]
    downs = [torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5 for r in ranks]
    ups = [torch.randn(d, r, generator=g, dtype=torch.float64) / r ** 0.5 for d, r in zip(widths, ranks)]
    dys = [torch.randn(4, 64, d, generator=g, dtype=torch.float64) for d in widths]
    leaves = [t.clone().requires_grad_() for t in (x, *downs, *ups)]
    refs = [leaves[0] @ w.t() + 2.0 * (leaves[0] @ a.t()) @ b.t() for w, a, b in zip(weights, leaves[1:3], leaves[3:])]
    torch.autograd.backward(refs, dys)
    dtype = torch.bfloat16
    assert lowrank_add_kernel_loaded(torch.empty(0, dtype=dtype, device="cuda"))
    rows = torch.cat(weights + downs).to("cuda", dtype)
    a_params = [torch.nn.Parameter(torch.empty(0, device="cuda", dtype=dtype)) for _ in ranks]
    start = sum(widths)
    for p, r in zip(a_params, ranks):
        p.data = rows[start:start + r]
        start += r
    xc = x.to("cuda", dtype).requires_grad_()
    bs = [torch.nn.Parameter(u.to("cuda", dtype)) for u in ups]
    torch.compiler.reset()
    run = torch.compile(sr.StackedLowRankFunction.apply, fullgraph=True)
    outs = run(xc, 2.0, None, widths, True, *a_params, *bs, rows)
    torch.autograd.backward(outs, [d.to("cuda", dtype) for d in dys])
    for got, want in zip([*outs, xc.grad, *(p.grad for p in a_params), *(b.grad for b in bs)],
                         [*refs, *(leaf.grad for leaf in leaves)]):
        assert rel_err(got, want) < BF16_TOL


def test_compiled_llama_layers_sum_with_the_kernel_and_step_as_eagerly():
    transformers = pytest.importorskip("transformers")
    from slimtune.models.layers import compile_layers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    eager = slimtune.adapt(transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16), slimtune.LoraConfig(
        r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    perturb_adapters(eager)
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    compile_layers(model)
    ids = torch.randint(0, 128, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def step(m):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    for _ in range(2):  # the first learns the chains eagerly; the second stacks them
        step(model)
    heads = [m for m in model.modules() if sr.MEMBERS in m.__dict__]
    assert heads and all(h.__dict__.get(sr.KERNEL_SUM) for h in heads)
    loss, grads = step(model)
    loss_ref, grads_ref = step(eager)
    assert rel_err(loss, loss_ref) < BF16_TOL
    assert all(rel_err(grads[n], grads_ref[n]) < 5 * BF16_TOL for n in grads)  # bf16 roundings in other orders
