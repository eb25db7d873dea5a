"""Counting the bytes a training step holds, for devices with no allocator statistics (the CPU).

Every figure counts unique storages, so tied weights, views and a tensor saved by several operations
count once. The accounted peak of a step is

    parameters + buffers + gradients + optimizer state + tensors saved for backward (parameters excluded)

which leaves out short-lived temporaries (the CUDA allocator's peak includes them).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(data pointer, bytes)`` of the tensor's storage, or ``None`` for tensors without one."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    loose = 0
    for tensor in tensors:
        key = _storage_key(tensor)
        if key is None:
            loose += _tensor_bytes(tensor)
        elif key[1]:
            seen[key[0]] = key[1]
    return sum(seen.values()) + loose


def module_state_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return storage_bytes([*model.parameters(), *model.buffers()])


def gradient_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the ``.grad`` tensors of ``params`` that have one."""
    return storage_bytes(p.grad for p in params if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors in an optimizer's state (Adam's moments, step counters)."""
    if optimizer is None:
        return 0
    return storage_bytes(v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor))


class SavedTensorMeter:
    """Counts the distinct storages autograd saves for backward inside :meth:`record`.

    Storages in ``exclude`` (the model's parameters and buffers) are not counted. The meter holds a
    reference to each counted storage while recording so that a freed storage's address cannot be
    reused and miscounted; :meth:`record` drops them on exit. Tensors saved inside a region that
    installs its own hooks (non-reentrant gradient checkpointing) are not seen.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {key[0] for key in map(_storage_key, exclude) if key is not None}
        self._held: dict[int, torch.UntypedStorage] = {}
        self.bytes = 0
        self.count = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            self.bytes += _tensor_bytes(tensor)
            self.count += 1
            return tensor
        if ptr not in self._exclude and ptr not in self._held and storage.nbytes():
            self._held[ptr] = storage
            self.bytes += storage.nbytes()
            self.count += 1
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @contextlib.contextmanager
    def record(self) -> Iterator["SavedTensorMeter"]:
        """Count (from zero) what is saved for backward inside the block."""
        self.bytes, self.count = 0, 0
        self._held.clear()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._held.clear()
