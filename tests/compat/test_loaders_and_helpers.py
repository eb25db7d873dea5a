"""PEFT's loaders and module-level helpers by their PEFT names, each checked against PEFT itself:
``AutoPeftModelForCausalLM`` / ``AutoPeftModel`` / ``PeftConfig.from_pretrained`` on a saved adapter,
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``, ``prepare_model_for_kbit_training``."""
from __future__ import annotations

import json

import pytest
import torch

import slimtune
from slimtune import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, CheckpointError,
                      ConfigError, LoraConfig, PeftConfig, get_peft_model, get_peft_model_state_dict,
                      prepare_model_for_kbit_training, set_peft_model_state_dict)
from tests.helpers import FP32_TOL, perturb_adapters, rel_err
from tests.toy_models import llm_input, run, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

QV = ["q_proj", "v_proj"]


@pytest.fixture()
def saved(tmp_path):
    """A base model directory and an adapter trained on it (saved by slimtune, naming its base)."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=QV, task_type="CAUSAL_LM"))
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path, run(model, llm_input())


def test_peft_config_names_the_base(saved):
    tmp, _ = saved
    config = PeftConfig.from_pretrained(tmp / "adapter")
    assert isinstance(config, slimtune.LoraConfig) and config.r == 4 and config.task_type == "CAUSAL_LM"
    assert config.base_model_name_or_path == str(tmp / "base")
    assert peft.PeftConfig.from_pretrained(str(tmp / "adapter")).base_model_name_or_path == str(tmp / "base")


def test_auto_peft_model_loads_base_and_adapter_as_peft_does(saved):
    tmp, want = saved
    ours = AutoPeftModelForCausalLM.from_pretrained(tmp / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp / "adapter"))
    assert rel_err(run(ours, llm_input()), want) < FP32_TOL
    assert rel_err(run(theirs, llm_input()), want) < FP32_TOL
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference, as PEFT loads it
    trainable = AutoPeftModelForCausalLM.from_pretrained(tmp / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0
    with pytest.raises(ConfigError, match="AutoPeftModelForCausalLM"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp / "adapter")
    with pytest.raises(ConfigError, match="task_type CAUSAL_LM"):
        AutoPeftModel.from_pretrained(tmp / "adapter")


def test_auto_peft_model_by_auto_mapping_and_the_refusals(saved):
    tmp, want = saved
    raw = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    raw["task_type"] = None
    raw["auto_mapping"] = {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"}
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(raw))
    assert rel_err(run(AutoPeftModel.from_pretrained(tmp / "adapter"), llm_input()), want) < FP32_TOL
    for mapping, message in (({"base_model_class": "Popen", "parent_library": "subprocess"}, "transformers and"),
                             (None, "load the base model yourself")):
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({**raw, "auto_mapping": mapping}))
        with pytest.raises(ConfigError, match=message):
            AutoPeftModel.from_pretrained(tmp / "adapter")
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match="names no base_model_name_or_path"):
        AutoPeftModel.from_pretrained(tmp / "adapter")
    with pytest.raises(CheckpointError, match="downloads nothing"):
        AutoPeftModelForCausalLM.from_pretrained(tmp / "no-such-adapter")


def test_state_dict_helpers_match_peft_s():
    config = dict(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"])
    ours = get_peft_model(tiny_llama(), LoraConfig(**config))
    perturb_adapters(ours)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    state = get_peft_model_state_dict(ours)
    peft.set_peft_model_state_dict(theirs, state)  # PEFT takes what slimtune gives ...
    back = peft.get_peft_model_state_dict(theirs)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert rel_err(run(theirs, llm_input()), run(ours, llm_input())) < FP32_TOL
    fresh = get_peft_model(tiny_llama(), LoraConfig(**config))
    assert set_peft_model_state_dict(fresh, back) == ([], [])  # ... and slimtune takes what PEFT gives
    assert torch.equal(run(fresh, llm_input()), run(ours, llm_input()))
    assert get_peft_model_state_dict(ours, state_dict=ours.state_dict()).keys() == state.keys()
    with pytest.raises(CheckpointError):
        set_peft_model_state_dict(fresh, {k: v[..., :1] for k, v in back.items()})  # wrong shapes: refused
    assert torch.equal(run(fresh, llm_input()), run(ours, llm_input()))  # and left as it was
    with pytest.raises(ConfigError, match="no adapter named"):
        get_peft_model_state_dict(ours, adapter_name="other")


def test_prepare_model_for_kbit_training_does_what_peft_does():
    def quantized() -> torch.nn.Module:
        model = tiny_llama().to(torch.bfloat16)
        slimtune.quantize(model, "nf4")
        return model

    ours, theirs = quantized(), quantized()
    theirs.is_loaded_in_4bit = True  # how transformers marks a 4-bit model PEFT expects
    prepare_model_for_kbit_training(ours)
    peft.prepare_model_for_kbit_training(theirs)
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == \
           {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    lean = quantized()
    prepare_model_for_kbit_training(lean, upcast=False, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert {p.dtype for p in lean.parameters() if p.is_floating_point()} == {torch.bfloat16}
    dense = tiny_llama()
    prepare_model_for_kbit_training(dense)  # not quantised: frozen, no checkpointing (PEFT's rule)
    assert not dense.is_gradient_checkpointing and not any(p.requires_grad for p in dense.parameters())


def test_adapter_layer_switches_and_gradient_flags_as_peft_s():
    config = dict(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"])
    ours, theirs = get_peft_model(tiny_llama(), LoraConfig(**config)), peft.get_peft_model(tiny_llama(),
                                                                                          peft.LoraConfig(**config))
    perturb_adapters(ours)
    peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
    base = run(tiny_llama(), llm_input())
    adapted = run(ours, llm_input())
    for model in (ours, theirs):
        model.merge_adapter()
        model.disable_adapter_layers()  # unmerges, runs the base, adapters frozen
        assert rel_err(run(model, llm_input()), base) < FP32_TOL  # (slimtune's unmerge is exact; PEFT's rounds)
        assert model.get_nb_trainable_parameters()[0] == 0
        model.enable_adapter_layers()
        assert rel_err(run(model, llm_input()), adapted) < FP32_TOL
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (ours, theirs):
        model.set_requires_grad("default", requires_grad=False)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.active_peft_config is ours.peft_config["default"] and ours.active_peft_config.r == 4
    with pytest.raises(slimtune.SlimtuneError, match="add_weighted_adapter"):
        ours.add_weighted_adapter(["default"], [1.0], "combined")


def test_from_pretrained_options_as_peft_s(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    slimtune.adapt(model, LoraConfig(r=4, target_modules=QV))
    slimtune.save_adapter(model, tmp_path / "outer" / "inner")

    def lora_a_dtype(wrapped) -> torch.dtype:
        return wrapped.get_base_model().model.layers[0].self_attn.q_proj.lora_A.dtype

    def their_dtype(**options) -> torch.dtype:
        loaded = peft.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), str(tmp_path / "outer"),
                                                subfolder="inner", **options)
        return loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype

    for options in ({}, {"autocast_adapter_dtype": False}):  # PEFT upcasts 16-bit adapters by default; so do we
        ours = slimtune.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path / "outer",
                                                  subfolder="inner", **options)
        assert lora_a_dtype(ours) == their_dtype(**options)
    with pytest.raises(ConfigError, match="revision"):  # an option PEFT would act on is never ignored
        slimtune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "outer" / "inner", revision="v2")
    override = slimtune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "outer" / "inner",
                                                  config=LoraConfig(r=4, lora_alpha=32, target_modules=QV))
    assert override.peft_config["default"].alpha == 32  # the given config, the file's tensors
