"""slimtune's PeftModel answers as PEFT's: layout and state-dict keys, trainable-parameter line, disabling, unloading,
merged export (fp32, bf16, 4-bit with dequantize), named adapters, modules_to_save, and refusals that leave the
model as it was."""
from __future__ import annotations

import inspect
import pathlib

import pytest
import torch
from torch import nn

import slimtune
from slimtune import CheckpointError, ConfigError, LoraConfig, PeftModel, SlimtuneError, get_peft_model
from tests.helpers import BF16_TOL, FP32_TOL, perturb_adapters, rel_err
from tests.toy_models import llm_input, run, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

QV = ["q_proj", "v_proj"]


def test_layout_keys_and_trainable_line_are_peft_s(capsys):
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=QV))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV))
    assert isinstance(ours, PeftModel) and isinstance(ours, transformers.PreTrainedModel)
    assert ours.base_model.model is ours.get_base_model() and ours.config is ours.get_base_model().config
    assert set(ours.state_dict()) == {k.replace(".default", "") for k in theirs.state_dict()}
    ours.load_state_dict(ours.state_dict())  # the PEFT-named keys read back, strictly
    assert "labels" in inspect.signature(type(ours).forward).parameters  # what Trainer reads
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    line, peft_line = capsys.readouterr().out.strip().splitlines()
    assert line == peft_line


