"""What ``adapt`` keeps to take its model-level hooks away again (``unload``): plain objects — hook handles, the
modules it changed — never closures, so that a copy of the model (``copy.deepcopy``) carries a remover of its own
hooks, not of the original's."""
from __future__ import annotations

from typing import Callable, Iterable

from torch.utils.hooks import RemovableHandle


class Removers:
    """Calls each of ``removers`` (None entries skipped), in order."""

    def __init__(self, removers: Iterable[Callable[[], None] | None]) -> None:
        self.removers = [r for r in removers if r is not None]

    def __call__(self) -> None:
        for remover in self.removers:
            remover()


class HandleRemover:
    """Removes hook ``handles`` (``RemovableHandle``: a copy of the model maps them onto its own hooks)."""

    def __init__(self, handles: Iterable[RemovableHandle]) -> None:
        self.handles = list(handles)

    def __call__(self) -> None:
        for handle in self.handles:
            handle.remove()
