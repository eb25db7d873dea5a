"""The slimtune command line: `slimtune profile` and `slimtune sweep`, in-process through slimtune.cli.main."""
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
                 "median step time", "device", "cpu accounted", "memory after 1st step", "base weights",
                 "adapter weights", "optimizer state", "activations (saved for backward)", "n/a on cpu",
                 "by module kind", "attention"):
        assert text in out


def test_profile_json_has_the_breakdown_and_plot(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "profile.png"
    assert main(["profile", "--json", "--grad-ckpt", "--plot", str(png), *SMALL]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["grad_checkpointing"] and data["quant"] == "none"
    assert data["breakdown"]["temporary"] is None and data["breakdown"]["activations"] > 0
    assert data["activations_by_module"]["checkpoint"] > 0
    assert data["peak_first_step_bytes"] >= data["mem_after_step_bytes"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_profile_a_model_directory(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=100).save_pretrained(tmp_path)
    assert main(["profile", "--json", "--model-dir", str(tmp_path), *SMALL]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "ok" and data["model_dir"] == str(tmp_path) and data["params_trainable"] > 0


@pytest.mark.parametrize("argv, message", [
    (["profile", "--preset", "llama-9b"], "unknown preset 'llama-9b'; available presets: tiny-llama"),
    (["profile", "--rank", "0"], "rank must be a positive integer"),
    (["profile", "--rank", "x"], "invalid int value"),
    (["profile", "--dtype", "int4"], "unsupported dtype"),
    (["profile", "--method", "qlora-xl"], "unknown method"),
    (["profile", "--device", "cpu", "--method", "none", "--compare-peft"], "--compare-peft compares adapters"),
    (["profile", "--device", "cpu", "--method", "none", "--quant", "nf4"], "4-bit weights cannot be trained"),
    (["profile", "--device", "cpu", "--quant", "int2"], "unknown quant 'int2'"),
    (["profile", "--device", "cpu", "--model-dir", "/nonexistent/model"], "does not exist"),
    (["profile", "--device", "cpu", "--alpha", "0"], "alpha must be a finite number > 0, got 0"),
    (["profile", "--device", "cpu", "--alpha", "nan"], "alpha must be a finite number > 0, got nan"),
    (["sweep", "--device", "cpu", "--methods", "lorax"], "unknown sweep method 'lorax'"),
    (["sweep", "--device", "cpu", "--presets", "llama-9b"], "unknown preset 'llama-9b'"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "error" in lines[0]


def test_an_unwritable_plot_path_fails_before_the_run(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    pytest.importorskip("matplotlib")
    for path in (tmp_path / "missing" / "plot.png", tmp_path):  # no such directory; a directory
        assert main(["profile", "--plot", str(path), *SMALL]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and f"--plot {path}: cannot write" in captured.err
    assert list(tmp_path.iterdir()) == []


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
