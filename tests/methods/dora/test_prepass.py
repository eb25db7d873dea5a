"""DoRA's step vectors formed in one launch per forward (``slimtune.methods.dora.prepass``): the kernel against the
per-layer path under ``TRITON_INTERPRET=1`` (fp32 / fp16; the interpreter mishandles bf16), a model's steps with
the pre-pass on and off, when a layer must not use its ticket, and — on a GPU — bf16 against the float64 definition
and the exact start."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune
from slimtune.methods.dora import prepass as P

from ...helpers import dora_layer_errors, run_interpreted

SCRIPT = r"""
import json, torch
from torch import nn
import slimtune
from slimtune.methods.dora import DoraLinear, prepass as P
from slimtune.methods.dora.norm import dora_vectors_reference, factored_norm_parts, magnitude_floor
from tests.helpers import rel_err

results = {}


class Block(nn.Module):  # q/k/v read one input (a sibling group), o alone, up/down of other widths
    def __init__(self, d=48, f=136):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, 24, bias=False), nn.Linear(d, 24, bias=False)
        self.o, self.up, self.down = nn.Linear(d, d, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d)

    def forward(self, x):
        h = self.o(self.q(x) * torch.cat([self.k(x), self.v(x)], -1))
        return x + self.down(torch.tanh(self.up(h)))


def perturb(model):  # B away from zero, magnitudes away from the norms
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))


def build(dtype, recompute, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(Block(), Block()).to(dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=8, alpha=16, target_modules=["q", "k", "v", "o", "up", "down"],
                                              use_dora=True, dora_recompute=recompute, lora_dropout=dropout,
                                              rank_pattern={"1.up": 20, "0.k": 3}))
    perturb(model)
    with torch.no_grad():
        model[0].q.magnitude[2] = 0.0  # floored where the layer keeps its output
    return model


def layers(model):
    return [m for m in model.modules() if isinstance(m, DoraLinear)]


def steps(model, x, n=3):
    out = []
    opt = torch.optim.SGD(slimtune.trainable_parameters(model), lr=0.05)
    for _ in range(n):
        y = model(x)
        y.float().pow(2).mean().backward()
        out.append((y.detach().clone(), [p.grad.clone() for p in slimtune.trainable_parameters(model)]))
        opt.step()
        opt.zero_grad()
    return out


for dtype in (torch.float32, torch.float16):
    name = str(dtype).split(".")[-1]
    for recompute in (False, True, "auto", "dropout"):  # dropout: every layer alone, on the "z" route
        runs = {}
        for on in (True, False):
            P.set_dora_prepass(on)
            model = build(dtype, recompute if recompute != "dropout" else False,
                          dropout=0.1 if recompute == "dropout" else 0.0)
            x = torch.randn(2, 7, 48).to(dtype)
            runs[on] = steps(model, x)
            tickets = sum(layer.prepass_slot.ticket is not None for layer in layers(model))
            results[f"{name}/{recompute}/tickets/{on}"] = tickets
        results[f"{name}/{recompute}/steps"] = max(
            max([rel_err(ya, yb)] + [rel_err(ga, gb) for ga, gb in zip(gas, gbs)])
            for (ya, gas), (yb, gbs) in zip(runs[True], runs[False]))
P.set_dora_prepass(True)

# convolutions (DoraConv: z kept, no floor): 3x3 with a bias and 1x1 without, beside a Linear head
def build_conv(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.Tanh(), nn.Conv2d(10, 8, 1, bias=False),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 12, bias=False)).to(dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=4, alpha=8, target_modules=["0", "2", "4"], use_dora=True))
    perturb(model)
    return model


