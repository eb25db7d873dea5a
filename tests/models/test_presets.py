"""Model presets: shapes, the protocol model, errors."""
from __future__ import annotations

import sys

import pytest
import torch

from slimtune.models import LLAMA_TARGETS, PRESETS, MissingDependencyError, PresetError, build_model, get_preset


def test_presets_and_targets() -> None:
    assert list(PRESETS) == ["tiny-llama", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "opt-125m", "llama-7b",
                             "tiny-unet", "tiny-sd15", "tiny-dit", "stable-diffusion-1.5", "sdxl", "flux-dit",
                             "flux-dit-4b", "tiny-dit-4b"]
    assert PRESETS["opt-125m"].targets == ("q_proj", "v_proj")
    assert LLAMA_TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_llama_3b_is_the_protocol_model() -> None:
    # shared/bench/peft_baseline.py builds exactly this LlamaConfig
    assert PRESETS["llama-3.2-3b"].config_kwargs() == dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
    assert PRESETS["llama-3.2-3b"].num_parameters() == 3212749824  # the protocol's full fine-tune count


def test_build_tiny_model_is_seeded_and_cast() -> None:
    a = build_model("tiny-llama", "cpu", "bfloat16", seed=3)
    b = build_model(PRESETS["tiny-llama"], "cpu", torch.bfloat16, seed=3)
    assert type(a).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert sum(p.numel() for p in a.parameters()) == PRESETS["tiny-llama"].num_parameters()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    names = {n.rsplit(".", 1)[-1] for n, _ in a.named_modules()}
    assert set(LLAMA_TARGETS) <= names


def test_unknown_preset_error_lists_presets() -> None:
    with pytest.raises(PresetError, match="unknown preset 'gpt-5'.*tiny-llama, llama-3.2-1b"):
        get_preset("gpt-5")


def test_missing_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'slimtune\[hf\]'"):
        build_model("tiny-llama")


def test_opt_preset_builds_an_opt_model_of_the_counted_size() -> None:
    model = build_model("opt-125m", "cpu", "float32")
    assert type(model).__name__ == "OPTForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == PRESETS["opt-125m"].num_parameters() == 125239296


def test_llama_7b_shape() -> None:
    spec = PRESETS["llama-7b"]
    assert (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers, spec.num_attention_heads,
            spec.num_key_value_heads, spec.vocab_size, spec.tie_word_embeddings) == (4096, 11008, 32, 32, 32, 32000,
                                                                                       False)
    assert spec.num_parameters() == 6738415616  # Llama-2-7B's published count


def test_diffusion_presets_match_the_published_configs() -> None:
    sd = PRESETS["stable-diffusion-1.5"]
    config = sd.config
    assert config["block_out_channels"] == (320, 640, 1280, 1280) and config["cross_attention_dim"] == 768
    assert config["down_block_types"][-1] == "DownBlock2D" and config["up_block_types"][0] == "UpBlock2D"
    assert dict(sd.text_encoders[0][1])["hidden_size"] == 768
    xl = PRESETS["sdxl"].config
    assert xl["transformer_layers_per_block"] == (1, 2, 10) and xl["addition_embed_type"] == "text_time"
    # 2816 = 6 time ids x 256 + the 1280-wide pooled text embedding
    assert xl["projection_class_embeddings_input_dim"] == 6 * xl["addition_time_embed_dim"] + 1280
    flux = PRESETS["flux-dit"].config
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"],
            flux["attention_head_dim"]) == (19, 38, 24, 128)


def test_flux_dit_4b_is_klein_sized() -> None:
    pytest.importorskip("diffusers")
    spec = PRESETS["flux-dit-4b"]
    assert (spec.config["num_layers"], spec.config["num_single_layers"], spec.config["guidance_embeds"]) == (5, 15,
                                                                                                            False)
    assert spec.num_parameters(text_encoders=False) == 3888332160  # FLUX.2-klein-4B's transformer: 3,875,544,576


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-sd15", "tiny-dit", "tiny-dit-4b"])
def test_tiny_diffusion_presets_train_one_step(name: str) -> None:
    pytest.importorskip("diffusers")
    from slimtune.models import workload

    model = build_model(name, "cpu", "float32", seed=0)
    inputs = workload.make_inputs(name, model, 1, 0, "cpu", torch.float32, torch.Generator().manual_seed(0))
    loss = workload.training_loss(name, model, inputs)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    denoiser = model.denoiser
    assert all(p.grad is not None for p in denoiser.parameters() if p.requires_grad)


def test_sd15_parameter_counts_on_meta() -> None:
    pytest.importorskip("diffusers")
    spec = PRESETS["stable-diffusion-1.5"]
    assert spec.num_parameters(text_encoders=False) == 859520964  # the published UNet
    assert spec.num_parameters() == 859520964 + 123060480  # + CLIP ViT-L/14's text tower


def test_default_targets_per_family_and_method() -> None:
    from slimtune.models.workload import default_targets

    assert default_targets("llama-7b", "loha") == LLAMA_TARGETS
    assert default_targets("opt-125m", "lora") == ["q_proj", "v_proj"]
    lora = default_targets("stable-diffusion-1.5", "lora")
    assert lora == ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    for method in ("locon", "loha", "lokr"):
        assert set(default_targets("stable-diffusion-1.5", method)) == set(lora) | {
            "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"}
    assert "add_q_proj" in default_targets("flux-dit", "lora")


def test_llm_inputs_follow_the_protocol() -> None:
    from slimtune.models.workload import make_inputs

    inputs = make_inputs("tiny-llama", None, 2, 5, "cpu", "float32", torch.Generator().manual_seed(0))
    assert inputs["input_ids"].shape == (2, 5) and inputs["labels"] is inputs["input_ids"]
    assert int(inputs["input_ids"].max()) < PRESETS["tiny-llama"].vocab_size


# -- a local model directory as a preset (the planner's --model DIR) -------------------------------------------
def test_a_model_directory_plans_as_its_preset_does(tmp_path, capsys):
    import json

    import transformers

    from slimtune.cli import main
    from slimtune.memory.estimate import estimate_memory
    from slimtune.models.presets import get_preset, preset_from_dir

    tiny = get_preset("tiny-llama")
    transformers.LlamaConfig(**tiny.config_kwargs(), architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    spec = preset_from_dir(tmp_path / "llama")
    assert spec.num_parameters() == tiny.num_parameters()
    shape = dict(batch=2, seq=64, reduced_depth=True)
    assert estimate_memory(spec, "lora", 8, **shape).peak_bytes == estimate_memory(tiny, "lora", 8, **shape).peak_bytes
    # another architecture (transformers' Conv1D projections), through the command line
    transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, bos_token_id=0, eos_token_id=0,
                            architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    assert main(["plan", "--model", str(tmp_path / "gpt2"), "--method", "lora", "--batch", "2", "--seq", "32",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_bytes"] > 0
    # an encoder is not a causal LM; a directory without a config is no model
    transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            architectures=["BertModel"]).save_pretrained(tmp_path / "bert")
    for directory, message in ((tmp_path / "bert", "is a BertModel, not a causal language model"),
                               (tmp_path, "no readable config.json")):
        assert main(["plan", "--model", str(directory), "--method", "lora"]) == 2
        assert message in capsys.readouterr().err
