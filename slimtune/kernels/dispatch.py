"""When the Triton kernels run, and how they are launched (shared by every ``*_triton.py`` module).

Triton runs for CUDA tensors in fp32 / fp16 / bf16, and on the CPU only under ``TRITON_INTERPRET=1`` (the tests:
the interpreter is right in fp32 and fp16, not in bf16); everywhere else the plain-PyTorch references run. The
kernel modules import ``triton`` at import time, so callers import them lazily, behind :func:`use_triton`.

**Launch cost.** A training step at a few thousand tokens is host-bound on the lent GPU machines, and Triton's own
launch path (``kernel[grid](...)``: binding the arguments, reading its settings, hashing the specialisation) costs
the host several times a PyTorch op (``benchmarks/host_cost.py``). :func:`launch` therefore keeps, per kernel, the
compiled kernel for each *specialisation key* — what Triton specialises a compiled kernel on: each tensor's dtype
and 16-byte alignment, each integer's ``== 1`` / ``% 16 == 0`` / 32-bit range, the constexpr and launch options —
and launches a cached one directly through the compiled kernel's own runner (``compiled[grid](*args)``). A key
seen for the first time goes through ``kernel[grid](...)``, which compiles or finds the kernel and returns it. Any
surprise (an argument type the key does not know, a Triton without that API) turns the shortcut off for good and
every launch takes Triton's own path; so does every launch while ``torch.compile`` traces (it understands
``kernel[grid](...)``, not the shortcut). ``SLIMTUNE_TRITON_FAST_LAUNCH=0`` turns it off from the start.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = "TRITON_INTERPRET"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``t``: CUDA fp32/fp16/bf16, or the CPU under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON or t.dtype not in TRITON_DTYPES:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get(_INTERPRET) == "1")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (plain Python: ``triton.cdiv`` is a constexpr function, slower to call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# -- the launch shortcut ------------------------------------------------------------------------------
FAST_LAUNCH = os.environ.get("SLIMTUNE_TRITON_FAST_LAUNCH", "1") != "0"


class _Unkeyable(Exception):
    """An argument the specialisation key does not cover."""


def _arg_key(arg: Any) -> Any:
    """What Triton specialises a compiled kernel on for one runtime argument."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return "b", arg
    if isinstance(arg, int):
        width = 0 if -(2 ** 31) <= arg < 2 ** 31 else 1 if arg < 2 ** 63 else 2  # i32 / i64 / u64
        return "i", arg == 1, arg % 16 == 0, width
    if isinstance(arg, float):
        return "f"
    if arg is None:
        return None
    raise _Unkeyable(type(arg).__name__)


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


class _KernelLauncher:
    """The compiled variants of one ``@triton.jit`` kernel, by specialisation key (see the module docstring)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.names = [p.name for p in kernel.params]  # every parameter, in signature order (constexprs too)
        self.compiled: dict[tuple, Any] = {}

    def launch(self, grid: tuple[int, ...], device: int, args: tuple, kwargs: dict[str, Any]) -> None:
        """Launch; raises :class:`_Unkeyable` / ``KeyError`` (before launching) where the key cannot be formed."""
        rest = self.names[len(args):]
        tail = tuple(kwargs[name] for name in rest)  # the constexprs, given by keyword
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in rest))
        key = (device, tuple(map(_arg_key, args)), tail, options)
        compiled = self.compiled.get(key)
        if compiled is not None:
            compiled[_grid3(grid)](*args, *tail)
            return
        compiled = self.kernel[grid](*args, **kwargs)  # compiles or finds it; returns the compiled kernel
        if compiled is not None and hasattr(compiled, "__getitem__"):
            self.compiled[key] = compiled


_LAUNCHERS: dict[int, _KernelLauncher] = {}


def _fast_launch(kernel: Any, t: torch.Tensor, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> bool:
    """Launch through the cache; False: not launched (the shortcut is off, or cannot take this call), so the
    caller takes Triton's path."""
    global FAST_LAUNCH
    if not FAST_LAUNCH or not t.is_cuda or torch.compiler.is_compiling():  # torch.compile traces kernel[grid] itself
        return False
    try:
        launcher = _LAUNCHERS.get(id(kernel))
        if launcher is None:
            launcher = _LAUNCHERS[id(kernel)] = _KernelLauncher(kernel)
        launcher.launch(grid, t.device.index, args, kwargs)
    except (_Unkeyable, KeyError, AttributeError):  # not this Triton's API, or an argument it cannot key
        FAST_LAUNCH = False
        return False
    return True


def launch(kernel: Callable, t: torch.Tensor, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``t``'s device (switching the current device only when it differs);
    the constexprs and launch options go by keyword. Cached compiled kernels launch directly (module docstring)."""
    index = t.device.index
    other_device = index is not None and t.is_cuda and index != torch.cuda.current_device()
    with torch.cuda.device(t.device) if other_device else contextlib.nullcontext():
        if not _fast_launch(kernel, t, grid, args, kwargs):
            kernel[grid](*args, **kwargs)
