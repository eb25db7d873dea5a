"""Calibration data for ``slimtune allocate``: a JSONL file of texts, put through a model directory's tokenizer
(or, for a preset with random weights, a byte-level one), in batches the model's own loss takes.

Each line of the file is a JSON object with a ``"text"`` string and, optionally, an integer ``"label"``. A model
directory whose architecture is not a causal LM and whose lines all carry labels is loaded for sequence
classification (``AutoModelForSequenceClassification``, one output per label); otherwise as a causal LM
(``AutoModelForCausalLM``, ``labels = input_ids`` with padding masked out). A classifier's default targets are its
Linear layers but the head (which a fine-tune trains whole).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..models.deps import require_transformers
from ..models.jsonl import read_jsonl
from ..models.presets import ModelPreset, build_model, get_preset

CLASSIFIER_HEADS = ("classifier", "score")  # transformers' sequence-classification heads: trained whole, not adapted
Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]  # texts -> input_ids, attention_mask [batch, seq]


@dataclasses.dataclass
class Calibration:
    """A model to measure, its calibration batches, and the targets it is adapted at by default."""

    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    default_targets: str | list[str]
    task: str  # "causal-lm" or "classification"


def read_text_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (:func:`slimtune.models.jsonl.read_jsonl`), each with a non-empty ``"text"``
    (and an integer ``"label"`` if any)."""
    records = []
    for number, record in read_jsonl(path, "data file"):
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            raise DataError(f"{path}:{number}: each line needs a non-empty \"text\" string")
        label = record.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise DataError(f"{path}:{number}: \"label\" must be a non-negative integer, got {label!r}")
        records.append(record)
    return records


def byte_tokenizer(vocab_size: int, max_length: int) -> Tokenize:
    """UTF-8 bytes as token ids (``1 + byte`` modulo the vocabulary; 0 pads), right-padded to the longest text."""
    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [[1 + (b % (vocab_size - 1)) for b in t.encode("utf-8")[:max_length]] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}
    return tokenize


def make_batches(records: list[dict[str, Any]], tokenize: Tokenize, batch_size: int, count: int, task: str
                 ) -> list[dict[str, torch.Tensor]]:
    """Up to ``count`` batches of ``batch_size`` records with the labels ``task`` needs."""
    if batch_size < 1 or count < 1:
        raise ConfigError(f"batch size and batch count must be positive, got {batch_size} and {count}")
    out = []
    for start in range(0, min(len(records), batch_size * count), batch_size):
        chunk = records[start:start + batch_size]
        batch = tokenize([r["text"] for r in chunk])
        if task == "classification":
            batch["labels"] = torch.tensor([r["label"] for r in chunk])
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out.append(batch)
    return out


def _hf_tokenizer(model_dir: Path, max_length: int) -> Tokenize:
    transformers = require_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return tokenize


def from_model_dir(model_dir: str | Path, records: list[dict[str, Any]], batch_size: int, count: int,
                   max_length: int) -> Calibration:
    """A local Hugging Face model directory (config, weights, tokenizer) and batches of ``records``."""
    transformers = require_transformers()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    causal = any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    labelled = all("label" in r for r in records)
    task = "classification" if labelled and not causal else "causal-lm"
    try:
        if task == "classification":
            labels = 1 + max(int(r["label"]) for r in records)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=labels)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {model_dir} for {task}: {exc}") from None
    batches = make_batches(records, _hf_tokenizer(model_dir, max_length), batch_size, count, task)
    targets = "all-linear" if task == "causal-lm" else sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(CLASSIFIER_HEADS))
    return Calibration(model.float(), batches, targets, task)


def from_preset(name: str, records: list[dict[str, Any]], batch_size: int, count: int, max_length: int,
                seed: int = 0) -> Calibration:
    """A language-model preset (random weights) and byte-tokenised causal-LM batches of ``records``."""
    spec = get_preset(name)
    if not isinstance(spec, ModelPreset):
        raise ConfigError(f"preset {name!r} is not a language model; slimtune allocate measures text models")
    model = build_model(spec, device="cpu", dtype=torch.float32, seed=seed)
    batches = make_batches(records, byte_tokenizer(spec.vocab_size, max_length), batch_size, count, "causal-lm")
    return Calibration(model, batches, list(spec.targets), "causal-lm")
