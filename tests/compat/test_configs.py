"""PEFT's spellings on slimtune's configs, PEFT's class names, peft config objects translated, and a table of bad
inputs: each is refused with an error naming the field, and the model is left as it was."""
from __future__ import annotations

import math

import pytest
import torch

import slimtune
from slimtune import (ConfigError, HRAConfig, HraConfig, LoHaConfig, LohaConfig, LoKrConfig, LokrConfig, LoraConfig,
                      SlimtuneError, get_peft_model)
from slimtune.compat import as_slimtune_config
from tests.toy_models import tiny_llama

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

QV = ["q_proj", "v_proj"]


def test_peft_spellings_are_the_same_fields():
    peft_spelled = LoraConfig(target_modules=QV, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                              init_lora_weights="gaussian", task_type="CAUSAL_LM", bias="none")
    assert peft_spelled == LoraConfig(target_modules=QV, alpha=16, dropout=0.1, rslora=True, init="gaussian",
                                      task_type="CAUSAL_LM")
    assert LoraConfig(target_modules=QV, init_lora_weights=False).init == "random"
    assert LoraConfig(target_modules=QV, lora_alpha=4, alpha=4).alpha == 4  # the same value twice is no conflict
    assert (HRAConfig, LoHaConfig, LoKrConfig) == (HraConfig, LohaConfig, LokrConfig)
    assert slimtune.TaskType.SEQ_CLS == "SEQ_CLS"


@pytest.mark.parametrize("peft_config, ours", [
    (lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=QV, task_type="CAUSAL_LM",
                             layers_to_transform=[1], use_rslora=True),
     LoraConfig(r=4, alpha=8, dropout=0.05, target_modules=QV, task_type="CAUSAL_LM", layers_to_transform=[1],
                rslora=True)),
    (lambda: peft.LoraConfig(r=2, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"]),
     LoraConfig(r=2, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"])),
    (lambda: peft.HRAConfig(r=4, target_modules=QV, apply_GS=True), HraConfig(r=4, target_modules=QV, apply_GS=True)),
    (lambda: peft.LoHaConfig(r=3, alpha=6, rank_dropout=0.1, target_modules=QV),
     LohaConfig(r=3, alpha=6, rank_dropout=0.1, target_modules=QV)),
    (lambda: peft.LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules=QV),
     LokrConfig(r=2, alpha=4, decompose_both=True, target_modules=QV)),
], ids=["lora", "dora", "hra", "loha", "lokr"])
def test_peft_config_objects_translate(peft_config, ours):
    assert as_slimtune_config(peft_config()) == ours
    assert as_slimtune_config(ours) is ours


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], classes: list[type]) -> bool:
    after = model.state_dict()
    return (after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
            and [type(m) for m in model.modules()] == classes and not hasattr(model, "slimtune_config")
            and all(p.requires_grad for p in model.parameters()))


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"target_modules": QV, **kw})


