"""DoRA layers (Linear, transformers Conv1D, Conv1d, Conv2d) against DoRA's dense definition in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune
from slimtune.methods.dora import DoraConv, DoraLinear
from tests.helpers import BF16_TOL, FP32_TOL, check_merge_round_trip, rel_err


def _conv1d_hf(d_in, d_out):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(d_out, d_in)  # weight [d_in, d_out]


BASES = {
    "linear": (lambda: nn.Linear(24, 20), (3, 5, 24)),
    "linear_nobias": (lambda: nn.Linear(24, 20, bias=False), (7, 24)),
    "hf_conv1d": (lambda: _conv1d_hf(24, 20), (2, 5, 24)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 9)),
    "conv2d_strided_dilated": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), (2, 6, 9, 11)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 8, 1, bias=False), (2, 6, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, padding=2, stride=2), (2, 6, 17)),
}


def dora_reference(base: nn.Module, x, a, b, m, s):
    """``base`` with weight ``g·(W + s·B A)``, g = m / ‖W + s·B A‖_row (norm detached), in x's dtype."""
    w = base.weight.to(x.dtype)
    fan_in_fan_out = not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d))
    w2 = w.t() if fan_in_fan_out else w.reshape(w.shape[0], -1)
    v = w2 + s * b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    wp = (m.reshape(-1) / v.norm(dim=1).detach())[:, None] * v
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, wp.reshape(w.shape), bias, base.stride, base.padding, base.dilation)
    if isinstance(base, nn.Conv1d):
        return F.conv1d(x, wp.reshape(w.shape), bias, base.stride, base.padding, base.dilation)
    return F.linear(x, wp, bias)


def make(kind: str, dtype=torch.float32, adapter_dtype=None, r=4, seed=0, perturb=True):
    torch.manual_seed(seed)
    make_base, shape = BASES[kind]
    model = nn.Sequential(make_base()).to(dtype)
    slimtune.adapt(model, slimtune.LoraConfig(r=r, alpha=6, target_modules=["0"], use_dora=True,
                                              adapter_dtype=adapter_dtype))
    layer = model[0]
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen).to(layer.magnitude.dtype))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    return layer, x


def check_against_reference(layer, x, tol):
    x = x.clone().requires_grad_()
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    y.backward(dy)
    params = (layer.lora_A, layer.lora_B, layer.magnitude)
    leaves = [p.detach().double().requires_grad_() for p in params]
    x64 = x.detach().double().requires_grad_()
    ref = dora_reference(layer.base_layer, x64, *leaves, layer.scaling)
    ref.backward(dy.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    errors = {"y": rel_err(y, ref), "x": rel_err(x.grad, x64.grad)}
    errors.update({name: rel_err(p.grad, leaf.grad) for name, p, leaf in zip("ABm", params, leaves)})
    assert all(e < tol for e in errors.values()), errors
    for p in params:
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_matches_dense_definition(kind, dtype, tol):
    layer, x = make(kind, dtype)
    assert isinstance(layer, DoraConv if "conv" in kind and "hf" not in kind else DoraLinear)
    check_against_reference(layer, x, tol)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fp32_master_weights_with_bf16_base(kind):
    layer, x = make(kind, torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.magnitude.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    check_against_reference(layer, x, BF16_TOL)


def test_autocast_bf16_over_fp32_base():
    layer, x = make("linear")
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ref = dora_reference(layer.base_layer, x.detach().double(), layer.lora_A.double(), layer.lora_B.double(),
                         layer.magnitude.double(), layer.scaling)
    assert rel_err(y, ref) < BF16_TOL
    assert layer.magnitude.grad.dtype == torch.float32


def test_near_unity_magnitudes_keep_fp32_accuracy():
    """g − 1 ~ 1e-6: the rescaling must still show, at fp32 accuracy (no cancellation)."""
    layer, x = make("linear", perturb=False)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1e-4)
        norm = layer.weight_norm(layer.base_layer.weight)
        layer.magnitude.copy_(norm * (1 + 1e-6 * torch.randn(norm.shape)))
    check_against_reference(layer, x, 1e-6)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_fresh_layer_computes_its_base(kind):
    layer, x = make(kind, perturb=False)
    w2 = layer.weight2d(layer.base_layer.weight)
    assert w2.shape[0] == layer.magnitude.numel()
    assert torch.allclose(layer.magnitude.reshape(-1), w2.norm(dim=1), rtol=1e-6)
    with torch.no_grad():
        assert rel_err(layer(x), layer.base_layer(x)) < 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_no_grad_forward_equals_training_forward(kind):
    layer, x = make(kind)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y.detach())
    with slimtune.disable_adapters(nn.Sequential(layer)):
        assert torch.equal(layer(x), layer.base_layer(x))


