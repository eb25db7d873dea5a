"""The slimtune command line: `slimtune profile`, in-process through slimtune.cli.main."""
from __future__ import annotations

import json

import pytest

from slimtune.cli import main

SMALL = ["--device", "cpu", "--batch", "1", "--seq", "16", "--steps", "2", "--rank", "4"]


def test_profile_json_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--json", *SMALL]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "ok" and data["preset"] == "tiny-llama" and data["backend"] == "slimtune"
    assert 0 < data["params_trainable"] < data["params_total"]
    assert data["peak_bytes"] >= data["mem_created_bytes"] > 0
    assert data["step_time_s"] > 0


def test_profile_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["profile", *SMALL]) == 0
    out = capsys.readouterr().out
    for text in ("slimtune", "params total", "params trainable", "memory after creation", "peak memory",
                 "median step time", "device", "cpu accounted"):
        assert text in out


@pytest.mark.parametrize("argv, message", [
    (["profile", "--preset", "llama-9b"], "unknown preset 'llama-9b'; available presets: tiny-llama"),
    (["profile", "--rank", "0"], "rank must be a positive integer"),
    (["profile", "--rank", "x"], "invalid int value"),
    (["profile", "--dtype", "int4"], "unsupported dtype"),
    (["profile", "--method", "qlora-xl"], "unknown method"),
    (["profile", "--device", "cpu", "--method", "none", "--compare-peft"], "--compare-peft compares LoRA"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "error" in lines[0]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--help"]) == 0
    assert "--compare-peft" in capsys.readouterr().out


def test_compare_peft_has_a_column_per_backend(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["profile", "--compare-peft", *SMALL]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "slimtune" in line and "PEFT" in line)
    assert "PEFT default (fp32 adapters)" in header and "PEFT (no upcast, float32)" in header
    assert "peak: slimtune/col" in out and "step time: slimtune/col" in out
    ratio_line = next(line for line in out.splitlines() if "peak: slimtune/col" in line)
    assert ratio_line.count("×") == 3  # slimtune's 1.00× and one ratio per PEFT column
