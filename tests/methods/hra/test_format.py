"""HRA checkpoints in PEFT's format, both ways (hra_u keys), on a tiny Llama and a tiny conv net."""

import pytest
import torch

import slimtune
from slimtune import CheckpointError, HraConfig, load_adapter, save_adapter
from tests.helpers import assert_same_files, rel_err
from tests.toy_models import conv2d_net, llm_input, run, tiny_llama

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = [
    (tiny_llama, llm_input, dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    (tiny_llama, llm_input, dict(r=3, target_modules=["o_proj"], apply_GS=True)),
    (conv2d_net, lambda: torch.randn(2, 3, 8, 8), dict(r=4, target_modules=["0", "2"])),
]


def _randomize(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hra_u" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("make,inputs,kw", CASES)
def test_peft_to_slimtune(make, inputs, kw, tmp_path):
    theirs = peft.get_peft_model(make(), peft.HRAConfig(**kw))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(make(), tmp_path)
    x = inputs()
    assert rel_err(run(ours, x), run(theirs, x)) < 1e-5


@pytest.mark.parametrize("make,inputs,kw", CASES)
def test_slimtune_to_peft(make, inputs, kw, tmp_path):
    ours = slimtune.adapt(make(), HraConfig(**kw))
    _randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    x = inputs()
    assert rel_err(run(theirs, x), run(ours, x)) < 1e-5
    # same files as PEFT writes for the same config
    ref = peft.get_peft_model(make(), peft.HRAConfig(**kw))
    ref.save_pretrained(tmp_path / "peft")
    assert_same_files(tmp_path / "ours", tmp_path / "peft", dtypes=False)


def test_hra_rank_pattern_cannot_be_saved_in_peft_format(tmp_path):
    model = slimtune.adapt(conv2d_net(), HraConfig(r=2, target_modules=["0", "2"], rank_pattern={"2": 4}))
    with pytest.raises(CheckpointError, match="rank_pattern"):
        save_adapter(model, tmp_path)


def test_loading_lora_checkpoint_into_hra_model_is_refused(tmp_path):
    lora = slimtune.adapt(conv2d_net(), slimtune.LoraConfig(r=2, target_modules=["0"]))
    save_adapter(lora, tmp_path)
    hra = slimtune.adapt(conv2d_net(), HraConfig(r=2, target_modules=["0"]))
    before = {k: v.clone() for k, v in hra.state_dict().items()}
    with pytest.raises(CheckpointError, match="LORA"):
        load_adapter(hra, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in hra.state_dict().items())