def _dropped(x: torch.Tensor, kind: str, p: float) -> torch.Tensor:
    """The dropped input the layer used after ``torch.manual_seed(5)``: Linear redraws its mask from a seed
    (:func:`slimtune.core.lowrank.dropout_keep_mask`), convolutions call ``F.dropout``."""
    torch.manual_seed(5)
    if kind != "linear":
        return F.dropout(x, p, training=True)
    from slimtune.core.lowrank import dropout_keep_mask

    seed = int(torch.randint(0, 2**62, (1,)).item())
    return x * dropout_keep_mask(x.reshape(-1, x.shape[-1]), p, seed).reshape(x.shape)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dropout_is_pefts_formula(kind, recompute):
    """Training with dropout: ``base(x) + (g−1)·base_nobias(drop(x)) + g·s·lora(drop(x))``, as PEFT; gradients
    through that formula in float64."""
    layer, x = make(kind)
    layer.dropout_p, layer.recompute = 0.3, recompute
    layer.train()
    x = x.requires_grad_()
    torch.manual_seed(5)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    y.backward(dy)
    base = layer.base_layer
    x64 = x.detach().double().requires_grad_()
    leaves = [p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    a, b, m = leaves
    w, bias = base.weight.double(), base.bias.double()
    xd = _dropped(x64, kind, 0.3)
    w2, a2, b2 = layer.weight2d(w), a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    g = m.reshape(-1) / (w2 + layer.scaling * b2 @ a2).norm(dim=1).detach()
    if kind == "linear":
        base_x, base_d = F.linear(x64, w, bias), F.linear(xd, w)
        lora_d = F.linear(F.linear(xd, a), b)
    else:
        geometry = (base.stride, base.padding, base.dilation)
        base_x, base_d = F.conv2d(x64, w, bias, *geometry), F.conv2d(xd, w, None, *geometry)
        lora_d = F.conv2d(F.conv2d(xd, a, None, *geometry), b)
        g = g.view(1, -1, 1, 1)
    ref = base_x + (g - 1) * base_d + g * layer.scaling * lora_d
    ref.backward(dy.double())
    assert rel_err(y, ref) < FP32_TOL
    assert rel_err(x.grad, x64.grad) < FP32_TOL
    for p, leaf in zip((layer.lora_A, layer.lora_B, layer.magnitude), leaves):
        assert rel_err(p.grad, leaf.grad) < FP32_TOL


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "conv2d", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(kind, dtype):
    layer, x = make(kind, dtype)
    y = check_merge_round_trip(layer, x)
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("recompute", [False, True])
def test_norm_is_computed_once_per_forward_and_weight_norms_are_cached(monkeypatch, recompute):
    from slimtune.methods.dora.norm import factored_norm_parts, weight_row_norm_sq

    calls = {"norm": 0, "weight": 0}
    real_norm, real_weight = factored_norm_parts, weight_row_norm_sq

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    # every place that calls them: the norm module itself, the Linear product, the layer's cache
    norm, weight = count("norm", real_norm), count("weight", real_weight)
    for where in ("slimtune.methods.dora.norm", "slimtune.methods.dora.product"):
        monkeypatch.setattr(f"{where}.factored_norm_parts", norm)
        monkeypatch.setattr(f"{where}.weight_row_norm_sq", weight)
    monkeypatch.setattr("slimtune.methods.dora.module.weight_row_norm_sq", weight)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0", "2"], use_dora=True,
                                              dora_recompute=recompute))
    assert calls == {"norm": 2, "weight": 2}  # the magnitude's init
    x = torch.randn(4, 12)
    for _ in range(3):
        model(x).sum().backward()
    assert calls == {"norm": 2 + 6, "weight": 2}, "one norm per layer per step (backward too), ‖W‖² from the cache"
    with torch.no_grad():
        model[0].base_layer.weight.mul_(2)  # an in-place change of W is seen
    model(x)
    assert calls == {"norm": 10, "weight": 3}
    slimtune.merge(model)
    slimtune.unmerge(model)
    model(x)
    assert calls["weight"] == 5


