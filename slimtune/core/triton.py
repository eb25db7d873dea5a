"""When the Triton kernels run, and how they are launched (shared by every method's ``triton_kernels.py``).

Triton runs for CUDA tensors in fp32 / fp16 / bf16, and on the CPU only under ``TRITON_INTERPRET=1`` (the tests:
the interpreter is right in fp32 and fp16, not in bf16); everywhere else the plain-PyTorch references run. The
kernel modules import ``triton`` at import time, so callers import them only behind :func:`use_triton` (triton is
an optional dependency: a CPU install has none).

Kernels launch through Triton's own documented path, ``kernel[grid](*args, **kwargs)``, under the tensor's device.
(An earlier hand-made launcher keyed compiled kernels itself and called Triton's launcher directly; it saved
5-10 µs per launch — about 1% of a 3B step — at the price of re-implementing Triton's specialisation rules, so it
was removed.)
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any, Callable

import torch

from .tracing import compiling

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = "TRITON_INTERPRET"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``t``: CUDA fp32/fp16/bf16, or the CPU under ``TRITON_INTERPRET=1`` — and
    not while ``torch.compile`` traces: there the plain-PyTorch references run, which the compiler fuses itself
    (the hand-written kernels launch through Triton's runtime, which a graph cannot hold)."""
    if not HAS_TRITON or t.dtype not in TRITON_DTYPES:
        return False
    return (t.is_cuda or (t.device.type == "cpu" and os.environ.get(_INTERPRET) == "1")) and not compiling()


def current_stream_key(device: torch.device) -> tuple[str, int | None, int]:
    """``(device type, index, stream handle)`` of ``device``'s current stream (handle 0 off CUDA)."""
    if device.type != "cuda":
        return device.type, device.index, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device.type, index, torch.cuda.current_stream(index).cuda_stream


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, elsewhere: int) -> int:
    """Streaming multiprocessors of a CUDA ``device``; ``elsewhere`` for other devices (the interpreter: a stand-in
    the kernel modules pick for their grid rules)."""
    if device.type != "cuda":
        return elsewhere
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (plain Python: ``triton.cdiv`` is a constexpr function, slower to call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def launch(kernel: Callable, t: torch.Tensor, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``t``'s device (switching the current device only when it differs);
    the constexprs and launch options go by keyword."""
    index = t.device.index
    other_device = index is not None and t.is_cuda and index != torch.cuda.current_device()
    with torch.cuda.device(t.device) if other_device else contextlib.nullcontext():
        kernel[grid](*args, **kwargs)
