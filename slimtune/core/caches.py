"""Caches keyed safely: a bounded cache for per-shape decisions (paths, plans: the oldest entry goes when it is
full), :class:`TensorStamp`, which tells whether a tensor still holds what a cached value was derived from, and
:class:`TensorMark`, which tells whether a later call sees the very same tensor object, unchanged — never by ``id()``
or a storage address, which a new object can reuse."""
from __future__ import annotations

import collections
import weakref
from typing import Callable, Generic, Hashable, TypeVar

import torch

from .autograd_state import tensor_version

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """``key -> value`` with at most ``size`` entries; keys must be plain values (shapes, dtypes, devices), never
    ``id()`` or storage addresses, which a new object can reuse."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._entries: collections.OrderedDict[Hashable, V] = collections.OrderedDict()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The cached value for ``key``, made (and cached) on a miss."""
        entries = self._entries
        value = entries.get(key)
        if value is None:
            value = entries[key] = make()
            if len(entries) > self.size:
                entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _dead_reference() -> None:
    """What a copied stamp or mark refers to: nothing (a dead weak reference's answer)."""
    return None


class TensorStamp:
    """What a tensor held when a value was derived from it, to tell later whether it still holds that: its storage
    object (weakly referenced: a new tensor, even at a reused address, never matches), its in-place version counter
    and its shape. A new dtype or device is a new storage; ``param.data = other`` swaps the storage too. Checked on
    every forward of a DoRA layer, so it reads as little as it can."""

    __slots__ = ("_storage", "_meta")

    def __init__(self, t: torch.Tensor) -> None:
        self._storage = weakref.ref(t.untyped_storage())
        self._meta = self._describe(t)

    @staticmethod
    def _describe(t: torch.Tensor) -> tuple:
        return tensor_version(t), t.shape, t.storage_offset()

    def __getstate__(self) -> tuple:  # a copy (deepcopy, pickling) holds another storage: it never matches
        return (None,)

    def __setstate__(self, state: tuple) -> None:
        self._storage, self._meta = _dead_reference, (None,)

    def matches(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is still the tensor (storage and contents' version) this stamp was taken of."""
        meta = self._meta
        return meta[0] is not None and meta == self._describe(t) and self._storage() is t.untyped_storage()


class TensorMark:
    """A tensor object as a call saw it — weakly held (a new tensor, even at a reused address, never matches) — and
    its in-place version then: whether a later call sees that very object, unchanged. For hand-offs between
    consecutive calls (a GroupNorm's output to the SiLU after it, an input shared by sibling layers)."""

    __slots__ = ("_ref", "_version")

    def __init__(self, t: torch.Tensor) -> None:
        self._ref = weakref.ref(t)
        self._version = tensor_version(t)

    def __getstate__(self) -> tuple:  # a copy (deepcopy, pickling) refers to no tensor: it never matches
        return (None,)

    def __setstate__(self, state: tuple) -> None:
        self._ref, self._version = _dead_reference, None

    def matches(self, t: torch.Tensor) -> bool:
        return self._ref() is t and self._version is not None and tensor_version(t) == self._version
