"""``slimtune train --memory``: every setting trains the same steps (checkpointing and offload are exact)."""
from __future__ import annotations

import pytest

from .conftest import TINY, run_train


def test_memory_settings_train_the_same_steps(lm_data, tmp_path, capsys):
    losses = {}
    for memory in ("fast", "max-fit"):
        out = tmp_path / memory
        code, events, err = run_train([*TINY, "--data", str(lm_data), "--out", str(out), "--max-steps", "2",
                                       "--save-every", "0", "--memory", memory], capsys)
        assert code == 0, err
        losses[memory] = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses["fast"]) == 2
    assert losses["max-fit"] == pytest.approx(losses["fast"], rel=1e-5)
