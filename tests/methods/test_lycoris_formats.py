"""LoHa and LoKr checkpoints in PEFT's format, both ways (hada_* / lokr_* keys), on a tiny Llama and tiny conv
nets: the same outputs as PEFT on the loaded weights, the same files as PEFT writes, refusals."""

import json

import pytest
import torch

import slimtune
from slimtune import CheckpointError, LohaConfig, LokrConfig, load_adapter, save_adapter
from slimtune.core.checkpoint import CONFIG_NAME
from tests.helpers import assert_same_files, rel_err
from tests.toy_models import conv1d_net, conv2d_net, llm_input, run, tiny_llama

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LLAMA = (tiny_llama, llm_input)
CONV2D = (conv2d_net, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
CONV1D = (conv1d_net, lambda: torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(1)))

# (method, model, kwargs that PEFT's config and slimtune's take alike)
CASES = {
    "loha-llama-patterns": ("LOHA", LLAMA, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})),
    "loha-conv2d-tucker": ("LOHA", CONV2D, dict(r=2, alpha=3, target_modules=["0", "2"], use_effective_conv2d=True)),
    "loha-conv1d-grouped": ("LOHA", CONV1D, dict(r=3, target_modules=["0", "2"], rank_dropout=0.1)),
    "lokr-llama-both": ("LOKR", LLAMA, dict(r=2, alpha=5, target_modules=["q_proj", "up_proj", "down_proj"],
                                            decompose_both=True, rank_pattern={"up_proj": 6})),
    "lokr-llama-factor": ("LOKR", LLAMA, dict(r=4, target_modules=r".*\.(k_proj|o_proj)", decompose_factor=4,
                                              init_weights="lycoris", module_dropout=0.2)),
    "lokr-conv2d-tucker": ("LOKR", CONV2D, dict(r=1, target_modules=["0", "2"], use_effective_conv2d=True)),
    "lokr-conv1d": ("LOKR", CONV1D, dict(r=4, alpha=2, target_modules=["0", "2"], rank_dropout_scale=True)),
}
CONFIGS = {"LOHA": (peft.LoHaConfig, LohaConfig), "LOKR": (peft.LoKrConfig, LokrConfig)}


def _randomize(model, seed=3):
    """Some factors start at zero: give every adapter tensor random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("case", CASES)
def test_peft_to_slimtune(case, tmp_path):
    method, (make, inputs), kw = CASES[case]
    theirs = peft.get_peft_model(make(), CONFIGS[method][0](**kw)).eval()
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(make(), tmp_path)
    assert isinstance(getattr(ours, "slimtune_config"), CONFIGS[method][1])
    x = inputs()
    want = run(theirs, x)
    for path in ("structured", "folded"):
        for _, adapter in slimtune.adapter_modules(ours):
            adapter.path = path
        assert rel_err(run(ours, x), want) < 1e-5, path


@pytest.mark.parametrize("case", CASES)
def test_slimtune_to_peft(case, tmp_path):
    method, (make, inputs), kw = CASES[case]
    ours = slimtune.adapt(make(), CONFIGS[method][1](**kw))
    _randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    x = inputs()
    assert rel_err(run(theirs, x), run(ours, x)) < 1e-5
    # the same files as PEFT writes for the same config: keys, shapes, JSON
    ref = peft.get_peft_model(make(), CONFIGS[method][0](**kw))
    ref.save_pretrained(tmp_path / "peft")
    assert_same_files(tmp_path / "ours", tmp_path / "peft", dtypes=False)


def test_round_trip_into_an_adapted_model_and_merge(tmp_path):
    ours = slimtune.adapt(tiny_llama(), LokrConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    _randomize(ours)
    save_adapter(ours, tmp_path)
    other = slimtune.adapt(tiny_llama(), LokrConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    load_adapter(other, tmp_path)
    x = llm_input()
    want = run(ours, x)
    assert rel_err(run(other, x), want) < 1e-6
    slimtune.merge(other)
    assert rel_err(run(other, x), want) < 1e-5


def test_refusals(tmp_path):
    loha = slimtune.adapt(conv2d_net(), LohaConfig(r=2, target_modules=["0"]))
    save_adapter(loha, tmp_path / "loha")
    lokr = slimtune.adapt(conv2d_net(), LokrConfig(r=2, target_modules=["0"]))
    before = {k: v.clone() for k, v in lokr.state_dict().items()}
    with pytest.raises(CheckpointError, match="LOHA"):
        load_adapter(lokr, tmp_path / "loha")
    assert all(torch.equal(v, before[k]) for k, v in lokr.state_dict().items())
    other_rank = slimtune.adapt(conv2d_net(), LohaConfig(r=3, target_modules=["0"]))
    with pytest.raises(CheckpointError, match="r=3"):
        load_adapter(other_rank, tmp_path / "loha")


def test_layers_to_transform_loads_as_peft_built_it(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoKrConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1],
                                                               init_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    assert [name for name, _ in slimtune.adapter_modules(ours)] == ["model.layers.1.self_attn.q_proj"]
    x = llm_input()
    assert rel_err(run(ours, x), run(theirs, x)) < 1e-5
    fields = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**fields, "layers_to_transform": [3]}))
    with pytest.raises(CheckpointError, match=r"layers_to_transform=\[3\]"):  # the tiny Llama has layers 0 and 1
        load_adapter(tiny_llama(), tmp_path)