def test_grouped_conv_and_bad_flag_are_refused():
    with pytest.raises(slimtune.ConfigError, match="grouped"):
        slimtune.adapt(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)),
                       slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(slimtune.ConfigError, match="use_dora"):
        slimtune.LoraConfig(r=2, target_modules=["0"], use_dora="yes")


def test_peft_parameters_and_shapes():
    lin, _ = make("linear")
    conv, _ = make("conv2d")
    assert set(lin.peft_parameters()) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert lin.magnitude.shape == (20,) and conv.magnitude.shape == (1, 8, 1, 1)
    assert "magnitude" in dict(lin.named_parameters())


def test_dora_recompute_gives_the_same_gradients_and_saves_no_product():
    from torch.autograd.graph import saved_tensors_hooks

    import slimtune

    def build(recompute):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 48))
        slimtune.adapt(net, slimtune.LoraConfig(r=4, target_modules=["0"], use_dora=True, dora_recompute=recompute))
        with torch.no_grad():
            net[0].lora_B.normal_()
        return net

    x = torch.randn(6, 32, requires_grad=True)
    grads = []
    for recompute in (False, True):
        net = build(recompute)
        packed = []
        with saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            y = net(x)
        big = [t for t in packed if t.shape == (6, 48)]
        assert bool(big) != recompute  # the [N, d_out] product is kept only without recompute
        y.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad] + [x.grad.clone()])
        x.grad = None
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# -- a 4-bit base, through a stand-in handle ------------------------------------------------------------------
class FakeQuantizedWeight:
    """A :class:`slimtune.core.frozen.QuantizedWeight` stand-in over a dense float tensor: ``dequantize`` returns a
    fresh copy, counts the calls and keeps a weak reference to each copy (to check that none outlives its use)."""

    def __init__(self, dense: torch.Tensor) -> None:
        self.dense, self.calls, self.copies = dense, 0, []

    shape = property(lambda self: self.dense.shape)
    dtype = property(lambda self: self.dense.dtype)
    device = property(lambda self: self.dense.device)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        import weakref

        self.calls += 1
        copy = self.dense.to(dtype, copy=True)
        self.copies.append(weakref.ref(copy))
        return copy

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.copies)


@pytest.fixture
def quant_registry():
    """Registers 4-bit layer providers (``register(provider)``) for one test and takes them back after it."""
    from slimtune.core.frozen import register_quantized_layer

    undo = []
    yield lambda provider: undo.append(register_quantized_layer(provider))
    for unregister in undo:
        unregister()


