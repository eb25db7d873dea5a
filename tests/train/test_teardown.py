"""The end of a distributed run: what holds the process group (a DDP reducer, FSDP's hooks) is freed while the group
lives, on every process, before any process tears the group down (gloo once aborted a process of a finished two-
process run in CI: 'terminate called without an active exception')."""
from __future__ import annotations

import contextlib
import gc
import weakref

import torch
import torch.distributed as dist

from slimtune.train import distributed, run
from slimtune.train.loop import Loop

from .conftest import TINY, run_train


class _Holder:
    """A reference cycle, as modules and their hooks make: freed only by a collection."""

    def __init__(self) -> None:
        self.me = self


def test_process_group_frees_what_the_body_dropped_before_the_barrier(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier, holder alive: %s" % alive()))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    gc.disable()  # no collection by chance between the body and the barrier
    try:
        with distributed.process_group("ddp", torch.device("cpu")):
            holder = _Holder()
            alive = weakref.ref(holder)
            del holder
    finally:
        gc.enable()
    assert calls == ["init", "barrier, holder alive: None", "destroy"]


def test_train_drops_its_loop_before_the_group_ends(monkeypatch, lm_data, tmp_path, capsys):
    at_exit: list[int] = []

    @contextlib.contextmanager
    def recording_group(mode: str, device: torch.device):
        yield
        gc.collect()
        at_exit.append(sum(type(o) is Loop for o in gc.get_objects()))

    monkeypatch.setattr(run, "process_group", recording_group)
    code, _, err = run_train([*TINY, "--data", str(lm_data), "--out", str(tmp_path / "out"), "--max-steps", "1"],
                             capsys)
    assert code == 0, err
    assert at_exit == [0]