for dtype in (torch.float32, torch.float16):
    name = str(dtype).split(".")[-1]
    runs = {}
    for on in (True, False):
        P.set_dora_prepass(on)
        model = build_conv(dtype)
        runs[on] = steps(model, torch.randn(3, 6, 5, 5).to(dtype))
        results[f"{name}/conv/tickets/{on}"] = sum(m.prepass_slot.ticket is not None for m in model
                                                   if hasattr(m, "prepass_slot"))
    results[f"{name}/conv/steps"] = max(
        max([rel_err(ya, yb)] + [rel_err(ga, gb) for ga, gb in zip(gas, gbs)])
        for (ya, gas), (yb, gbs) in zip(runs[True], runs[False]))
    P.set_dora_prepass(True)
    model = build_conv(dtype, seed=5)
    formed = []
    for i in (0, 2):
        model[i].weight_norm = lambda w, _f=model[i].weight_norm: formed.append(1) or _f(w)
    model(torch.randn(2, 6, 5, 5).to(dtype))
    results[f"{name}/conv/norms formed"] = len(formed)
    for i in (0, 2):
        layer = model[i]
        w = layer.base_layer.weight.double().reshape(layer.base_layer.weight.shape[0], -1)
        a, b = (t.double() for t in layer.factors2d())
        mixed, gram = factored_norm_parts(w, a)
        want = dora_vectors_reference(mixed, gram, b, (w * w).sum(1), layer.magnitude.double(), layer.scaling, 0.0)
        results[f"vec/{name}/conv{i}"] = rel_err(layer.prepass_slot.ticket.vectors, want)

