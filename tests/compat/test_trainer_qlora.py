"""The QLoRA recipe as PEFT users write it — transformers' bitsandbytes 4-bit loading, ``prepare_model_for_kbit_training``,
``get_peft_model``, ``Trainer`` — runs with the import changed to slimtune: Trainer accepts the quantised model with
adapters (it refuses a bare quantised one), trains it, and PEFT loads the adapter it saved to the same logits."""
from __future__ import annotations

import pytest
import torch

from slimtune import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from tests.helpers import BF16_TOL, rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def quantized_base(directory) -> torch.nn.Module:
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb, dtype=torch.bfloat16,
                                                             device_map="cpu")


def test_trainer_trains_a_bitsandbytes_4bit_model_with_slimtune_adapters(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = prepare_model_for_kbit_training(quantized_base(tmp_path / "base"))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], task_type="CAUSAL_LM"))
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, bf16=True, save_steps=3,
                                          disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [trainer.state.log_history[-1]["train_loss"]]
    assert all(0 < loss < 10 for loss in losses)
    model.save_pretrained(tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(quantized_base(tmp_path / "base"), str(tmp_path / "adapter"))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours_logits, their_logits = model(input_ids=ids[:2]).logits, theirs.eval()(input_ids=ids[:2]).logits
    assert rel_err(ours_logits.float(), their_logits.float()) < BF16_TOL  # bf16 compute on both sides
    # a quantised model without adapters is still refused by Trainer (the check the wrapper answers is there)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=quantized_base(tmp_path / "base"), args=args)
