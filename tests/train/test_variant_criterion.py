"""``slimtune train --variant-criterion timed``: each shape's backward variant measured once, the choices written
beside the checkpoints (``timings.json``) and read back by ``--resume``; the process's criterion restored after."""
from __future__ import annotations

import json

from slimtune.core import timed

from .conftest import TINY, run_train


def test_timed_choices_are_kept_with_the_run(lm_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--data", str(lm_data), "--out", str(out), "--max-steps", "2", "--variant-criterion", "timed"]
    code, _, err = run_train(args, capsys)
    assert code == 0, err
    records = json.loads((out / "timings.json").read_text())
    assert records and {r["decision"] for r in records} == {"lowrank-backward"}
    assert all(r["winner"] in ("recompute", "gram") and set(r["seconds"]) == {"recompute", "gram"} for r in records)
    assert timed.variant_criterion() == "flops"  # the process's setting is back
    timed.clear_timings()
    code, _, err = run_train([*args[:-1], "flops", "--resume"], capsys)  # the criterion is part of the run
    assert code == 2 and "variant_criterion: 'timed' -> 'flops'" in err