# with the pre-pass on, no layer forms a norm of its own: not the grouped q/k/v, not o, not the biased down ("z")
from slimtune.methods.dora import function as DF, group as DG
calls = []
for module in (DF, DG):
    for name in ("vectors_and_compose", "dora_vectors"):
        if hasattr(module, name):
            original = getattr(module, name)
            setattr(module, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
model = build(torch.float32, False, seed=4)
x = torch.randn(2, 7, 48)
steps(model, x, n=3)
calls.clear()
steps(model, x, n=1)
results["norms formed per layer, pre-pass on"] = len(calls)
P.set_dora_prepass(False)
steps(model, x, n=1)
results["norms formed per layer, pre-pass off"] = len(calls)
P.set_dora_prepass(True)

# a transformers model with gradient checkpointing (its layers keep outputs without deciding "auto"; the
# recomputation runs in backward): every call takes the vectors, and the step equals the per-layer one
from tests.toy_models import tiny_llama
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
grads = {}
for on in (True, False):
    P.set_dora_prepass(on)
    torch.manual_seed(0)
    llama = tiny_llama().train()
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llama = slimtune.adapt(llama, slimtune.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    calls.clear()
    llama(input_ids=ids, labels=ids).loss.backward()
    results[f"checkpointed llama norms formed/{on}"] = len(calls)
    grads[on] = [p.grad for p in slimtune.trainable_parameters(llama)]
P.set_dora_prepass(True)
results["checkpointed llama"] = max(rel_err(a, b) for a, b in zip(grads[True], grads[False]))

# each layer's vectors against the float64 per-layer definition (‖W‖² exact, the factored parts in float64)
for dtype in (torch.float32, torch.float16):
    model = build(dtype, False, seed=1)
    model(torch.randn(3, 48).to(dtype))
    for i, layer in enumerate(layers(model)):
        ticket = layer.prepass_slot.ticket
        w = layer.base_layer.weight.double()
        mixed, gram = factored_norm_parts(w, layer.lora_A.double())
        want = dora_vectors_reference(mixed, gram, layer.lora_B.double(), (w * w).sum(1), layer.magnitude.double(),
                                      layer.scaling, ticket.eps)
        ok = torch.isfinite(want)  # fp16 keeps z (no floor): 1/m of a zero m is infinite on both sides
        assert torch.equal(torch.isfinite(ticket.vectors), ok)
        results[f"vec/{str(dtype).split('.')[-1]}/{i}"] = rel_err(ticket.vectors[ok], want[ok])

# a parameter changed in place after the pre-pass, inside the forward: that layer forms its norm itself
for on in (True, False):
    P.set_dora_prepass(on)
    model = build(torch.float32, False, seed=2)
    target = model[1].o

    def change(mod, args):
        with torch.no_grad():
            mod.lora_B.mul_(1.5)

    target.register_forward_pre_hook(change)
    x = torch.randn(2, 5, 48)
    results[f"changed/{on}"] = model(x).detach()
results["changed"] = rel_err(results.pop("changed/True"), results.pop("changed/False"))
P.set_dora_prepass(True)

# after a forward, B swapped through .data (no version bump): a lone call of the layer does not take the ticket
model = build(torch.float32, False, seed=2)
x = torch.randn(2, 5, 48)
model(x)
layer = model[0].o
assert layer.prepass_slot.ticket is not None
layer.lora_B.data = layer.lora_B.data * 2
h = torch.randn(2, 5, 48)
y_ticket = layer(h).detach()
layer.prepass_slot.ticket = None
results["swapped"] = rel_err(y_ticket, layer(h).detach())

# vectors formed under torch.inference_mode serve calls inside it only (autograd cannot save inference tensors)
model = build(torch.float32, False, seed=6)
x = torch.randn(2, 5, 48)
with torch.inference_mode():
    y_inference = model(x)
with torch.no_grad():
    P.set_dora_prepass(False)
    y_plain = model(x)
    P.set_dora_prepass(True)
results["inference"] = rel_err(y_inference.clone(), y_plain)
formed = []
for layer in layers(model):  # a no-grad call takes the vectors, whatever its route's floor
    layer.weight_norm = lambda w, _f=layer.weight_norm: formed.append(1) or _f(w)
from slimtune.methods.dora import function as DF2
original = DF2.vectors_and_compose
DF2.vectors_and_compose = lambda *a, **k: formed.append(1) or original(*a, **k)
with torch.inference_mode():
    model(x)
DF2.vectors_and_compose = original
results["inference norms formed"] = len(formed)
layer = model[0].o
assert layer.prepass_slot.ticket is not None and layer.prepass_slot.ticket.inference
layer(torch.randn(2, 5, 48)).sum().backward()  # a lone training call: the per-layer path, no error
results["inference then training"] = float(layer.lora_A.grad.abs().sum() > 0)

# a layer not eligible (float64: no Triton path) becomes eligible once the model moves to float32 (.to swaps .data:
# the same parameter objects) — the "not eligible" remembered from the last forward does not stick
model = build(torch.float64, False, seed=7)
model(torch.randn(2, 5, 48, dtype=torch.float64))
results["float64 tickets"] = sum(layer.prepass_slot.ticket is not None for layer in layers(model))
model.to(torch.float32)
model(torch.randn(2, 5, 48))
results["float32 tickets after .to"] = sum(layer.prepass_slot.ticket is not None for layer in layers(model))

# a ticket outlives the forward: a checkpointed recomputation in backward uses the same vectors
model = build(torch.float32, False, seed=3)
x = torch.randn(2, 5, 48, requires_grad=True)
y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
y.pow(2).mean().backward()
plain = build(torch.float32, False, seed=3)
x2 = x.detach().clone().requires_grad_()
plain(x2).pow(2).mean().backward()
results["checkpoint"] = max(rel_err(x.grad, x2.grad), rel_err(model[0].q.lora_A.grad, plain[0].q.lora_A.grad))

# the kernel's vector loads (ALIGNED: 16-byte aligned addresses and rows) and its element-wise loads give the same
# vectors: a model of ranks 3 and 20 (B's rows 12 and 80 bytes apart in fp32) runs unaligned, one of rank 8 aligned
def uploaded_alignment(model):
    hooks = [h for h in model._forward_pre_hooks.values() if isinstance(h, P.VectorPrepass)]
    return [entry[2] for hook in hooks for entry in hook._uploaded.values()]


for name, model, width in (("unaligned", build(torch.float32, False, seed=1), 48),
                           ("aligned", nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=False)),
                            64)):
    if name == "aligned":
        torch.manual_seed(4)
        slimtune.adapt(model, slimtune.LoraConfig(r=8, alpha=16, target_modules=["0", "1"], use_dora=True))
        perturb(model)
    model(torch.randn(3, width))
    results[f"alignment/{name}"] = uploaded_alignment(model)
    errors = []
    for layer in layers(model):
        ticket = layer.prepass_slot.ticket
        w = layer.base_layer.weight.double()
        mixed, gram = factored_norm_parts(w, layer.lora_A.double())
        want = dora_vectors_reference(mixed, gram, layer.lora_B.double(), (w * w).sum(1), layer.magnitude.double(),
                                      layer.scaling, ticket.eps)
        errors.append(rel_err(ticket.vectors, want))
    results[f"alignment/{name}/error"] = max(errors)
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(SCRIPT, timeout=600)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 3e-3)])
def test_a_model_steps_alike_with_and_without_the_prepass(interpreted, dtype, tol):
    for recompute in ("False", "True", "auto", "dropout"):
        assert interpreted[f"{dtype}/{recompute}/tickets/True"] == 12
        assert interpreted[f"{dtype}/{recompute}/tickets/False"] == 0
        assert interpreted[f"{dtype}/{recompute}/steps"] < tol, recompute


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 1e-3)])
def test_prepass_vectors_match_the_float64_definition(interpreted, dtype, tol):
    """fp16 magnitudes compare with ‖V‖ rounded to fp16 (``norm.in_magnitude_precision``), as the per-layer path does:
    the float64 definition does not round."""
    errors = {k: v for k, v in interpreted.items() if k.startswith(f"vec/{dtype}/")}
    assert len(errors) == 14  # 12 Linear layers, 2 convolutions
    assert all(e < tol for e in errors.values()), errors


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 3e-3)])
def test_convolutions_step_alike_with_and_without_the_prepass(interpreted, dtype, tol):
    assert interpreted[f"{dtype}/conv/tickets/True"] == 3 and interpreted[f"{dtype}/conv/tickets/False"] == 0
    assert interpreted[f"{dtype}/conv/steps"] < tol
    assert interpreted[f"{dtype}/conv/norms formed"] == 0  # both convolutions took the pre-pass's vectors


