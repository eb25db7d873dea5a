"""Injection: target selection, patterns, freezing, summary, and the errors for bad input."""
import pytest
import torch
from torch import nn

import slimtune
from slimtune import ConfigError, LoraConfig, TargetError
from slimtune.methods.lora import LoraConv, LoraLinear


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv2d(3, 4, 3)
        self.lm_head = nn.Linear(16, 10)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        for block in self.layers:
            x = x + block.mlp(block.norm(block.q_proj(x) + block.v_proj(x)))
        return self.lm_head(x)


def names(model, cls=(LoraLinear, LoraConv)):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def test_suffix_list_regex_and_all_linear():
    assert names(slimtune.adapt(Net(), LoraConfig(target_modules=["q_proj"]))) == [
        "layers.0.q_proj", "layers.1.q_proj"]
    assert names(slimtune.adapt(Net(), LoraConfig(target_modules=r"layers\.1\.(q|v)_proj"))) == [
        "layers.1.q_proj", "layers.1.v_proj"]
    got = names(slimtune.adapt(Net(), LoraConfig(target_modules="all-linear")))
    assert "lm_head" not in got and "conv" not in got and len(got) == 8
    assert names(slimtune.adapt(Net(), LoraConfig(target_modules=["conv"]))) == ["conv"]


def test_exclude_modules():
    m = slimtune.adapt(Net(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.v_proj"]))
    assert names(m) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]


def test_rank_and_alpha_patterns():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, alpha=8,
                     rank_pattern={r"layers\.1\.q_proj": 2, "v_proj": 6}, alpha_pattern={"q_proj": 1})
    m = slimtune.adapt(Net(), cfg)
    assert m.layers[0].q_proj.r == 4 and m.layers[1].q_proj.r == 2 and m.layers[0].v_proj.r == 6
    assert m.layers[0].q_proj.scaling == 1 / 4 and m.layers[1].v_proj.scaling == 8 / 6
    assert m.layers[1].q_proj.lora_A.shape == (2, 16)


def test_only_adapters_train_and_summary():
    m = slimtune.adapt(Net(), LoraConfig(target_modules=["q_proj"], r=2))
    trainable = slimtune.trainable_parameters(m)
    assert len(trainable) == 4 and all(p.requires_grad for p in trainable)
    assert not m.lm_head.weight.requires_grad and not m.layers[0].norm.weight.requires_grad
    line = slimtune.summary(m)
    assert line.startswith("trainable params: 128 ||") and "trainable%" in line
    m(torch.randn(3, 16)).sum().backward()
    assert m.lm_head.weight.grad is None and m.layers[0].q_proj.lora_A.grad is not None


def test_adapting_twice_is_an_error():
    m = slimtune.adapt(Net(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TargetError, match="already adapted"):
        slimtune.adapt(m, LoraConfig(target_modules=["v_proj"]))


def test_target_matching_nothing_names_the_candidates():
    with pytest.raises(TargetError, match=r"matched no module.*q_proj"):
        slimtune.adapt(Net(), LoraConfig(target_modules=["query"]))
    with pytest.raises(TargetError, match="regex over the full module name"):
        slimtune.adapt(Net(), LoraConfig(target_modules="q_proj"))


def test_non_linear_target_is_named():
    with pytest.raises(TargetError, match=r"'layers.0.norm' is a LayerNorm"):
        slimtune.adapt(Net(), LoraConfig(target_modules=["norm"]))
    with pytest.raises(TargetError, match=r"'layers.0.mlp' is a Sequential"):
        slimtune.adapt(Net(), LoraConfig(target_modules=["mlp"]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive"), (dict(r=-3), "positive"), (dict(r=2.5), "integer"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"), (dict(dropout=1.0), "dropout"),
    (dict(init="pissa-fast"), "init"), (dict(alpha="big"), "alpha"), (dict(target_modules=[]), "empty"),
    (dict(target_modules=None), "required"), (dict(target_modules="("), "regular expression"),
    (dict(adapter_dtype=torch.int8), "adapter_dtype"),
])
def test_bad_config_values(kwargs, match):
    kwargs.setdefault("target_modules", ["q_proj"])
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_failed_adapt_leaves_model_unchanged():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 3, groups=4)

    m = Grouped()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="divisible"):
        slimtune.adapt(m, LoraConfig(target_modules=["a", "b"], r=2))
    assert all(p.requires_grad for p in m.parameters())
    assert isinstance(m.a, nn.Conv2d) and not hasattr(m, "slimtune_config")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_merge_on_unadapted_model_is_an_error():
    with pytest.raises(slimtune.SlimtuneError, match="no slimtune adapters"):
        slimtune.merge(Net())


def test_adapters_take_the_train_or_eval_mode_of_the_layer_they_replace():
    m = Net().eval()
    slimtune.adapt(m, LoraConfig(target_modules=["q_proj"], dropout=0.5))
    assert not m.layers[0].q_proj.training
    x = torch.randn(2, 16)
    assert torch.equal(m(x), m(x))  # no dropout in eval mode


def test_unloading_a_deep_copy_leaves_the_original_alone():
    """The model-level hooks' removers are plain objects: a deep copy gets removers of its own hooks and lean layers,
    so unloading the copy leaves the original's (before, it removed the original's and left the copy's)."""
    import copy

    from slimtune.core.lean_layers import installed
    from tests.toy_models import tiny_llama

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = slimtune.adapt(tiny_llama().train(), slimtune.LoraConfig(r=4, target_modules=targets, use_dora=True))

    def state(m):
        return (len(m._forward_pre_hooks), len(m._forward_hooks), sum(installed(x) for x in m.modules()),
                sum(getattr(x, "siblings", None) is not None for x in m.modules()))

    before = state(model)
    assert all(before)
    twin = copy.deepcopy(model)
    assert state(twin) == before
    slimtune.unload(twin)
    assert state(model) == before
    assert state(twin) == (0, 0, 0, 0)


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "hra"])
def test_a_whole_adapted_model_pickles(method):
    """``torch.save(model)`` / ``torch.load`` of an adapted model after training steps: the loaded model gives the
    same outputs, trains, and unloads its own hooks. (The hooks' removers, caches and hand-off marks carry no weak
    reference or closure into the pickle: a copied mark or stamp never matches, a copied cache starts empty.)"""
    import io

    from tests.toy_models import tiny_llama

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {"lora": lambda: slimtune.LoraConfig(r=4, target_modules=targets),
              "dora": lambda: slimtune.LoraConfig(r=4, target_modules=targets, use_dora=True),
              "loha": lambda: slimtune.LohaConfig(r=4, target_modules=targets),
              "lokr": lambda: slimtune.LokrConfig(r=4, target_modules=targets),
              "hra": lambda: slimtune.HraConfig(r=4, target_modules=targets)}[method]()
    torch.manual_seed(0)
    model = slimtune.adapt(tiny_llama().train(), config)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    loaded(input_ids=ids, labels=ids).loss.backward()
    slimtune.unload(loaded)
    assert not loaded._forward_pre_hooks and len(model._forward_pre_hooks) >= (1 if method in ("dora", "hra") else 0)
