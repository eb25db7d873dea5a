"""A fine-tuning job written as a PEFT user writes it, run by the tests twice from the same text: with PEFT, and with
its one import line changed to slimtune.

The job: build a tiny Llama (a causal LM, or a classifier for ``modules_to_save``), ``get_peft_model``, optionally a
second named adapter made active, transformers' ``Trainer`` with ``save_steps``, ``save_pretrained``, load the saved
adapter onto a fresh model (``PeftModel.from_pretrained``, ``load_adapter``), ``merge_and_unload``,
``save_pretrained`` of the merged model and ``from_pretrained`` of that.
"""
from __future__ import annotations

from typing import Any

JOB = '''
import torch
import transformers
from peft import {config_class}, PeftModel, get_peft_model


def make_base(kind):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, num_labels=3, pad_token_id=0)
    cls = transformers.LlamaForSequenceClassification if kind == "classifier" else transformers.LlamaForCausalLM
    return cls(cfg)


def dataset(kind):
    ids = torch.randint(1, 64, (8, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 3 if kind == "classifier" else ids
    return [{{"input_ids": i, "labels": y}} for i, y in zip(ids, labels)]


def run(out, kind, config, second=None, resume=None):
    model = get_peft_model(make_base(kind), {config_class}(**config))
    if second is not None:
        model.add_adapter("second", {config_class}(**second))
        model.set_adapter("second")
    model.print_trainable_parameters()
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=2, save_steps=1,
                                          learning_rate=0.02, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                                          logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=dataset(kind)).train(resume_from_checkpoint=resume)
    model.save_pretrained(out + "/adapter")

    loaded = PeftModel.from_pretrained(make_base(kind), out + "/adapter")
    if second is not None:
        loaded.load_adapter(out + "/adapter/second", adapter_name="second")
        loaded.set_adapter("second")
    merged = loaded.merge_and_unload()
    merged.save_pretrained(out + "/merged")
    reloaded = type(merged).from_pretrained(out + "/merged")
    return model, merged, reloaded
'''


def job_source(library: str, config_class: str) -> str:
    """The job's text importing from ``library`` (``peft``: as written; ``slimtune``: the one line changed)."""
    source = JOB.format(config_class=config_class)
    return source if library == "peft" else source.replace("from peft import", "from slimtune import")


def load_job(library: str, config_class: str) -> dict[str, Any]:
    """The job's namespace (``run``, ``make_base``, ``dataset``), executed from :func:`job_source`."""
    namespace: dict[str, Any] = {"__name__": f"peft_job_{library}"}
    exec(compile(job_source(library, config_class), f"<peft job: {library}>", "exec"), namespace)
    return namespace