def test_with_the_prepass_no_layer_forms_its_own_norm(interpreted):
    assert interpreted["checkpointed llama norms formed/True"] == 0
    assert interpreted["checkpointed llama norms formed/False"] == 28  # 14 layers, forward and recomputation
    assert interpreted["checkpointed llama"] < 1e-5
    assert interpreted["norms formed per layer, pre-pass on"] == 0
    assert interpreted["norms formed per layer, pre-pass off"] == 12  # every layer, the biased one's z route too


def test_aligned_and_unaligned_tables_give_the_definitions_vectors(interpreted):
    assert interpreted["alignment/unaligned"] == [False] and interpreted["alignment/aligned"] == [True]
    assert interpreted["alignment/unaligned/error"] < 1e-6 and interpreted["alignment/aligned/error"] < 1e-6


def test_a_parameter_changed_inside_the_forward_is_seen(interpreted):
    assert interpreted["changed"] < 1e-6


def test_a_storage_swapped_through_data_is_seen(interpreted):
    assert interpreted["swapped"] < 1e-7


def test_inference_mode_vectors_serve_inference_calls_only(interpreted):
    assert interpreted["inference"] < 1e-6
    assert interpreted["inference norms formed"] == 0
    assert interpreted["inference then training"] == 1.0


def test_a_layer_that_was_not_eligible_becomes_eligible_after_to(interpreted):
    assert interpreted["float64 tickets"] == 0
    assert interpreted["float32 tickets after .to"] == 12


def test_checkpointed_recomputation_matches_the_plain_step(interpreted):
    assert interpreted["checkpoint"] < 1e-5


def test_no_ticket_without_triton_or_for_ineligible_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 4, bias=False))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    model(torch.randn(3, 8))
    assert all(m.prepass_slot is not None and m.prepass_slot.ticket is None for m in (model[0], model[1]))
    # the host's eligibility rules, asked directly
    entry = P._read_entry(model[0], (model[0].base_layer.weight, model[0].lora_A, model[0].lora_B,
                                     model[0].magnitude))
    assert entry.key is None  # CPU tensors without the interpreter: not eligible, the per-layer path


def test_switching_the_prepass_off_drops_the_last_forwards_tickets():
    model = nn.Sequential(nn.Linear(8, 6, bias=False))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    slot = model[0].prepass_slot
    slot.ticket = object()  # as if a forward had formed one
    try:
        slimtune.set_dora_prepass(False)
        model(torch.randn(3, 8))
        assert slot.ticket is None
    finally:
        slimtune.set_dora_prepass(True)


def test_set_dora_prepass_takes_a_bool():
    with pytest.raises(TypeError, match="True or False"):
        slimtune.set_dora_prepass("yes")