# case -> (what a user does with a fresh tiny Llama, the error, what its message names)
BAD = {
    "alpha_zero": (lambda m: get_peft_model(m, lora(lora_alpha=0)), ConfigError, r"alpha \(lora_alpha\) must be > 0"),
    "alpha_negative": (lambda m: get_peft_model(m, lora(lora_alpha=-8)), ConfigError, "lora_alpha"),
    "alpha_nan": (lambda m: get_peft_model(m, lora(alpha=math.nan)), ConfigError, "alpha .* finite"),
    "alpha_inf": (lambda m: get_peft_model(m, LohaConfig(target_modules=QV, alpha=math.inf)), ConfigError,
                  "alpha must be a finite"),
    "alpha_pattern_nan": (lambda m: get_peft_model(m, lora(alpha_pattern={"q_proj": math.nan})), ConfigError,
                          r"alpha_pattern\['q_proj'\]"),
    "alpha_both_spellings": (lambda m: get_peft_model(m, lora(alpha=8, lora_alpha=16)), ConfigError,
                             "lora_alpha=16 and alpha=8 are one field"),
    "rank_zero": (lambda m: get_peft_model(m, lora(r=0)), ConfigError, "r must be a positive integer"),
    "rank_float": (lambda m: get_peft_model(m, lora(r=2.5)), ConfigError, "r must be an integer"),
    "rank_pattern_zero": (lambda m: get_peft_model(m, lora(rank_pattern={"v_proj": 0})), ConfigError,
                          r"rank_pattern\['v_proj'\]"),
    "dropout_one": (lambda m: get_peft_model(m, lora(lora_dropout=1.0)), ConfigError, r"dropout \(lora_dropout\)"),
    "dropout_nan": (lambda m: get_peft_model(m, lora(lora_dropout=math.nan)), ConfigError, "lora_dropout"),
    "rank_dropout": (lambda m: get_peft_model(m, LohaConfig(target_modules=QV, rank_dropout=-0.1)), ConfigError,
                     "rank_dropout"),
    "module_dropout": (lambda m: get_peft_model(m, LokrConfig(target_modules=QV, module_dropout=2)), ConfigError,
                       "module_dropout"),
    "orth_reg_weight": (lambda m: get_peft_model(m, HRAConfig(target_modules=QV, orth_reg_weight=math.nan)),
                        ConfigError, "orth_reg_weight must be a finite number"),
    "decompose_factor": (lambda m: get_peft_model(m, LoKrConfig(target_modules=QV, decompose_factor=0)), ConfigError,
                         "decompose_factor"),
    "layers_negative": (lambda m: get_peft_model(m, lora(layers_to_transform=[-1])), ConfigError,
                        "layers_to_transform"),
    "layers_missing": (lambda m: get_peft_model(m, lora(layers_to_transform=[5])), SlimtuneError,
                       r"layers_to_transform=\[5\]"),
    "layers_pattern_alone": (lambda m: get_peft_model(m, lora(layers_pattern="layers")), ConfigError,
                             "layers_pattern is given without layers_to_transform"),
    "modules_to_save_missing": (lambda m: get_peft_model(m, lora(modules_to_save=["classifier"])), SlimtuneError,
                                r"modules_to_save entries \['classifier'\]"),
    "target_missing": (lambda m: get_peft_model(m, lora(target_modules=["qproj"])), SlimtuneError,
                       r"target_modules=\['qproj'\] matched no module"),
    "bias": (lambda m: get_peft_model(m, lora(bias="all")), ConfigError, "bias='all'"),
    "task_type": (lambda m: get_peft_model(m, lora(task_type="CHAT")), ConfigError, "task_type"),
    "init": (lambda m: get_peft_model(m, lora(init_lora_weights="pissa")), ConfigError, "init"),
    "unknown_field": (lambda m: get_peft_model(m, lora(use_qalora=True)), ConfigError, "no field 'use_qalora'"),
    "peft_lora_bias": (lambda m: get_peft_model(m, peft.LoraConfig(target_modules=QV, lora_bias=True)), ConfigError,
                       "lora_bias"),
    "peft_init": (lambda m: get_peft_model(m, peft.LoraConfig(target_modules=QV, init_lora_weights="olora")),
                  ConfigError, "init_lora_weights='olora'"),
    "peft_no_targets": (lambda m: get_peft_model(m, peft.LoraConfig(r=4)), ConfigError, "target_modules is None"),
    "peft_type": (lambda m: get_peft_model(m, peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[])),
                  ConfigError, "IA3"),
    "not_a_config": (lambda m: get_peft_model(m, {"r": 8}), ConfigError, "expected a slimtune config"),
    "mixed": (lambda m: get_peft_model(m, lora(), mixed=True), ConfigError, "mixed=True"),
    "adapter_dtype": (lambda m: get_peft_model(m, lora(adapter_dtype=torch.int8)), ConfigError, "adapter_dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_by_name_and_leaves_the_model_unchanged(case):
    act, error, message = BAD[case]
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(error, match=message):
        act(model)
    assert unchanged(model, before, classes)
