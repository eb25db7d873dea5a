"""DoRA checkpoints in PEFT's format, both ways (``lora_magnitude_vector`` keys), and training parity with PEFT."""
import copy

import pytest
import torch
from torch import nn

import slimtune
from slimtune import CheckpointError, load_adapter, save_adapter
from slimtune.core.checkpoint import PEFT_PREFIX, WEIGHTS_NAME
from tests.helpers import assert_same_files, rel_err
from tests.toy_models import conv1d_net, conv2d_net, llm_input, mlp, run, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _conv_input(shape):
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(3))


# name -> (model, input, PEFT LoraConfig kwargs, slimtune LoraConfig kwargs); use_dora added to both
CASES = {
    "llama_patterns": (tiny_llama, llm_input,
                       dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                            alpha_pattern={"down_proj": 3}),
                       dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                            alpha_pattern={"down_proj": 3})),
    "llama_rslora_regex": (tiny_llama, llm_input,
                           dict(r=4, lora_alpha=5, use_rslora=True, target_modules=r".*\.(k_proj|o_proj|gate_proj)"),
                           dict(r=4, alpha=5, rslora=True, target_modules=r".*\.(k_proj|o_proj|gate_proj)")),
    "conv2d": (conv2d_net, _conv_input((2, 3, 12, 12)),
               dict(r=4, lora_alpha=6, target_modules=["0", "2"], rank_pattern={"2": 2}),
               dict(r=4, alpha=6, target_modules=["0", "2"], rank_pattern={"2": 2})),
    "conv1d": (conv1d_net, _conv_input((2, 4, 20)), dict(r=4, lora_alpha=6, target_modules=["0"]),
               dict(r=4, alpha=6, target_modules=["0"])),
    "gpt2_conv1d": (tiny_gpt2, llm_input, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                    dict(r=4, alpha=8, target_modules=["c_attn"])),
}


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 2) -> None:
    """Move A, B and the magnitudes away from their init (same order of names in PEFT and slimtune)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or "magnitude" in name:
            scale = 0.05 * p.abs().mean() if "magnitude" in name else 0.3
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_slimtune(case, tmp_path):
    make, inputs, peft_kw, _ = CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **peft_kw)).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(tmp_path / WEIGHTS_NAME))
    ours = load_adapter(make(), tmp_path)
    x = inputs()
    assert rel_err(run(ours, x), run(theirs, x)) < 1e-5
    assert rel_err(run(ours, x), run(make(), x)) > 1e-3


@pytest.mark.parametrize("case", sorted(CASES))
def test_slimtune_to_peft(case, tmp_path):
    make, inputs, peft_kw, ours_kw = CASES[case]
    ours = slimtune.adapt(make(), slimtune.LoraConfig(use_dora=True, **ours_kw)).eval()
    perturb(ours)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    x = inputs()
    assert rel_err(run(theirs, x), run(ours, x)) < 1e-5
    # the same files PEFT writes for the same config
    peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **peft_kw)).save_pretrained(tmp_path / "peft")
    assert assert_same_files(tmp_path / "ours", tmp_path / "peft")["use_dora"] is True


def peft_key(name: str, suffix: str) -> str:
    """slimtune module name + PEFT suffix -> the parameter's name inside a PEFT model (adapter "default")."""
    inner = "lora_magnitude_vector.default.weight" if suffix == "lora_magnitude_vector" \
        else suffix.replace(".weight", ".default.weight")
    return f"base_model.model.{name}.{inner}"


def test_training_step_matches_peft():
    """Same weights, same batch, train mode: loss and every adapter gradient agree with PEFT's."""
    targets = ["q_proj", "v_proj", "up_proj"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                use_dora=True))
    perturb(theirs)
    ours = slimtune.adapt(tiny_llama(), slimtune.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    with torch.no_grad():
        for name, adapter in slimtune.adapter_modules(ours):
            for suffix, param in adapter.peft_parameters().items():
                param.copy_(theirs.get_parameter(peft_key(name, suffix)))
    theirs.train()
    ours.train()
    ids = llm_input()
    loss_t = theirs(input_ids=ids, labels=ids).loss
    loss_o = ours(input_ids=ids, labels=ids).loss
    loss_t.backward()
    loss_o.backward()
    assert abs(loss_t.item() - loss_o.item()) < 1e-5
    for name, adapter in slimtune.adapter_modules(ours):
        for suffix, param in adapter.peft_parameters().items():
            assert rel_err(param.grad, theirs.get_parameter(peft_key(name, suffix)).grad) < 1e-4, (name, suffix)


def test_bf16_round_trip_keeps_dtype_and_output(tmp_path):
    model = slimtune.adapt(mlp().to(torch.bfloat16),
                           slimtune.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True))
    perturb(model)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors[f"{PEFT_PREFIX}0.lora_magnitude_vector"].shape == (16,)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    target = slimtune.adapt(mlp().to(torch.bfloat16),
                            slimtune.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True))
    load_adapter(target, tmp_path)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(run(target, x), run(model, x))


def test_grouped_conv_dora_checkpoint_is_refused(tmp_path):
    theirs = peft.get_peft_model(conv1d_net(), peft.LoraConfig(r=4, target_modules=["2"], use_dora=True))
    theirs.save_pretrained(tmp_path)
    fresh = conv1d_net()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(CheckpointError, match="grouped"):
        load_adapter(fresh, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_lora_and_dora_do_not_mix(tmp_path):
    dora = slimtune.adapt(mlp(), slimtune.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True))
    save_adapter(dora, tmp_path)
    lora = slimtune.adapt(mlp(), slimtune.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(lora, tmp_path)


@pytest.mark.parametrize("spec", [True, ["0"], r".*0"])
def test_dora_recompute_is_not_written_to_pefts_config(spec, tmp_path):
    import json

    net = mlp()
    slimtune.adapt(net, slimtune.LoraConfig(r=2, target_modules=["0", "2"], use_dora=True, dora_recompute=spec))
    save_adapter(net, tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "dora_recompute" not in fields and fields["use_dora"] is True