def test_unloading_drops_the_hook():
    model = nn.Sequential(nn.Linear(8, 6, bias=False))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert len(model._forward_pre_hooks) >= 1
    slimtune.unload(model)
    assert not any(isinstance(h, P.VectorPrepass) for h in model._forward_pre_hooks.values())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("rank", [8, 32, 128])
def test_prepass_layers_on_the_gpu_match_the_definition(dtype, tol, rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 1000, bias=False), nn.Linear(1000, 200, bias=False)).to("cuda", dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=rank, alpha=rank, target_modules=["0", "1"], use_dora=True,
                                              dora_recompute=False))
    for layer in model:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
            layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
    layer = model[0]
    x = torch.randn(4, 300, 384, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)  # alone: no pre-pass ran
    assert layer.prepass_slot.ticket is None
    model(x)  # the root's forward forms every layer's vectors
    assert all(m.prepass_slot.ticket is not None for m in model)
    y = layer(x)  # the ticket still holds: the layer uses it
    dy = torch.randn_like(y)
    y.backward(dy)
    errors = dora_layer_errors(layer, x, y, dy)
    assert all(e < tol for e in errors.values()), errors


@cuda
def test_fresh_bf16_model_with_the_prepass_computes_its_base_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False)).to("cuda", torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        base = model(x)
    slimtune.adapt(model, slimtune.LoraConfig(r=16, alpha=32, target_modules=["0", "1"], use_dora=True,
                                              dora_recompute=False))
    y = model(x)
    assert all(m.prepass_slot.ticket is not None for m in model)
    assert torch.equal(y, base)


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
def test_prepass_convolutions_on_the_gpu_match_the_definition(dtype, tol):
    """A DoRA Conv2d taking the pre-pass's vectors: output and gradients against DoRA's float64 definition,
    ``conv(x, g ⊙ (W + s·B A)) + b`` with the norm detached. cuDNN's TF32 is off: by default it runs float32
    convolutions in TF32 (2.9e-4 on the conv's gradients, RESULTS.md run 75), which is not this path's rounding."""
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _check_conv_against_definition(dtype, tol)
    finally:
        torch.backends.cudnn.allow_tf32 = allow


def _check_conv_against_definition(dtype: torch.dtype, tol: float) -> None:
    from ...helpers import rel_err

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1)).to("cuda", dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=8, alpha=16, target_modules=["0"], use_dora=True))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
    x = torch.randn(2, 32, 12, 12, device="cuda", dtype=dtype, requires_grad=True)
    y = model(x)
    assert layer.prepass_slot.ticket is not None
    dy = torch.randn_like(y)
    y.backward(dy)
    base = layer.base_layer
    params = [p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    a, b, m = params
    v = base.weight.double() + layer.scaling * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).view_as(
        base.weight)
    g = m.reshape(-1) / v.reshape(v.shape[0], -1).norm(dim=1).detach()
    x64 = x.detach().double().requires_grad_()
    ref = torch.nn.functional.conv2d(x64, g.view(-1, 1, 1, 1) * v, base.bias.double(), padding=1)
    ref.backward(dy.double())
    errors = [rel_err(y, ref), rel_err(x.grad, x64.grad)] + [
        rel_err(p.grad, q.grad) for p, q in zip((layer.lora_A, layer.lora_B, layer.magnitude), params)]
    assert all(e < tol for e in errors), errors


@pytest.mark.skipif(not P.HAS_TRITON, reason="triton is not installed")
def test_layers_in_a_compiled_region_are_left_out(monkeypatch):
    """A layer inside a region that ``compile_layers`` compiled takes the trace-safe path, which never reads a ticket:
    the pre-pass reads no table row for it (the rest of the model keeps its rows)."""
    from slimtune.core.tracing import in_compiled_region, mark_compiled

    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 4, bias=False))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    mark_compiled(model[1])
    assert in_compiled_region(model[1].base_layer) and not in_compiled_region(model[0])
    read, real = [], P._read_entry
    monkeypatch.setattr(P, "_read_entry", lambda layer, objects: read.append(layer) or real(layer, objects))
    model(torch.randn(3, 8))
    assert read == [model[0]]
