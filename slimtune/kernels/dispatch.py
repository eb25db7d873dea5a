"""When the Triton kernels run, and how they are launched (shared by every ``*_triton.py`` module).

Triton runs for CUDA tensors in fp32 / fp16 / bf16, and on the CPU only under ``TRITON_INTERPRET=1`` (the tests:
the interpreter is right in fp32 and fp16, not in bf16); everywhere else the plain-PyTorch references run. The
kernel modules import ``triton`` at import time, so callers import them lazily, behind :func:`use_triton`.

**Launch cost.** A training step at a few thousand tokens is host-bound on the lent GPU machines, and Triton's own
launch path (``kernel[grid](...)``: binding the arguments, reading its settings, hashing the specialisation) costs
the host several times a PyTorch op (``benchmarks/host_cost.py``). :func:`launch` therefore keeps, per kernel, the
compiled kernel for each *specialisation key* — what Triton specialises a compiled kernel on: each tensor's dtype
and 16-byte alignment, each integer's ``== 1`` / ``% 16 == 0`` / 32-bit range, the constexpr and launch options —
and launches a cached one directly: through the launcher Triton's runner calls (where this Triton's runner is the
known one: no per-launch device, stream and metadata lookups), else through the runner (``compiled[grid](*args)``).
Keys are tuples of small ints, so forming one allocates a single object (the step's garbage is the collector's
work). A key seen for the first time goes through ``kernel[grid](...)``, which compiles or finds the kernel and
returns it. Any surprise (an argument type the key does not know, a Triton without that API) turns the shortcut off for good and
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


def current_stream_id(device: torch.device) -> int:
    """The raw handle of ``device``'s current CUDA stream (0 for other devices)."""
    if device.type != "cuda":
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device, elsewhere: int) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached per device); ``elsewhere`` for other devices (the
    interpreter: a stand-in the kernel modules pick for their grid rules)."""
    if device.type != "cuda":
        return elsewhere
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNTS.get(index)
    if count is None:
        count = _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


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


# Each argument's part of the key is a small int (CPython caches those: a key is one tuple of them):
# a tensor 2·dtype + aligned (< 64); an int 64 + (== 1) + 2·(% 16 == 0) + 4·width; a bool 80 / 81; a float 90;
# None 91.
_DTYPE_CODES = {dtype: i for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                                    torch.bool, torch.float8_e4m3fn, torch.float8_e5m2))}


def _tensor_code(t: torch.Tensor) -> int:
    """``2·dtype`` of a GPU tensor (its alignment is added by the caller, who has its address)."""
    code = _DTYPE_CODES.get(t.dtype)
    if code is None or not t.is_cuda:  # a CPU tensor: Triton's own path reports it (never passed on as an address)
        raise _Unkeyable(str(t.dtype) if code is None else "a tensor not on the GPU")
    return 2 * code


def _int_code(n: int) -> int:
    width = 0 if -2147483648 <= n < 2147483648 else 1 if n < 9223372036854775808 else 2  # i32 / i64 / u64
    return 64 + (n == 1) + 2 * (n & 15 == 0) + 4 * width


def _arg_key(arg: Any) -> int:
    """What Triton specialises a compiled kernel on for one runtime argument, as a small int."""
    if isinstance(arg, torch.Tensor):
        return _tensor_code(arg) + (arg.data_ptr() & 15 == 0)
    if isinstance(arg, bool):
        return 80 + arg
    if isinstance(arg, int):
        return _int_code(arg)
    if isinstance(arg, float):
        return 90
    if arg is None:
        return 91
    raise _Unkeyable(type(arg).__name__)


_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter


def _key_and_addresses(args: tuple) -> tuple[list[int], list[Any]]:
    """Each argument's key code (:func:`_arg_key`) and the argument as the launcher may take it (a tensor as its
    address), in one pass: the common types by exact type (``isinstance(x, torch.Tensor)`` is slow)."""
    codes: list[int] = []
    addresses: list[Any] = []
    for arg in args:
        kind = type(arg)
        if kind is _TENSOR or kind is _PARAMETER:
            address = arg.data_ptr()
            codes.append(_tensor_code(arg) + (address & 15 == 0))
            addresses.append(address)
        elif kind is int:
            codes.append(_int_code(arg))
            addresses.append(arg)
        else:
            codes.append(_arg_key(arg))
            addresses.append(arg.data_ptr() if isinstance(arg, torch.Tensor) else arg)
    return codes, addresses


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


# Triton's own runner (``CompiledKernel.__getitem__``) calls the launcher as below; where this Triton's source says
# so, a cached kernel is launched the same way without the runner's per-launch lookups (its device, its stream,
# its launch metadata: None while no launch hook is set), and with each tensor passed as its address: the
# launcher takes an int as a pointer as it is, where for a tensor it calls ``data_ptr()`` and asks the driver
# whether the address is a device one (a driver call per pointer, the bulk of a launch's host time). The key
# already checked that every tensor is on the GPU. Otherwise the runner is used.
_RUNNER_CALL = ("self.run(grid[0],grid[1],grid[2],stream,self.function,self.packed_metadata,launch_metadata,"
                "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*args)")
_DIRECT: tuple[Any, Any] | None | bool = False  # (knobs.runtime, stream getter) once checked; None: not usable


def _direct_launch_api() -> tuple[Any, Any] | None:
    """``(triton.knobs.runtime, current-stream getter)`` where launching a compiled kernel directly matches
    Triton's runner, else None (checked once)."""
    global _DIRECT
    if _DIRECT is False:
        _DIRECT = None
        try:
            import inspect

            from triton import knobs
            from triton.compiler.compiler import CompiledKernel

            source = "".join(inspect.getsource(CompiledKernel.__getitem__).split())
            stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            if _RUNNER_CALL in source and stream is not None:
                _DIRECT = (knobs.runtime, stream)
        except Exception:  # another Triton: keep its runner
            _DIRECT = None
    return _DIRECT


