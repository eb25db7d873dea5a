"""Shared pieces of the ``slimtune train`` tests: small data files and running the command line in-process."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from slimtune.cli import main

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers".split()


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def lm_records(count: int = 48, seed: int = 0) -> list[dict]:
    """Short English-like samples: two of three plain text, one of three prompt/completion."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 3 == 0:
            out.append({"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " ".join(rng.choices(WORDS, k=5))})
        else:
            out.append({"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))})
    return out


@pytest.fixture
def lm_data(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "lm.jsonl", lm_records())


#: a tiny-llama run of a few seconds on the CPU (rows of up to 64 bytes, LoRA r=4)
TINY = ["--preset", "tiny-llama", "--seq", "64", "--rank", "4", "--batch", "4", "--lr", "1e-3", "--device", "cpu",
        "--dtype", "float32", "--json"]


def run_train(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict], str]:
    """``slimtune train ARGS`` in this process: (exit status, the JSON events on stdout, stderr)."""
    code = main(["train", *args])
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    return code, events, captured.err


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
