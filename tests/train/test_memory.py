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


def test_compiled_layers_train_the_same_steps(lm_data, tmp_path, capsys):
    """``--compile`` (each layer through torch.compile, here Inductor's CPU backend) with ``--memory balanced``
    (the checkpoint wraps the compiled forward): the same losses as the eager run."""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "--memory", "balanced", "--plain-layers", "1"])):
        code, events, err = run_train([*TINY, "--data", str(lm_data), "--out", str(tmp_path / name), "--max-steps",
                                       "2", "--save-every", "0", *extra], capsys)
        assert code == 0, err
        losses[name] = [e["loss"] for e in events if e["event"] == "step"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
