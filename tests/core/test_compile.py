"""``torch.compile(..., fullgraph=True)`` over a training step of a model adapted with each method.

A step (forward, loss, backward) compiled with ``fullgraph=True`` fails on any graph break; the second step runs
under ``torch.compiler.set_stance("fail_on_recompile")``, so a guard that fails every step fails the test too.
Values and gradients are compared with the same step in eager mode (fp32, relative error <= 1e-4). Dropout draws
the same masks compiled as eager (the seed comes from torch's generator either way, and the mask is one custom op).

Backend ``"aot_eager"``: Dynamo and AOTAutograd trace forward and backward exactly as they do for Inductor, and
the graphs run on eager kernels — about 2-5 s a case on 2 CPU cores, where Inductor's C++ build costs ~25 s per
cold start (measured on the 2-core test machine). One LoRA case runs under Inductor itself (~25 s cold, ~9 s with
a warm Inductor cache).
"""
from __future__ import annotations

import copy
import operator
import os

import pytest
import torch
from torch import nn

import slimtune
from slimtune.core.lowrank import dropout_keep_mask
from slimtune.core.tracing import in_compiled_region, seeded_keep_mask
from slimtune.core.triton import HAS_TRITON, use_triton
from tests.helpers import FP32_TOL, perturb_adapters, rel_err
from tests.toy_models import conv2d_net


