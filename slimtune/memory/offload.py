"""Keeping tensors saved for backward in CPU memory: :class:`CpuOffload`, a pair of saved-tensor hooks.

Inside ``with CpuOffload():`` every tensor autograd saves for backward that lives on a CUDA device and holds at
least ``min_bytes`` is copied to pinned CPU memory on a side stream (so the copy overlaps the forward's compute;
the device copy is released once the side stream is done with it) and copied back, again on the side stream, when
backward unpacks it (the compute stream waits for that copy only). Parameters are never moved (they stay on the
device anyway). Tensors on the CPU are kept as they are. A meta tensor (the memory estimator's simulated step,
:mod:`.estimate`) is dropped and only its shape kept; unpacking makes a new one, as the copy back allocates.

Used around per-layer activation checkpointing (:mod:`.recompute`), where what autograd saves is each layer's
input hidden states: ``[batch, seq, hidden]`` per decoder layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

#: tensors smaller than this stay where they are (a copy's fixed cost outweighs the bytes)
MIN_OFFLOAD_BYTES = 1 << 20


@dataclasses.dataclass
class _Offloaded:
    """A saved tensor's CPU copy, the device it returns to, and the side-stream event its copy completes at."""

    cpu: torch.Tensor
    device: torch.device
    copied: Any


@dataclasses.dataclass
class _OffloadedMeta:
    """A simulated (meta) saved tensor's layout: what unpacking allocates again."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class CpuOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep saved CUDA tensors of ``min_bytes`` or more in pinned CPU memory until backward.
    ``offloaded_bytes``: what was moved so far (for tests and reports)."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.min_bytes = min_bytes
        self.offloaded_bytes = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        super().__init__(self.pack, self.unpack)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def moves(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` goes to the CPU: on a CUDA (or meta) device, ``min_bytes`` or more, not a parameter."""
        return (tensor.device.type in ("cuda", "meta") and not isinstance(tensor, nn.Parameter)
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Offloaded | _OffloadedMeta:
        if not self.moves(tensor):
            return tensor
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type == "meta":
            return _OffloadedMeta(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is complete
        with torch.cuda.stream(stream):
            cpu = torch.empty_like(tensor, device="cpu", pin_memory=True)
            cpu.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        tensor.record_stream(stream)  # its memory is not reused before the copy is done
        return _Offloaded(cpu, tensor.device, copied)

    def unpack(self, packed: torch.Tensor | _Offloaded | _OffloadedMeta) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, _OffloadedMeta):
            return torch.empty_strided(packed.shape, packed.stride, dtype=packed.dtype, device="meta")
        stream = self._stream(packed.device)
        with torch.cuda.stream(stream):
            stream.wait_event(packed.copied)
            tensor = packed.cpu.to(packed.device, non_blocking=True)
        current = torch.cuda.current_stream(packed.device)
        current.wait_stream(stream)
        tensor.record_stream(current)
        return tensor
