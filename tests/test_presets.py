"""Model presets: shapes, the protocol model, errors."""
from __future__ import annotations

import sys

import pytest
import torch

from slimtune.models import LLAMA_TARGETS, PRESETS, MissingDependencyError, PresetError, build_model, get_preset


def test_presets_and_targets() -> None:
    assert list(PRESETS) == ["tiny-llama", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "opt-125m"]
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