def _mlp() -> nn.Module:
    """A Linear with a bias and one without (DoRA keeps z on the first, its own output on the second)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12, bias=False))


LINEARS = ["0", "2"]
CASES = {
    "lora": (_mlp, slimtune.LoraConfig(r=4, alpha=8, target_modules=LINEARS)),
    "rslora": (_mlp, slimtune.LoraConfig(r=4, alpha=8, rslora=True, target_modules=LINEARS)),
    "lora-dropout": (_mlp, slimtune.LoraConfig(r=4, alpha=8, dropout=0.2, target_modules=LINEARS)),
    "dora": (_mlp, slimtune.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=LINEARS)),
    "dora-dropout": (_mlp, slimtune.LoraConfig(r=4, alpha=8, use_dora=True, dropout=0.2, target_modules=LINEARS)),
    "hra": (_mlp, slimtune.HraConfig(r=4, target_modules=LINEARS)),
    "loha": (_mlp, slimtune.LohaConfig(r=2, alpha=4, target_modules=LINEARS, path="structured")),
    "loha-folded-rank-dropout": (_mlp, slimtune.LohaConfig(r=2, alpha=4, target_modules=LINEARS, path="folded",
                                                           rank_dropout=0.3)),
    "lokr": (_mlp, slimtune.LokrConfig(r=2, alpha=4, target_modules=LINEARS, path="structured")),
    # module dropout that (almost surely) drops every layer: the base's output, eager and compiled
    "lokr-folded-module-dropout": (_mlp, slimtune.LokrConfig(r=2, alpha=4, target_modules=LINEARS, path="folded",
                                                             rank_dropout=0.3, module_dropout=0.9999999)),
    "locon": (conv2d_net, slimtune.LoraConfig(r=4, alpha=8, target_modules=["0", "2"])),
    # DoRA on convolutions (DoraScaleFunction: its tail returned z's own tensor in fp32 before distinct_when_traced)
    "dora-conv": (conv2d_net, slimtune.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["0", "2"])),
    # the structured convolutions (StructuredFunction: LoKr's keeps its built factors on ctx for backward)
    "lokr-conv": (conv2d_net, slimtune.LokrConfig(r=2, alpha=4, target_modules=["0", "2"], path="structured")),
    "loha-conv": (conv2d_net, slimtune.LohaConfig(r=2, alpha=4, target_modules=["0", "2"], path="structured")),
}


def _adapted(case: str) -> tuple[nn.Module, torch.Tensor]:
    make, config = CASES[case]
    model = slimtune.adapt(make(), copy.deepcopy(config))
    perturb_adapters(model)
    model.train()
    x = torch.randn(2, 3, 8, 8) if make is conv2d_net else torch.randn(3, 5, 8)
    return model, x


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _steps(model: nn.Module, x: torch.Tensor, step, steps: int = 2) -> list[torch.Tensor]:
    """Losses of ``steps`` forward+backward passes (seeded alike), then the gradients of x and of every trainable
    parameter (zeros where a parameter got none: a dropped module gives None eagerly, zeros compiled)."""
    x = x.detach().clone().requires_grad_(True)
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        stance = "fail_on_recompile" if i else "default"
        with torch.compiler.set_stance(stance):
            loss = step(model, x)
        loss.backward()
        losses.append(loss.detach())
    grads = [t.grad if t.grad is not None else torch.zeros_like(t)
             for t in [x, *(p for p in model.parameters() if p.requires_grad)]]
    return losses + grads


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_compiles_without_graph_break(case):
    model, x = _adapted(case)
    eager = _steps(copy.deepcopy(model), x, _loss)
    torch.compiler.reset()
    compiled = _steps(model, x, torch.compile(_loss, fullgraph=True, backend="aot_eager"))
    assert len(compiled) == len(eager)
    for got, ref in zip(compiled, eager):
        assert rel_err(got, ref) <= FP32_TOL


def test_lora_step_under_inductor():
    """Inductor generates its own kernels (~25 s to build cold on 2 cores: the one Inductor case)."""
    model, x = _adapted("lora")
    eager = _steps(copy.deepcopy(model), x, _loss, steps=1)
    torch.compiler.reset()
    compiled = _steps(model, x, torch.compile(_loss, fullgraph=True), steps=1)
    for got, ref in zip(compiled, eager):
        assert rel_err(got, ref) <= FP32_TOL


def test_seeded_keep_mask_is_the_eager_mask():
    like = torch.randn(6, 5)
    seed = 1234567
    mask = seeded_keep_mask(like, 0.3, torch.tensor([seed]))
    assert torch.equal(mask, dropout_keep_mask(like, 0.3, seed))
    assert torch.equal(dropout_keep_mask(like, 0.3, torch.tensor([seed])), mask)
    assert ((mask == 0) | ((mask - 1 / 0.7).abs() < 1e-6)).all() and (mask == 0).any() and (mask != 0).any()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_step_aside_while_compiling(monkeypatch):
    """Under ``torch.compile`` the plain-PyTorch references run (the compiler fuses them itself)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4)
    assert use_triton(x)
    torch.compiler.reset()
    traced = torch.compile(lambda t: t + 1 if use_triton(t) else t - 1, fullgraph=True, backend="eager")
    assert torch.equal(traced(x), x - 1)
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_a_layer_stack_compiles_once_not_once_per_layer():
    """``compile_layers`` on a six-layer Llama with LoRA (its lean RMSNorms and MLPs installed, then taken off
    the compiled layers; its KV cache turned off): two graphs for the whole stack — the first layer, whose input
    needs no gradient, and the rest — where each layer's lean forward object was a guard of its own."""
    transformers = pytest.importorskip("transformers")
    from slimtune.core import lean_layers
    from slimtune.models.layers import compile_layers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = slimtune.adapt(transformers.LlamaForCausalLM(config),
                           slimtune.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    assert any(lean_layers.installed(m) for m in model.modules())
    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    assert compile_layers(model, backend=counting) == 6
    assert not any(lean_layers.installed(m) for layer in model.model.layers for m in layer.modules())
    assert all(in_compiled_region(m) for layer in model.model.layers for m in layer.modules())  # no work ahead
    assert not in_compiled_region(model.lm_head)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(graphs) == 2


def _outputs_that_are_intermediates(gm: torch.fx.GraphModule) -> tuple[int, list[str]]:
    """``(Functions seen, problems)`` in a Dynamo graph: each ``autograd.Function`` Dynamo traced (its
    ``autograd_function_apply`` node and forward subgraph), and each output the graph reads whose traced value is the
    very tensor object of another node of that forward — what torch 2.11 gives zero gradients
    (:mod:`slimtune.core.tracing`)."""
    seen, problems = 0, []
    for node in gm.graph.nodes:
        if node.target is not torch.ops.higher_order.autograd_function_apply:
            continue
        seen += 1
        forward = getattr(gm, node.args[0].target)
        nodes = list(forward.graph.nodes)
        returned = next(n for n in nodes if n.op == "output").args[0][0]
        returned = returned if isinstance(returned, (tuple, list)) else (returned,)
        read = sorted({user.args[1] for user in node.users if user.target is operator.getitem})
        for index in read:
            out = returned[index]
            value = out.meta.get("example_value") if isinstance(out, torch.fx.Node) else None
            same = [n.name for n in nodes
                    if n is not out and value is not None and n.meta.get("example_value") is value]
            if same:
                problems.append(f"{node.args[0].target}: output {index} ({out.name}) is also {same}")
    return seen, problems


@pytest.mark.parametrize("case", list(CASES))
def test_no_function_returns_one_of_its_intermediates_while_traced(case):
    """Every adapter Function's output, as Dynamo traces it, is a tensor of its own: not the object of another node of
    its forward (an in-place op's result, ``out=``, ``.to`` to the same dtype). Under torch 2.11 such an output gets
    zero gradients (compiled DoRA did not train on the lent GPUs, RESULTS.md run 146); under 2.13 it does not, so
    this test reads the traced graph itself. It fails loudly where Dynamo stops showing the Functions it traces."""
    model, x = _adapted(case)
    seen, problems = [], []

    def inspecting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        found, bad = _outputs_that_are_intermediates(gm)
        seen.append(found)
        problems.extend(bad)
        return gm.forward

    torch.compiler.reset()
    torch.compile(_loss, fullgraph=True, backend=inspecting)(model, x).backward()
    if case.startswith("dora"):
        assert sum(seen), "Dynamo's graph shows no autograd_function_apply for DoRA's Functions: update this test"
    assert not problems, problems