def _quantized_pair(register, dtype=torch.float32, bias=True, recompute=False):
    """The same DoRA Linear twice: on a dense base, and on a "4-bit" base whose ``weight`` is a packed uint8
    buffer ``[n/2, 1]`` (as NF4 stores it) with the dense values reachable only through the handle."""
    import copy

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(24, 20, bias=bias)).to(dtype)
    slimtune.adapt(dense, slimtune.LoraConfig(r=4, alpha=6, target_modules=["0"], use_dora=True,
                                              dora_recompute=recompute))
    with torch.no_grad():
        dense[0].lora_B.normal_(0, 0.2)
        dense[0].magnitude.mul_(1.1)
    quant = copy.deepcopy(dense)
    base = quant[0].base_layer
    handle = FakeQuantizedWeight(base.weight.detach().clone())
    del base.weight
    base.register_buffer("weight", torch.zeros(24 * 20 // 2, 1, dtype=torch.uint8))
    register(lambda m: handle if m is base else None)
    return dense[0], quant[0], handle


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_base_equals_dense_and_keeps_no_dense_copy(quant_registry, dtype, recompute):
    from torch.autograd.graph import saved_tensors_hooks

    dense, quant, handle = _quantized_pair(quant_registry, dtype, recompute=recompute)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    dy = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for layer in (dense, quant):
        xx = x.clone().requires_grad_()
        for step in range(2):
            for p in (layer.lora_A, layer.lora_B, layer.magnitude):
                p.grad = None
            xx.grad = None
            calls = handle.calls
            saved = []
            with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = layer(xx)
            if layer is quant:
                assert handle.alive() == 0, "no dequantised copy outlives the forward"
                assert not [t for t in saved if tuple(t.shape) in ((20, 24), (24, 20))], "no dense W saved"
            y.backward(dy)
            if layer is quant:
                assert handle.alive() == 0
                # forward: one copy for the base GEMM and W Aᵀ (+ one for the cached ‖W‖² on the first step);
                # backward: one for dx (and one for the recomputed z)
                assert handle.calls - calls == 2 + (step == 0) + recompute
        results.append([y, xx.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad])
    for got, want in zip(*reversed(results)):
        assert torch.equal(got, want)


def test_quantized_base_refuses_merge(quant_registry):
    _, quant, _ = _quantized_pair(quant_registry)
    with pytest.raises(slimtune.SlimtuneError, match=r"dequantize\(model\)"):
        quant.merge()
    assert not quant.merged


# -- a transformers Llama: the output saved by DoRA is the tensor the next op saves, and nothing writes it -----
def test_tiny_llama_trains_with_saved_outputs_and_matches_recompute():
    """All seven projections: a training step runs (no in-place write to a saved output: autograd's version
    check would raise), gradients equal those of ``dora_recompute=True`` (which saves no output), and the
    gate/up outputs that SiLU and the product save are the very tensors DoRA saves (stored once)."""
    from torch.autograd.graph import saved_tensors_hooks

    from tests.helpers import perturb_adapters
    from tests.toy_models import llm_input, tiny_llama

    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    grads = []
    for recompute in (False, True):
        model = tiny_llama()
        slimtune.adapt(model, slimtune.LoraConfig(r=4, alpha=8, target_modules=proj, use_dora=True,
                                                  dora_recompute=recompute))
        perturb_adapters(model, seed=1)
        model.train()
        outputs = {}
        for name, module in model.named_modules():
            if isinstance(module, DoraLinear):
                module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model(llm_input(), labels=llm_input()).loss
        savers = {}
        for t in saved:
            savers[t.untyped_storage().data_ptr()] = savers.get(t.untyped_storage().data_ptr(), 0) + 1
        for name, out in outputs.items():
            count = savers.get(out.untyped_storage().data_ptr(), 0)
            shared = name.endswith(("gate_proj", "up_proj"))  # SiLU / the product save them too
            if recompute:
                assert count == int(shared), name
            else:
                assert count == 2 if shared else count >= 1, name  # with DoRA's own save: one storage
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    assert rel_err(grads[0], grads[1]) < FP32_TOL


def test_dora_recompute_by_name_and_its_validation():
    from slimtune.errors import ConfigError

    def layers(spec):
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Linear(4, 3))
        slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0", "2", "3"], use_dora=True,
                                                  dora_recompute=spec))
        return [model[i].recompute for i in (0, 2, 3)]

    assert layers(False) == [False] * 3 and layers(True) == [True] * 3
    assert layers(["2"]) == [False, True, False]  # suffixes, as target_modules
    assert layers(("0", "3")) == [True, False, True]
    assert layers(r"[23]") == [False, True, True]  # a regex string: full match of the qualified name
    for bad in (1, None, [1], [""], "(", {"q_proj": True}):
        with pytest.raises(ConfigError, match="dora_recompute"):
            slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True, dora_recompute=bad)
    with pytest.raises(ConfigError, match="use_dora"):
        slimtune.LoraConfig(r=2, target_modules=["0"], use_dora="yes")


