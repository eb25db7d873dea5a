"""``slimtune profile --explain``: a preset's layers explained on the meta device, and the command line."""
from __future__ import annotations

import json

import pytest

from slimtune.cli import main
from slimtune.models.explain import explain_preset


def test_every_targeted_layer_of_a_preset_is_explained():
    rows = explain_preset("tiny-llama", "loha", rank=4, alpha=None, batch=2, seq=16, dtype="float32")
    assert len(rows) == 28 and all(row.input_shape[:2] == (2, 16) for row in rows)
    assert all(row.choices[0].what == "path (fwd+bwd)" for row in rows)


def test_profile_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--explain", "--json", "--method", "dora", "--seq", "16", "--rank", "4"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert layers[0]["adapter"] == "DoraLinear"
    assert [c["what"] for c in layers[0]["choices"]] == ["backward dA/dB (rank 4)", "kept for dm"]


def test_profile_explain_table_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--explain", "--method", "lora", "--seq", "16"]) == 0
    assert "recompute" in capsys.readouterr().out
    assert main(["profile", "--explain", "--method", "none"]) == 2
    assert "--explain" in capsys.readouterr().err
