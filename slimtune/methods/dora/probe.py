"""``dora_recompute="auto"``: deciding, per DoRA Linear layer, whether its output outlives the forward pass anyway."""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from ...core.removers import HandleRemover
from ...core.tracing import compiling


class OutputProbe:
    """``dora_recompute="auto"``: which DoRA Linear layers' outputs outlive the forward pass anyway.

    An undecided layer's first training forward recomputes (keeps nothing of size ``[tokens, d_out]``) and leaves a
    weak reference to its output here. When the root model's forward returns (:meth:`resolve`, a forward hook),
    an output that is still alive is held by something else — the next op saved it, or the caller holds it — so
    keeping it costs no memory: that layer keeps its output from then on (no recomputation). A layer whose output
    is gone recomputes. Each layer is decided once; one pending entry per layer, so nothing grows when the root
    forward never runs (those layers keep recomputing: the memory-lean choice).
    """

    def __init__(self) -> None:
        self._pending: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickling) starts with nothing pending, as a root forward does
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def watch(self, layer: nn.Module, output: torch.Tensor) -> None:
        self._pending[layer] = weakref.ref(output)

    def start(self, *_: object) -> None:
        """The root's forward pre-hook: forget outputs watched outside a root forward (a layer called alone).
        Nothing to do under ``torch.compile``, where no layer watches (:meth:`DoraLinear._undecided`)."""
        if not compiling():
            self._pending.clear()

    def resolve(self, *_: object) -> None:
        if compiling():
            return
        for layer, output_ref in list(self._pending.items()):
            if layer.recompute is None:
                layer.recompute = output_ref() is None
        self._pending.clear()


def attach_output_probe(model: nn.Module, layers: list) -> Callable[[], None] | None:
    """One :class:`OutputProbe` for the undecided DoRA Linear layers among ``layers`` (those with
    ``recompute is None`` and an ``output_probe`` slot), resolved by ``model``'s forward hooks (pre: start, post:
    resolve); returns their remover (None when no layer is undecided)."""
    undecided = [layer for layer in layers if getattr(layer, "recompute", False) is None]
    if not undecided:
        return None
    probe = OutputProbe()
    for layer in undecided:
        layer.output_probe = probe
    return HandleRemover([model.register_forward_pre_hook(probe.start), model.register_forward_hook(probe.resolve)])
