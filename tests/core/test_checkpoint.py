"""PEFT-compatible adapter checkpoints: conformance with the real peft, both ways, and refusal of bad input."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import slimtune
from slimtune import CheckpointError, load_adapter, save_adapter
from slimtune.core.checkpoint import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from slimtune.core.module import AdapterModule

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.helpers import assert_same_files, rel_err  # noqa: E402
from tests.toy_models import conv1d_net, conv2d_net, llm_input, mlp, run, tiny_gpt2, tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """B starts at zero: give every lora_B (and lora_A) random values so the adapter matters."""
    gen = torch.Generator().manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_A" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def n_adapters(model: nn.Module) -> int:
    return sum(isinstance(m, AdapterModule) for m in model.modules())


# (PEFT LoraConfig kwargs, matching slimtune LoraConfig kwargs), per case
LLAMA_CASES = {
    "patterns": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
             rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3},
             lora_dropout=0.0),
        dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
             rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3},
             dropout=0.0),
    ),
    "rslora_dropout_regex": (
        dict(r=8, lora_alpha=5, use_rslora=True, lora_dropout=0.1,
             target_modules=r".*\.(k_proj|o_proj|up_proj)", init_lora_weights="gaussian"),
        dict(r=8, alpha=5, rslora=True, dropout=0.1, target_modules=r".*\.(k_proj|o_proj|up_proj)",
             init="gaussian"),
    ),
    "exclude": (
        dict(r=2, lora_alpha=16, target_modules=["q_proj", "gate_proj"], exclude_modules=["layers.0.mlp.gate_proj"]),
        dict(r=2, alpha=16, target_modules=["q_proj", "gate_proj"], exclude_modules=["layers.0.mlp.gate_proj"]),
    ),
}


def peft_model(base: nn.Module, **kwargs) -> nn.Module:
    model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    return model.eval()


# -- PEFT -> slimtune ---------------------------------------------------------------------------------
def check_peft_to_slimtune(make, x, peft_kwargs, tmp_path):
    base = make()
    fresh = copy.deepcopy(base)
    pm = peft_model(base, **peft_kwargs)
    perturb(pm)
    ref = run(pm, x)
    pm.save_pretrained(tmp_path)
    base_out = run(copy.deepcopy(fresh), x)
    assert rel_err(base_out, ref) > 1e-3, "the perturbed adapter must change the output"

    model = load_adapter(fresh, tmp_path)
    assert model is fresh
    assert n_adapters(model) == len([m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)])
    assert all(not m.training for m in model.modules()), "adapters follow the eval mode of the layers they wrap"
    assert rel_err(run(model, x), ref) < 1e-5
    return model


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_peft_to_slimtune(case, tmp_path):
    check_peft_to_slimtune(tiny_llama, llm_input(), LLAMA_CASES[case][0], tmp_path)


def test_llama_peft_all_linear_to_slimtune(tmp_path):
    check_peft_to_slimtune(tiny_llama, llm_input(), dict(r=2, lora_alpha=4, target_modules="all-linear"), tmp_path)


# -- slimtune -> PEFT ---------------------------------------------------------------------------------
def check_slimtune_to_peft(make, x, peft_kwargs, ours_kwargs, tmp_path):
    base = make()
    fresh, fresh_for_peft = copy.deepcopy(base), copy.deepcopy(base)
    # .eval() again: adapt() inserts adapters in train mode even into an eval model (dropout would be active)
    model = slimtune.adapt(base, slimtune.LoraConfig(**ours_kwargs)).eval()
    perturb(model)
    ref = run(model, x)
    ours = tmp_path / "ours"
    save_adapter(model, ours)
    assert rel_err(run(copy.deepcopy(fresh), x), ref) > 1e-3

    loaded = peft.PeftModel.from_pretrained(fresh, ours).eval()
    assert rel_err(run(loaded, x), ref) < 1e-5

    # Same files as PEFT writes for the same config.
    theirs = tmp_path / "theirs"
    peft_model(fresh_for_peft, **peft_kwargs).save_pretrained(theirs)
    return assert_same_files(ours, theirs)


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_slimtune_to_peft(case, tmp_path):
    peft_kwargs, ours_kwargs = LLAMA_CASES[case]
    check_slimtune_to_peft(tiny_llama, llm_input(), peft_kwargs, ours_kwargs, tmp_path)


def test_slimtune_all_linear_is_written_as_is_and_peft_loads_it(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    model = slimtune.adapt(base, slimtune.LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    perturb(model)
    x = llm_input()
    ref = run(model, x)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == "all-linear"
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert rel_err(run(loaded, x), ref) < 1e-5


# -- convolutions -------------------------------------------------------------------------------------
CONV_CASES = {
    "conv2d": (conv2d_net, lambda: torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
               dict(r=4, lora_alpha=6, target_modules=["0", "2"], rank_pattern={"2": 2}),
               dict(r=4, alpha=6, target_modules=["0", "2"], rank_pattern={"2": 2})),
    "conv1d_groups": (conv1d_net, lambda: torch.randn(2, 4, 20, generator=torch.Generator().manual_seed(3)),
                      dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["0", "2"]),
                      dict(r=4, alpha=8, rslora=True, target_modules=["0", "2"])),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_peft_to_slimtune(case, tmp_path):
    make, x, peft_kwargs, _ = CONV_CASES[case]
    model = check_peft_to_slimtune(make, x(), peft_kwargs, tmp_path)
    shapes = {n: tuple(a.lora_B.shape) for n, a in slimtune.adapter_modules(model)}
    if case == "conv2d":
        assert shapes == {"0": (8, 4, 1, 1), "2": (8, 2, 1, 1)}
    else:
        assert shapes == {"0": (8, 4, 1), "2": (6, 2, 1)}  # r / groups


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_slimtune_to_peft(case, tmp_path):
    make, x, peft_kwargs, ours_kwargs = CONV_CASES[case]
    check_slimtune_to_peft(make, x(), peft_kwargs, ours_kwargs, tmp_path)


# -- transformers Conv1D (GPT-2), fan_in_fan_out ------------------------------------------------------
def test_gpt2_conv1d_peft_to_slimtune(tmp_path):
    model = check_peft_to_slimtune(tiny_gpt2, llm_input(),
                                   dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True), tmp_path)
    assert all(a.fan_in_fan_out for _, a in slimtune.adapter_modules(model))


def test_gpt2_conv1d_slimtune_to_peft(tmp_path):
    written = check_slimtune_to_peft(tiny_gpt2, llm_input(),
                                     dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                                     dict(r=4, alpha=8, target_modules=["c_attn"]), tmp_path)
    assert written["fan_in_fan_out"] is True
    assert written["base_model_name_or_path"] == "org/tiny-gpt2"


# -- slimtune <-> slimtune ----------------------------------------------------------------------------
def adapted_mlp(r: int = 4, **kwargs) -> nn.Module:
    model = slimtune.adapt(mlp(), slimtune.LoraConfig(r=r, alpha=8, target_modules=["0", "2"], **kwargs))
    perturb(model)
    return model


def test_round_trip_into_adapted_model_and_dtype_kept(tmp_path):
    model = adapted_mlp()
    model.to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert sorted(tensors) == [f"{PEFT_PREFIX}{m}.lora_{p}.weight" for m in "02" for p in "AB"]
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors.values())

    target = slimtune.adapt(mlp().to(torch.bfloat16), slimtune.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    load_adapter(target, tmp_path)
    assert torch.equal(run(target, x), run(model, x))


def test_keys_with_adapter_name_are_accepted(tmp_path):
    model = adapted_mlp()
    x = torch.randn(3, 8)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in tensors.items()}
    save_file(renamed, tmp_path / WEIGHTS_NAME)
    loaded = load_adapter(mlp(), tmp_path)
    assert rel_err(run(loaded, x), run(model, x)) < 1e-6


# -- bad input: CheckpointError, model unchanged -----------------------------------------------------
def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m).__name__ for m in model.modules()], getattr(model, "slimtune_config", None),
            {n: p.requires_grad for n, p in model.named_parameters()}, [m.training for m in model.modules()])


def assert_unchanged(model: nn.Module, before) -> None:
    state, types, config, grads, modes = before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert [type(m).__name__ for m in model.modules()] == types
    assert getattr(model, "slimtune_config", None) is config


def _rewrite_json(path, **changes):
    data = json.loads((path / CONFIG_NAME).read_text())
    data.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(data))


def _truncate(path):
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    (path / WEIGHTS_NAME).write_bytes(os.urandom(4096))


def _drop_key(path):
    tensors = load_file(path / WEIGHTS_NAME)
    del tensors[f"{PEFT_PREFIX}2.lora_B.weight"]
    save_file(tensors, path / WEIGHTS_NAME)


def _extra_key(path):
    tensors = load_file(path / WEIGHTS_NAME)
    tensors[f"{PEFT_PREFIX}1.lora_A.weight"] = torch.zeros(4, 16)  # ReLU: never adapted
    save_file(tensors, path / WEIGHTS_NAME)


def _int_tensor(path):
    tensors = load_file(path / WEIGHTS_NAME)
    tensors[f"{PEFT_PREFIX}0.lora_A.weight"] = torch.zeros(4, 8, dtype=torch.int32)
    save_file(tensors, path / WEIGHTS_NAME)


def _bin_only(path):
    (path / WEIGHTS_NAME).rename(path / "adapter_model.bin")


def _tensor_shape(path):
    tensors = load_file(path / WEIGHTS_NAME)
    tensors[f"{PEFT_PREFIX}0.lora_A.weight"] = torch.zeros(4, 9)
    save_file(tensors, path / WEIGHTS_NAME)


# case -> (corruption, message for a fresh model, message for an adapted model or None: not a failure there)
BAD = {
    "missing_dir": (lambda p: None, "does not exist", "does not exist"),
    "missing_config": (lambda p: (p / CONFIG_NAME).unlink(), "adapter_config.json does not exist", "does not exist"),
    "truncated": (_truncate, "not a readable safetensors file", "safetensors"),
    "random_bytes": (_random_bytes, "not a readable safetensors file", "safetensors"),
    "rank_mismatch": (lambda p: _rewrite_json(p, r=2), "shape mismatch", "scaling"),
    "tensor_shape": (_tensor_shape, "shape mismatch", "shape mismatch"),
    "missing_key": (_drop_key, "missing 1 tensor", "missing 1 tensor"),
    "extra_key": (_extra_key, "unexpected key", "unexpected key"),
    "int_tensor": (_int_tensor, "floating-point", "floating-point"),
    "bad_json": (lambda p: (p / CONFIG_NAME).write_text("{not json"), "not valid JSON", "not valid JSON"),
    "json_not_object": (lambda p: (p / CONFIG_NAME).write_text("[1, 2]"), "JSON object", "JSON object"),
    "unsupported_type": (lambda p: _rewrite_json(p, peft_type="VBLORA"), "VBLORA.* is not supported; supported: .*LORA",
                         "VBLORA.* is not supported; supported: .*LORA"),
    # a LoRA checkpoint that claims DoRA: the magnitude vectors are missing; a LoRA model is not a DoRA one
    "dora": (lambda p: _rewrite_json(p, use_dora=True), "missing 2 tensor.*lora_magnitude_vector", "use_dora"),
    "pissa": (lambda p: _rewrite_json(p, init_lora_weights="pissa"), "init_lora_weights", "init_lora_weights"),
    "astra": (lambda p: _rewrite_json(p, init_lora_weights="astra"), "init_lora_weights", "init_lora_weights"),
    "modules_to_save": (lambda p: _rewrite_json(p, modules_to_save=["nothing"]), "modules_to_save", "modules_to_save"),
    "bad_rank": (lambda p: _rewrite_json(p, r=0), "positive integer", "positive integer"),
    "no_match": (lambda p: _rewrite_json(p, target_modules=["q_proj"]), "matched no module", None),
    "unknown_field": (lambda p: _rewrite_json(p, use_fancy_variant=True), "use_fancy_variant", "use_fancy_variant"),
    "bin_only": (_bin_only, "only safetensors is supported", "only safetensors is supported"),
}


# (no_match is no error for an adapted model: its adapters, not the config's targets, define the keys)
BAD_RUNS = [pytest.param(case, adapted, id=f"{case}-{'adapted' if adapted else 'fresh'}")
            for case in sorted(BAD) for adapted in (False, True) if BAD[case][2 if adapted else 1] is not None]


@pytest.mark.parametrize("case, adapted", BAD_RUNS)
def test_bad_checkpoint_raises_and_leaves_model_unchanged(case, adapted, tmp_path):
    corrupt, fresh_message, adapted_message = BAD[case]
    message = adapted_message if adapted else fresh_message
    ckpt = tmp_path / "ckpt"
    save_adapter(adapted_mlp(), ckpt)
    if case == "missing_dir":
        ckpt = tmp_path / "nowhere"
    else:
        corrupt(ckpt)
    target = adapted_mlp(r=4) if adapted else mlp()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(target, ckpt)
    assert_unchanged(target, before)
    assert n_adapters(target) == (2 if adapted else 0)


@pytest.mark.parametrize("init", ["nora", "eva", "orthogonal"])
def test_plain_lora_inits_load(init, tmp_path):
    """PEFT inits that leave the base weight and the forward as plain LoRA's (NoRA, new in PEFT 0.22: A normalised at
    initialisation only) load: the file's weights give the saved model's outputs."""
    model = adapted_mlp()
    x = torch.randn(3, 8)
    save_adapter(model, tmp_path)
    _rewrite_json(tmp_path, init_lora_weights=init)
    loaded = load_adapter(mlp(), tmp_path)
    assert rel_err(run(loaded, x), run(model, x)) < 1e-6


def test_adapted_model_with_other_rank_or_alpha_is_refused(tmp_path):
    save_adapter(adapted_mlp(r=4), tmp_path)
    other_alpha = slimtune.adapt(mlp(), slimtune.LoraConfig(r=4, alpha=2, target_modules=["0", "2"]))
    for target in (adapted_mlp(r=2), other_alpha):
        before = snapshot(target)
        with pytest.raises(CheckpointError, match="scaling"):
            load_adapter(target, tmp_path)
        assert_unchanged(target, before)


def test_merged_model_is_refused(tmp_path):
    save_adapter(adapted_mlp(), tmp_path)
    target = slimtune.merge(adapted_mlp())
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="merged"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_save_unadapted_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no slimtune adapters"):
        save_adapter(mlp(), tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists()
