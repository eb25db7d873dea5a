"""Data: JSONL records, tokenisation (prompt/completion masks), packing, held-out split, data order."""
from __future__ import annotations

import pytest

from slimtune.models.jsonl import read_jsonl
from slimtune.train.data import (IGNORE, ByteTokenizer, DataError, Row, causal_lm_rows, classification_rows,
                                 held_out, label_names, pack)
from slimtune.train.order import DataOrder

from .conftest import write_lines


def test_prompt_completion_puts_the_loss_on_the_completion_only(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}, "", {"text": "xyz"}])
    records = read_jsonl(path)
    assert [n for n, _ in records] == [1, 3]  # blank lines skipped, numbers kept
    tok = ByteTokenizer()
    first, second = causal_lm_rows(records, path, tok, 16, truncate=False)
    assert first.input_ids == [tok.bos_id, 97, 98, 99, 100, tok.eos_id]
    assert first.labels == [IGNORE, IGNORE, IGNORE, 99, 100, tok.eos_id]
    assert first.targets == 3 and first.line == 1
    assert second.labels == second.input_ids and second.targets == second.tokens - 1 == 4


def test_long_samples_are_refused_or_truncated(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "x" * 40}])
    records = read_jsonl(path)
    with pytest.raises(DataError, match=r"d.jsonl:2: 42 tokens, longer than --seq 16; pass --truncate"):
        causal_lm_rows(records, path, ByteTokenizer(), 16, truncate=False)
    rows = causal_lm_rows(records, path, ByteTokenizer(), 16, truncate=True)
    assert rows[1].tokens == 16
    prompt_only = write_lines(tmp_path / "p.jsonl", [{"prompt": "y" * 30, "completion": "z"}])
    with pytest.raises(DataError, match="no token left to learn"):
        causal_lm_rows(read_jsonl(prompt_only), prompt_only, ByteTokenizer(), 16, truncate=True)


def test_packing_keeps_samples_whole_and_in_order():
    rows = [Row([1] * n, [2] * n, i) for i, n in enumerate([5, 4, 8, 3, 9])]
    packed = pack(rows, 10)
    assert [r.tokens for r in packed] == [9, 8, 3, 9]  # 5+4 fit; 8, then 3 (8+3 > 10), then 9 (3+9 > 10)
    assert [r.line for r in packed] == [0, 2, 3, 4] and packed[0].labels == [2] * 9
    assert rows[0].tokens == 5  # the input rows are not changed


def test_classification_labels(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"text": "a b", "label": "spam"}, {"text": "c", "label": "ham"}])
    records = read_jsonl(path)
    names = label_names(records, path)
    assert names == ["ham", "spam"]
    rows = classification_rows(records, path, ByteTokenizer(), 8, False, names, 2)
    assert [r.labels for r in rows] == [1, 0] and rows[0].targets == 1
    mixed = write_lines(tmp_path / "m.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "x"}])
    with pytest.raises(DataError, match="mix integers and strings"):
        label_names(read_jsonl(mixed), mixed)


def test_held_out_split_and_data_order_are_seeded():
    train, test = held_out(list(range(20)), 0.25, seed=3)
    assert len(test) == 5 and sorted(train + test) == list(range(20)) and train == sorted(train)
    assert held_out(list(range(20)), 0.25, seed=3) == (train, test)
    order = DataOrder(5, seed=1)
    first = order.take(0, 5)
    assert sorted(first) == list(range(5))
    assert order.take(3, 4) == first[3:] + DataOrder(5, seed=1).take(5, 2)  # a batch runs into the next epoch
    assert DataOrder(None, 0).take(7, 3) == [7, 8, 9]