class _KernelLauncher:
    """The compiled variants of one ``@triton.jit`` kernel, by specialisation key (see the module docstring)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.names = [p.name for p in kernel.params]  # every parameter, in signature order (constexprs too)
        # key -> (compiled kernel, constexpr values in signature order, (launcher, function, metadata) or None)
        self.compiled: dict[tuple, tuple[Any, tuple, tuple | None]] = {}

    def launch(self, grid: tuple[int, ...], device: int, args: tuple, kwargs: dict[str, Any]) -> None:
        """Launch; raises :class:`_Unkeyable` / ``KeyError`` (before launching) where the key cannot be formed."""
        codes, addresses = _key_and_addresses(args)
        key = (device, *codes, *kwargs.items())
        entry = self.compiled.get(key)
        if entry is not None:
            compiled, tail, direct = entry
            api = _DIRECT
            if direct is not None and api and api[0].launch_enter_hook is None:
                run, function, metadata = direct
                g = _grid3(grid)
                run(g[0], g[1], g[2], api[1](device), function, metadata, None, None, api[0].launch_exit_hook,
                    *addresses, *tail)
            else:
                compiled[_grid3(grid)](*args, *tail)
            return
        tail = tuple(kwargs[name] for name in self.names[len(args):])  # the constexprs, given by keyword
        compiled = self.kernel[grid](*args, **kwargs)  # compiles or finds it; returns the compiled kernel
        if compiled is not None and hasattr(compiled, "__getitem__"):
            direct = None
            if _direct_launch_api() is not None and all(hasattr(compiled, a) for a in ("run", "function",
                                                                                      "packed_metadata")):
                direct = (compiled.run, compiled.function, compiled.packed_metadata)
            self.compiled[key] = (compiled, tail, direct)


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
