"""``slimtune allocate``: a preset on a JSONL file, its JSON output and plot, and one-line errors."""
from __future__ import annotations

import json

import pytest

from slimtune.cli import main

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return the gamma function at x.",
         "Open a file and return a stream.", "Split the pathname into a pair (head, tail)."]


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return path


def test_allocate_a_preset(data, tmp_path, capsys):
    out, plot = tmp_path / "ranks.json", tmp_path / "ranks.png"
    code = main(["allocate", "--preset", "tiny-llama", "--data", str(data), "--budget", "150k", "--rank", "8",
                 "--granule", "4", "--batches", "2", "--batch-size", "2", "--max-length", "24",
                 "--out", str(out), "--plot", str(plot)])
    assert code == 0
    result = json.loads(out.read_text())
    step = max(4 * (layer["d_in"] + layer["d_out"]) for layer in result["layers"])  # one granule's cost
    assert result["used"] <= result["budget"] == 150_000 and result["budget"] - result["used"] < step
    assert len(result["rank_pattern"]) == len(result["layers"]) > 0
    assert plot.stat().st_size > 0
    assert "rank allocation" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "budget must be positive"),
    (["--budget", "10G"], "larger than fine-tuning"),
    (["--method", "fisher"], "invalid choice"),
])
def test_allocate_errors_are_one_line(data, capsys, argv, message):
    code = main(["allocate", "--preset", "tiny-llama", "--data", str(data), "--batches", "1", "--batch-size", "2",
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_allocate_bad_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text"}\n', encoding="utf-8")
    assert main(["allocate", "--preset", "tiny-llama", "--data", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_allocate_reads_what_train_reads(tmp_path, capsys):
    """Prompt/completion records calibrate as they train (one data path: slimtune.train.calibration)."""
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:12], "completion": t[12:]}) + "\n" for t in TEXTS),
                    encoding="utf-8")
    code = main(["allocate", "--preset", "tiny-llama", "--data", str(data), "--budget", "150k", "--rank", "8",
                 "--granule", "4", "--batches", "2", "--batch-size", "2", "--max-length", "24", "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["rank_pattern"]


def test_allocate_a_classifier_with_named_classes(tmp_path, capsys):
    package = pytest.importorskip("all_minilm_l6_v2")
    model = package.get_model_path(str(tmp_path / "minilm"))
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": ["code", "prose"][i % 2]}) + "\n"
                            for i, t in enumerate(TEXTS)), encoding="utf-8")
    capsys.readouterr()  # the model package's own messages
    code = main(["allocate", "--model", str(model), "--data", str(data), "--rank", "8", "--granule", "4",
                 "--batches", "1", "--batch-size", "4", "--max-length", "16", "--json"])
    assert code == 0, capsys.readouterr().err
    layers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"]
    assert layers and not any(layer["name"].endswith("classifier") for layer in layers)