# -- dora_recompute="auto": each layer measured once; keeps its output only where the output outlives forward --
def test_auto_recompute_on_tiny_llama_decides_per_layer_and_keeps_lora_memory():
    """First training step: every DoRA Linear recomputes (nothing of size [tokens, d_out] of its own is saved);
    from the second on, layers whose output the next op saves anyway (gate by SiLU, up by the product) keep it,
    the others (q, k, o, down: RoPE and the residual add save nothing of them) recompute.
    Gradients equal those of dora_recompute=True in every step, and no step saves more than recompute does."""
    from slimtune.memory.accounting import SavedTensorMeter
    from tests.helpers import perturb_adapters
    from tests.toy_models import llm_input, tiny_llama

    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    runs = {}
    for spec in ("auto", True):
        model = tiny_llama()
        config = slimtune.LoraConfig(r=4, alpha=8, target_modules=proj, use_dora=True)
        if spec is True:
            config = slimtune.LoraConfig(r=4, alpha=8, target_modules=proj, use_dora=True, dora_recompute=True)
        assert config.dora_recompute == spec
        slimtune.adapt(model, config)
        perturb_adapters(model, seed=1)
        model.train()
        layers = {name: m for name, m in model.named_modules() if isinstance(m, DoraLinear)}
        if spec == "auto":
            assert all(m.recompute is None for m in layers.values())
        saved, grads = [], []
        for _ in range(2):
            meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()])
            with meter.record():  # the profiler's meter only looks: it does not stop the measurement
                loss = model(llm_input(), labels=llm_input()).loss
            saved.append(meter.bytes)
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
            model.zero_grad(set_to_none=True)
        runs[spec] = (layers, saved, grads)
    layers, saved, grads = runs["auto"]
    keeps = {name.rsplit(".", 1)[-1] for name, m in layers.items() if m.recompute is False}
    recomputes = {name.rsplit(".", 1)[-1] for name, m in layers.items() if m.recompute is True}
    # gate / up: SiLU and the product save them. v is copied by repeat_kv (grouped-query attention) before the CPU
    # attention saves it, so here it recomputes too — the measurement, not a rule of thumb, decides
    assert keeps == {"gate_proj", "up_proj"}
    assert recomputes == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    assert saved == runs[True][1]  # both steps: exactly recompute's saved bytes
    for got, want in zip(grads, runs[True][2]):
        assert rel_err(got, want) < FP32_TOL


def test_auto_recompute_keeps_a_returned_output_and_respects_hooks():
    from torch.utils.checkpoint import checkpoint

    def net():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 10, bias=False))
        slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True))
        return model

    x = torch.randn(5, 12, requires_grad=True)
    model = net()
    y = model(x)  # the caller holds the output: keeping it costs nothing
    assert y.grad_fn.route == "recompute" and model[0].recompute is False
    y.sum().backward()
    assert model(x).grad_fn.route == "output"

    model = net()  # under saved-tensor hooks that own what is saved (checkpointing): keep, do not decide
    out = checkpoint(model, x, use_reentrant=False)
    out.sum().backward()
    assert model[0].recompute is None

    model = net()  # called below its root (the root's forward never ends here): recomputes, one pending entry
    for _ in range(3):
        assert model[0](x).grad_fn.route == "recompute"
    assert model[0].recompute is None and len(model[0].output_probe._pending) == 1
    with torch.no_grad():  # inference decides nothing, and the outputs watched outside the root are dropped
        model(x)
    assert model[0].recompute is None and not model[0].output_probe._pending
    model(x)  # a training forward of the root decides
    assert model[0].recompute is False


def test_auto_is_not_a_regex_and_biased_or_fp16_layers_keep_z():
    cfg = slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True)
    assert cfg.dora_recompute == "auto" and cfg.recompute_for("0") is None
    model = nn.Sequential(nn.Linear(6, 5))  # a bias: z is kept, auto does not apply
    slimtune.adapt(model, slimtune.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert model(torch.randn(3, 6)).grad_fn.route == "z"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fresh_layer_computes_its_base_bit_for_bit(dtype, kind):
    """The norm is compared with m at m's precision, so a fresh layer (V = W, m = ‖W‖ stored in the adapter dtype)
    has g = 1 exactly: bias-free, its output is the base's bit for bit, also with bf16 adapters."""
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(48, 40, bias=False)), torch.randn(6, 48)
    else:
        model, x = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=False)), torch.randn(2, 6, 5, 5)
    model, x = model.to(dtype), x.to(dtype)
    with torch.no_grad():
        base = model(x)
    slimtune.adapt(model, slimtune.LoraConfig(r=4, alpha=8, target_modules=["0"], use_dora=True))
    y = model(x)
    assert torch.equal(y, base)
    y.float().pow(2).sum().backward()
    assert model[0].lora_B.grad.abs().sum() > 0 and model[0].magnitude.grad is not None
