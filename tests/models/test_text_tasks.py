"""The offline real-text task: real sentences, four balanced labels, deterministic, a stratified split."""
from collections import Counter

import pytest

from slimtune.errors import ConfigError
from slimtune.models.text_tasks import FAMILIES, LABELS, WIDE_FAMILIES, docstring_task, split, write_jsonl


def test_balanced_deterministic_and_distinct(tmp_path):
    examples = docstring_task(seed=0)
    counts = Counter(e["label"] for e in examples)
    assert sorted(counts) == list(range(len(LABELS))) and len(set(counts.values())) == 1
    assert min(counts.values()) >= 100
    assert examples == docstring_task(seed=0) and examples != docstring_task(seed=1)
    assert len({e["text"] for e in examples}) == len(examples)
    train, test = split(examples, 0.25, seed=0)
    assert not {e["text"] for e in train} & {e["text"] for e in test}
    assert set(Counter(e["label"] for e in test).values()) == {len(test) // len(LABELS)}
    path = write_jsonl(test, tmp_path / "test.jsonl")
    assert len(path.read_text().splitlines()) == len(test)
    with pytest.raises(ConfigError, match="test_fraction"):
        split(examples, 1.5)


def test_wide_families_hold_the_standard_task_and_about_twice_as_much():
    standard = {e["text"]: e["label"] for e in docstring_task(seed=0)}
    wide = docstring_task(seed=0, families=WIDE_FAMILIES)
    counts = Counter(e["label"] for e in wide)
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 200  # balanced, ~2x the standard task
    labels = {e["text"]: e["label"] for e in wide}
    assert all(labels[t] == y for t, y in standard.items() if t in labels)  # a sentence keeps its label
    with pytest.raises(ConfigError, match="families must name the labels"):
        docstring_task(families=FAMILIES[::-1])
