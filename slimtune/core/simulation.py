"""Work counters a simulated training step reports (the memory estimator runs one on PyTorch's meta device).

Code that does on the GPU what the meta device cannot show — NF4 dequantisation traffic, flash attention's FLOPs —
calls :func:`count`; :func:`counting` collects the amounts for the duration of one simulation. The counters live
in a context variable: nothing is counted outside a ``counting()`` block, and nothing leaks between threads.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator


@dataclasses.dataclass
class Work:
    """What a simulated step computes beyond the GEMMs / convolutions its dispatch mode counts itself."""

    attention_flops: float = 0.0  # flash attention, forward and backward
    dequant_bytes: float = 0.0  # NF4 dequantisation traffic (0.5 byte read + the dense write per element)
    cuda: bool = True  # the step mirrors what CUDA's kernels allocate (the estimator's ``device="cuda"``)


_CURRENT: contextvars.ContextVar[Work | None] = contextvars.ContextVar("slimtune_simulated_work", default=None)


def count(**amounts: float) -> None:
    """Add ``amounts`` (fields of :class:`Work`) to the running simulation's counters; nothing outside one."""
    work = _CURRENT.get()
    if work is not None:
        for name, value in amounts.items():
            setattr(work, name, getattr(work, name) + value)


def mirrors_cuda() -> bool:
    """Whether a simulation is running and mirrors CUDA's kernels: code whose CUDA path allocates differently
    (e.g. a GEMM that writes fp32 from bf16 inputs) takes that path's shape on meta tensors too."""
    work = _CURRENT.get()
    return work is not None and work.cuda


def current() -> Work | None:
    """The running simulation's counters (None outside a :func:`counting` block)."""
    return _CURRENT.get()


@contextlib.contextmanager
def counting(work: Work | None = None) -> Iterator[Work]:
    """Collect :func:`count` calls into ``work`` (default: a fresh :class:`Work`) for the duration of the block;
    passing the running simulation's ``work`` continues it, e.g. on another thread."""
    work = Work() if work is None else work
    token = _CURRENT.set(work)
    try:
        yield work
    finally:
        _CURRENT.reset(token)
