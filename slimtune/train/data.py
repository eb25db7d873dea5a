"""Training data: JSONL records, tokenizers, and the token rows a training step is made of.

Records, one JSON object per line (blank lines are skipped):

* ``causal-lm``: ``{"text": ...}`` (loss on every token), or ``{"prompt": ..., "completion": ...}`` (loss on
  the completion only; the prompt's tokens get label -100);
* ``classification``: ``{"text": ..., "label": ...}``, labels all integers from 0 or all strings (names, numbered
  in sorted order).

Text goes through the model directory's own tokenizer (transformers' ``AutoTokenizer``) or, for presets (random
weights, no tokenizer), :class:`ByteTokenizer`. A row longer than ``seq`` tokens is refused, naming its line,
unless ``truncate`` is set. Short causal-LM rows are packed: whole samples go one after another into rows of up to
``seq`` tokens (causal attention runs across the samples of a row, as in transformers' ``run_clm`` grouping; no
sample is split). Every error names the file and line.
"""
from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, DataError
from ..models.deps import require_transformers

IGNORE = -100  # the label of a token without loss (transformers' and PyTorch's ignore_index)
#: files a model directory's tokenizer is read from (one of them must be there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")


@dataclasses.dataclass
class Row:
    """One row of a batch: ``input_ids`` (list of ints, ``tokens`` long), and ``labels``: per token (causal-LM,
    -100 where there is no loss) or one class index (classification). ``targets``: the positions that carry loss
    (causal-LM: labels after the one-token shift), ``line``: the JSONL line of its first sample."""

    input_ids: list[int]
    labels: list[int] | int
    line: int

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @functools.cached_property
    def targets(self) -> int:
        if isinstance(self.labels, int):
            return int(self.labels != IGNORE)
        return sum(1 for label in self.labels[1:] if label != IGNORE)


# -- tokenizers -------------------------------------------------------------------------------------
class Tokenizer(Protocol):
    eos_id: int | None
    pad_id: int
    vocab_size: int

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``; ``special``: with the tokenizer's start (and end) tokens around it."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then BOS 256 and EOS 257 (also the padding id): for presets, which have random
    weights and no tokenizer files. Needs a vocabulary of at least 258."""

    vocab_size = 258
    bos_id, eos_id, pad_id = 256, 257, 257

    def encode(self, text: str, special: bool) -> list[int]:
        return ([self.bos_id] if special else []) + list(text.encode("utf-8"))


def has_tokenizer(model_dir: str) -> bool:
    """Whether a model directory holds tokenizer files (:data:`TOKENIZER_FILES`)."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


class HFTokenizer:
    """A model directory's tokenizer (``transformers.AutoTokenizer``); padding id: its pad, else EOS, else 0."""

    def __init__(self, model_dir: str) -> None:
        transformers = require_transformers()
        if not has_tokenizer(model_dir):
            raise ConfigError(f"--model {model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"--model {model_dir}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None))
        self.vocab_size = len(tok)

    def encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])


def _text(path: Path, number: int, record: dict[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _fit(path: Path, number: int, ids: list[int], labels: list[int], seq: int, truncate: bool
         ) -> tuple[list[int], list[int]]:
    if len(ids) <= seq:
        return ids, labels
    if not truncate:
        raise DataError(f"{path}:{number}: {len(ids)} tokens, longer than --seq {seq}; pass --truncate to cut "
                        "long samples, or a larger --seq (up to the model's context)")
    return ids[:seq], labels[:seq]


def causal_lm_rows(records: list[tuple[int, dict[str, Any]]], path: str | Path, tokenizer: Tokenizer, seq: int,
                   truncate: bool) -> list[Row]:
    """One row per record: ``text`` (loss on all tokens) or ``prompt`` + ``completion`` (loss on the completion
    and the EOS token that ends it)."""
    path = Path(path)
    rows = []
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    for number, record in records:
        if "text" in record:
            ids = tokenizer.encode(_text(path, number, record, "text"), special=True)
            ids = ids + eos if ids[-1:] != eos else ids
            labels = list(ids)
        elif "prompt" in record and "completion" in record:
            prompt = tokenizer.encode(_text(path, number, record, "prompt"), special=True)
            completion = tokenizer.encode(_text(path, number, record, "completion"), special=False) + eos
            ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        else:
            raise DataError(f"{path}:{number}: a causal-lm record needs \"text\", or \"prompt\" and \"completion\" "
                            f"(found {', '.join(map(repr, record)) or 'no keys'})")
        ids, labels = _fit(path, number, ids, labels, seq, truncate)
        row = Row(ids, labels, number)
        if row.targets == 0:
            raise DataError(f"{path}:{number}: no token left to learn from (an empty text or completion, or a "
                            f"prompt that fills --seq {seq})")
        rows.append(row)
    return rows


def label_names(records: list[tuple[int, dict[str, Any]]], path: str | Path) -> list[str] | None:
    """Class names when the labels are strings (sorted), ``None`` when they are integers; checks the labels."""
    path = Path(path)
    kinds = set()
    for number, record in records:
        if "text" not in record or "label" not in record:
            raise DataError(f"{path}:{number}: a classification record needs \"text\" and \"label\" "
                            f"(found {', '.join(map(repr, record)) or 'no keys'})")
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, int) and label < 0):
            raise DataError(f"{path}:{number}: \"label\" must be a class index (integer >= 0) or a class name "
                            f"(string), got {label!r}")
        kinds.add(type(label))
    if len(kinds) > 1:
        raise DataError(f"{path}: labels mix integers and strings; use one kind")
    return sorted({r["label"] for _, r in records}) if kinds == {str} else None


def classification_rows(records: list[tuple[int, dict[str, Any]]], path: str | Path, tokenizer: Tokenizer,
                        seq: int, truncate: bool, names: list[str] | None, num_labels: int) -> list[Row]:
    """One row per record, its label an index below ``num_labels`` (names: their position in ``names``)."""
    path = Path(path)
    rows = []
    for number, record in records:
        label = record.get("label")
        if names is not None:
            if label not in names:
                raise DataError(f"{path}:{number}: label {label!r} is not among the training labels "
                                f"({', '.join(map(repr, names))})")
            label = names.index(label)
        elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise DataError(f"{path}:{number}: label {label!r} is not a class index in [0, {num_labels})")
        ids = tokenizer.encode(_text(path, number, record, "text"), special=True)
        ids, _ = _fit(path, number, ids, [], seq, truncate)
        rows.append(Row(ids, label, number))
    return rows


def pack(rows: list[Row], seq: int) -> list[Row]:
    """Whole rows, in order, concatenated into rows of at most ``seq`` tokens (a row that does not fit starts a
    new one)."""
    packed: list[Row] = []
    for row in rows:
        last = packed[-1] if packed else None
        if last is not None and last.tokens + row.tokens <= seq:
            last.input_ids = last.input_ids + row.input_ids
            last.labels = list(last.labels) + list(row.labels)  # type: ignore[arg-type]
        else:
            packed.append(Row(list(row.input_ids), list(row.labels), row.line))  # type: ignore[arg-type]
    return packed


def held_out(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(train, held out)``: ``round(len * fraction)`` items (at least 1) drawn with ``seed`` are held out; both
    parts keep the file's order."""
    count = max(1, round(len(items) * fraction))
    if count >= len(items):
        raise DataError(f"--eval-fraction {fraction} of {len(items)} samples leaves nothing to train on")
    chosen = set(random.Random(seed).sample(range(len(items)), count))
    return ([x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen])
