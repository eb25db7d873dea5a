"""An optional one-time timing calibration of the variant choosers (RunLoRA's timed criterion, beside its FLOP one).

By default every chooser decides by counting (:func:`slimtune.core.lowrank.choose_backward`: FLOPs). With
``set_variant_criterion("timed")`` a decision seen for the first time — a decision name and everything its variants'
cost depends on (shapes, dtype), on one device — is instead measured: each variant runs on random operands of those
shapes on that device (a private generator: the global random state is untouched), once to warm up and then
:data:`REPEATS` times, and the fastest wins. The winner is cached per decision key and device name (bounded), so
the measurement happens once per shape in a process; :func:`save_timings` / :func:`load_timings` keep the cache in
a JSON file across processes and pin the choices (a timed choice can differ between two processes when the
variants are close, and with it the rounding of the gradients: load a file to make runs repeat bit for bit).

Nothing is timed where it cannot be: on the meta device (the planner's and ``profile --explain``'s simulations), and
while ``torch.compile`` traces or a CUDA graph is being captured, the counting choice is used (a capture's warm-up step runs eagerly first, so its shapes are measured then). The
measurement allocates its operands once per new shape (for LoRA's ``"gram"`` variant a ``[d_out, d_in]`` matrix),
transiently, inside the first backward pass that meets the shape.
"""
from __future__ import annotations

import collections
import json
import os
import time
from typing import Callable

import torch

from ..errors import ConfigError
from .tracing import compiling

CRITERIA = ("flops", "timed")
REPEATS = 3
MAX_ENTRIES = 4096
Key = tuple  # (decision name, its shape/dtype parameters...)

_state = {"criterion": "flops"}
_winners: collections.OrderedDict[tuple[str, Key], str] = collections.OrderedDict()
_seconds: dict[tuple[str, Key], dict[str, float]] = {}


def set_variant_criterion(criterion: str) -> None:
    """``"flops"`` (default: the choosers count) or ``"timed"`` (each new decision measured once; see the module
    docstring)."""
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown variant criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    _state["criterion"] = criterion


def variant_criterion() -> str:
    return _state["criterion"]


def timing() -> bool:
    """Whether the criterion is ``"timed"`` (a chooser asks first, so that its common, counted call builds no timing
    key: a UNet step makes ~300 such calls on a host-bound step)."""
    return _state["criterion"] == "timed"


def device_name(device: torch.device) -> str:
    """The name timings are kept under: the GPU's model (``NVIDIA H200``), or the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _seconds_of(run: Callable[[], object], device: torch.device) -> float:
    """The fastest of :data:`REPEATS` runs of ``run`` after one warm-up run (CUDA events on a GPU)."""
    run()
    best = float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return best


def choose(decision: str, key: Key, device: torch.device, counted: str,
           variants: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """The variant to run: ``counted`` (the counting chooser's pick) unless the criterion is ``"timed"`` and this
    decision can be measured here; then the cached winner, or — the first time — the fastest of ``variants()``
    (each a no-argument callable running one variant on operands it made)."""
    if _state["criterion"] != "timed" or device.type == "meta" or compiling() or _capturing(device):
        return counted
    full = (device_name(device), key)
    cache_key = (decision, full)
    winner = _winners.get(cache_key)
    if winner is not None:
        _winners.move_to_end(cache_key)
        return winner
    with torch.no_grad():
        seconds = {name: _seconds_of(run, device) for name, run in variants().items()}
    winner = min(seconds, key=seconds.__getitem__)
    _winners[cache_key] = winner
    _seconds[cache_key] = seconds
    while len(_winners) > MAX_ENTRIES:
        _seconds.pop(_winners.popitem(last=False)[0], None)
    return winner


def recorded(decision: str, key: Key) -> tuple[str, str] | None:
    """``(winner, device name)`` of ``decision`` for ``key`` as measured in this process or loaded
    (:func:`load_timings`), on any device (the first found); None when it was not. What ``profile --explain
    --timings FILE`` shows in place of the counting choice."""
    for (name, (device, found_key)), winner in _winners.items():
        if name == decision and found_key == key:
            return winner, device
    return None


def timings() -> list[dict]:
    """What was measured in this process (or loaded): decision, device, key, winner and each variant's seconds."""
    return [{"decision": decision, "device": full[0], "key": list(full[1]), "winner": winner,
             "seconds": _seconds.get((decision, full), {})} for (decision, full), winner in _winners.items()]


def clear_timings() -> None:
    _winners.clear()
    _seconds.clear()


def save_timings(path: str | os.PathLike) -> None:
    """Write :func:`timings` as JSON."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(timings(), fh, indent=1)


def load_timings(path: str | os.PathLike) -> int:
    """Read a :func:`save_timings` file into the cache (its winners are used as they are); returns the count."""
    try:
        with open(path, encoding="utf-8") as fh:
            records = json.load(fh)
        entries = [(str(r["decision"]), str(r["device"]), tuple(_plain(v) for v in r["key"]), str(r["winner"]),
                    dict(r.get("seconds", {}))) for r in records]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path}: not a slimtune timings file ({type(exc).__name__}: {exc})") from None
    for decision, device, key, winner, seconds in entries:
        cache_key = (decision, (device, key))
        _winners[cache_key] = winner
        _seconds[cache_key] = seconds
    return len(entries)


def _plain(value: object) -> object:
    """A key element as the cache holds it (JSON has no tuples; dtypes are kept as their names)."""
    return tuple(value) if isinstance(value, list) else value