def test_disable_adapter_and_unload_give_the_base_back():
    base, x = tiny_llama(), llm_input()
    want_base, weights = run(base, x), {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QV, modules_to_save=["lm_head"]))
    perturb_adapters(model)
    adapted = run(model, x)
    assert rel_err(adapted, want_base) > 1e-3
    with model.disable_adapter():
        assert torch.equal(run(model, x), want_base)
    assert torch.equal(run(model, x), adapted)
    model.merge_adapter()
    plain = model.unload()
    assert plain is base and type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    state = plain.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights if not k.startswith("lm_head"))  # bit for bit
    assert not torch.equal(state["lm_head.weight"], weights["lm_head.weight"])  # the trained copy stays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_export_reloads_to_identical_logits(dtype, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")  # loaded as users load a model (from_pretrained keeps the
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)  # rotary table fp32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QV), autocast_adapter_dtype=False)
    assert all(p.dtype == dtype for p in model.parameters())
    perturb_adapters(model)
    x = llm_input()
    adapted = run(model, x)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    assert torch.equal(run(reloaded, x), run(merged, x))
    assert rel_err(run(merged, x), adapted) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_model_as_it_was():
    """PEFT's ``safe_merge=True``: a NaN in one adapter is found before anything is unloaded, and the model is left as
    it was, bit for bit (a layer merged before the call stays merged); finite adapters merge as without it."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV))
    perturb_adapters(model)
    x = llm_input()
    adapted = run(model, x)
    layers = model.get_base_model().model.layers
    layers[0].self_attn.q_proj.merge()  # merged by the user before the call
    broken = layers[1].self_attn.v_proj.lora_B
    good = broken.detach().clone()
    with torch.no_grad():
        broken[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj.*NaN or inf.*'default'"):
        model.merge_and_unload(safe_merge=True)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    assert layers[0].self_attn.q_proj.merged and not layers[1].self_attn.v_proj.merged
    with torch.no_grad():
        broken.copy_(good)
    merged = model.merge_and_unload(safe_merge=True)
    assert rel_err(run(merged, x), adapted) < FP32_TOL


def test_get_peft_model_takes_peft_keywords_and_refuses_others(tmp_path):
    """PEFT's ``revision`` is recorded (config and ``adapter_config.json``), ``low_cpu_mem_usage`` is accepted, and
    a keyword PEFT does not have is a TypeError naming it (never ignored)."""
    import json

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV), revision="v2", low_cpu_mem_usage=True)
    assert model.peft_config["default"].revision == "v2"
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["revision"] == "v2"
    with pytest.raises(TypeError, match="bogus_option"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV), bogus_option=3)
    with pytest.raises(TypeError, match="bogus_option"):
        PeftModel(tiny_llama(), LoraConfig(r=4, target_modules=QV), bogus_option=3)


def test_adapters_of_a_bf16_model_are_fp32_as_peft_makes_them():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=QV))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_merge_and_unload_on_4bit_needs_dequantize():
    base = slimtune.quantize(tiny_llama(), "nf4", compute_dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QV))
    perturb_adapters(model)
    x = llm_input()
    adapted = run(model, x)
    with pytest.raises(SlimtuneError, match=r"4-bit.*merge_and_unload\(dequantize=True\)"):
        model.merge_and_unload()
    assert torch.equal(run(model, x), adapted)  # nothing changed
    merged = model.merge_and_unload(dequantize=True)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert rel_err(run(merged, x), adapted) < FP32_TOL


@pytest.mark.parametrize("config", [LoraConfig(r=2, target_modules=["k_proj"]),
                                    slimtune.HRAConfig(r=2, target_modules=["k_proj", "o_proj"])], ids=["lora", "hra"])
def test_named_adapters(config, tmp_path):
    x = llm_input()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV))
    perturb_adapters(model, seed=1)
    first = run(model, x)
    hooks = len(model.get_base_model()._forward_pre_hooks)
    model.add_adapter("b", config)
    assert model.active_adapter == "default" and torch.equal(run(model, x), first)
    model.set_adapter("b")
    perturb_adapters(model, seed=2)
    second = run(model, x)
    assert rel_err(second, first) > 1e-3
    model.save_pretrained(tmp_path)
    alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b")  # the second adapter is an adapter of its own
    assert torch.equal(run(alone, x), second)
    model.load_adapter(tmp_path, adapter_name="c")
    model.set_adapter("c")
    assert torch.equal(run(model, x), first)
    model.delete_adapter("c")
    model.set_adapter("default")
    assert torch.equal(run(model, x), first) and list(model.peft_config) == ["default", "b"]
    assert len(model.get_base_model()._forward_pre_hooks) == hooks  # no hook left behind by swapping
    model.delete_adapter("default")
    assert model.active_adapter == "b" and torch.equal(run(model, x), second)


def test_modules_to_save_for_sequence_classification():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, num_labels=3, pad_token_id=0)
    base = transformers.LlamaForSequenceClassification(cfg).eval()
    head = base.score.weight.clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QV, task_type="SEQ_CLS"))  # the head, as PEFT does
    assert [n for n, p in model.named_parameters() if p.requires_grad and "score" in n] == \
        ["base_model.model.score.trained_module.weight"]
    assert "base_model.model.score.weight" in model.state_dict()  # PEFT's key for the trained copy
    perturb_adapters(model)
    x = llm_input()
    with model.disable_adapter():
        plain = run(model, x)
    assert rel_err(run(model, x), plain) > 1e-3
    merged = model.merge_and_unload()
    assert type(merged.score) is nn.Linear and not torch.equal(merged.score.weight, head)


def wrapped(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["k_proj"]))
    slimtune.save_adapter(slimtune.adapt(tiny_llama(), LoraConfig(r=2, target_modules=["up_proj"])), tmp_path / "up")
    slimtune.save_adapter(slimtune.adapt(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"])),
                          tmp_path / "other")
    return model


# case -> (what a user does with a PeftModel holding adapters "default" (active) and "b", the error, its message)
BAD = {
    "set_unknown": (lambda m, p: m.set_adapter("nope"), ConfigError, "no adapter named 'nope'"),
    "add_existing": (lambda m, p: m.add_adapter("b", LoraConfig(target_modules=QV)), ConfigError, "'b' exists"),
    "add_bad_config": (lambda m, p: m.add_adapter("c", LoraConfig(target_modules=["nothing"])), SlimtuneError,
                       "matched no module"),
    "load_missing": (lambda m, p: m.load_adapter(p / "missing", adapter_name="c"), CheckpointError, "does not exist"),
    "load_foreign": (lambda m, p: m.load_adapter(p / "other", adapter_name="c"), CheckpointError,
                     "does not fit LlamaForCausalLM"),
    "merge_other": (lambda m, p: m.merge_and_unload(adapter_names=["b"]), ConfigError, "adapter_names"),
    "pickle": (lambda m, p: m.save_pretrained(p / "out", safe_serialization=False), ConfigError,
               "safe_serialization"),
    "convert_pissa": (lambda m, p: m.save_pretrained(p / "out", path_initial_model_for_weight_conversion=str(p)),
                      ConfigError, "path_initial_model_for_weight_conversion"),
    "push": (lambda m, p: m.save_pretrained(p / "out", push_to_hub=True), ConfigError, "push_to_hub"),
    "select_unknown": (lambda m, p: m.save_pretrained(p / "out", selected_adapters=["zz"]), ConfigError,
                       "selected_adapters"),
    "state_dict": (lambda m, p: m.save_pretrained(p / "out", state_dict={}), SlimtuneError, "state_dict"),
    "set_while_merged": (lambda m, p: (m.merge_adapter(), m.set_adapter("b")), SlimtuneError, "merged"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calls_are_refused_and_leave_the_model_unchanged(case, tmp_path):
    act, error, message = BAD[case]
    model, x = wrapped(tmp_path), llm_input()
    perturb_adapters(model)
    before, out = {k: v.clone() for k, v in model.state_dict().items()}, run(model, x)
    with pytest.raises(error, match=message):
        act(model, tmp_path)
    if case == "set_while_merged":
        model.unmerge_adapter()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.active_adapter == "default" and list(model.peft_config) == ["default", "b"]
    assert torch.equal(run(model, x), out) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("links", [True, False], ids=["links", "no-links"])
def test_trainer_load_best_model_at_end_reloads_the_best_checkpoint(tmp_path, monkeypatch, links):
    """``load_best_model_at_end``: Trainer reloads the best checkpoint's adapter into the model (here the first of
    three: the loss is "greater is better", so the best is the least trained) — also where the file system refuses
    symbolic links (``model.safetensors`` is then a copy of the adapter file)."""
    from safetensors.torch import load_file

    if not links:
        def refuse(self, *args, **kwargs):
            raise OSError("symbolic links are not supported here")
        monkeypatch.setattr(pathlib.Path, "symlink_to", refuse)

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=QV))
    ids = torch.randint(1, 64, (8, 10), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": i, "labels": i} for i in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, save_steps=1, eval_steps=1,
        eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
        learning_rate=0.05, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    best = load_file(str(tmp_path / "checkpoint-1" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    state = model.state_dict()
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert all(torch.equal(state[k], v) for k, v in best.items())
    assert (tmp_path / "checkpoint-1" / "model.safetensors").is_symlink() == links
