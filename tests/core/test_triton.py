"""When the Triton kernels run and how they launch (``slimtune.core.triton``): Triton's own documented path only."""
from __future__ import annotations

import pytest
import torch

from slimtune.core import triton as T


class RecordingKernel:
    """A ``@triton.jit`` stand-in recording each ``kernel[grid](*args, **kwargs)``."""

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((grid, args, kwargs))


def test_launch_goes_through_tritons_own_launch_syntax():
    kernel, x = RecordingKernel(), torch.randn(8)
    T.launch(kernel, x, (4, 2), x, 8, 0.5, BLOCK=64, num_warps=4)
    T.launch(kernel, x, (1,), x, 8, 0.25, BLOCK=64, num_warps=4)
    assert kernel.log == [((4, 2), (x, 8, 0.5), {"BLOCK": 64, "num_warps": 4}),
                          ((1,), (x, 8, 0.25), {"BLOCK": 64, "num_warps": 4})]


def test_no_hand_made_launcher_or_source_parsing_is_left():
    """The removed shortcut keyed compiled kernels itself and matched the text of Triton's launcher."""
    for name in ("FAST_LAUNCH", "_KernelLauncher", "_fast_launch", "_direct_launch_api"):
        assert not hasattr(T, name)
    source = open(T.__file__, encoding="utf-8").read()
    assert "inspect" not in source and "getsource" not in source and "data_ptr" not in source


@pytest.mark.parametrize("dtype,expect", [(torch.float32, True), (torch.float16, True), (torch.float64, False)])
def test_use_triton_on_the_cpu_only_under_the_interpreter(monkeypatch, dtype, expect):
    x = torch.zeros(2, dtype=dtype)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not T.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.use_triton(x) is (expect and T.HAS_TRITON)


def test_grid_arithmetic():
    assert [T.cdiv(a, 4) for a in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [T.next_power_of_2(n) for n in (0, 1, 2, 3, 5, 64, 65)] == [1, 1, 2, 4, 8, 64, 128]


def test_sm_count_and_stream_key_off_the_gpu():
    cpu = torch.device("cpu")
    assert T.sm_count(cpu, 7) == 7
    assert T.current_stream_key(cpu) == ("cpu", None, 0)
