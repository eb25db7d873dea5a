"""The launch shortcut (``slimtune.kernels.dispatch``): keyed the way Triton specialises, falls back on surprises.

The shortcut only runs for CUDA tensors, so these tests drive :class:`_KernelLauncher` with a stand-in kernel
that records how it was launched (the real kernels' parity between both paths is checked on the GPU by
``benchmarks/anatomy.py --sections launch``)."""
from __future__ import annotations

import types

import pytest
import torch

from slimtune.kernels import dispatch as D

_real_tensor_code = D._tensor_code


class _AsCuda:
    """A CPU tensor's dtype, reporting itself on the GPU (these tests launch stand-in kernels on CPU tensors)."""

    def __init__(self, t):
        self.dtype, self.is_cuda = t.dtype, True


@pytest.fixture(autouse=True)
def _keys_for_cpu_tensors(monkeypatch, request):
    if "not_keyed" not in request.node.name:
        monkeypatch.setattr(D, "_tensor_code", lambda t: _real_tensor_code(_AsCuda(t)))


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("cached", grid, args))


class FakeKernel:
    """A ``@triton.jit`` stand-in: parameters ``x, n, scale, BLOCK`` (BLOCK a constexpr)."""

    def __init__(self):
        self.params = [types.SimpleNamespace(name=n) for n in ("x", "n", "scale", "BLOCK")]
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log)

        return run


def test_second_launch_with_the_same_key_takes_the_cached_kernel():
    kernel, x = FakeKernel(), torch.randn(32)
    launcher = D._KernelLauncher(kernel)
    launcher.launch((4,), 0, (x, 100, 0.5), {"BLOCK": 64, "num_warps": 4})
    launcher.launch((8, 2), 0, (x, 100, 0.25), {"BLOCK": 64, "num_warps": 4})
    assert kernel.log[0][0] == "triton"
    assert kernel.log[1] == ("cached", (8, 2, 1), (x, 100, 0.25, 64))  # constexprs appended in signature order


@pytest.mark.parametrize("change", ["int 1", "int %16", "int64", "constexpr", "option", "dtype", "alignment"])
def test_what_triton_specialises_on_gives_a_new_key(change):
    kernel = FakeKernel()
    base = torch.zeros(64)
    x, n, kwargs = base[:32], 100, {"BLOCK": 64, "num_warps": 4}
    launcher = D._KernelLauncher(kernel)
    launcher.launch((1,), 0, (x, n, 1.0), kwargs)
    if change == "int 1":
        n = 1
    elif change == "int %16":
        n = 96
    elif change == "int64":
        n = 2 ** 33 + 4
    elif change == "constexpr":
        kwargs = {"BLOCK": 128, "num_warps": 4}
    elif change == "option":
        kwargs = {"BLOCK": 64, "num_warps": 8}
    elif change == "dtype":
        x = x.double()
    elif change == "alignment":
        x = base[1:33]  # 4 bytes past a 16-byte boundary
    launcher.launch((1,), 0, (x, n, 1.0), kwargs)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_an_argument_it_cannot_key_turns_the_shortcut_off(monkeypatch):
    monkeypatch.setattr(D, "FAST_LAUNCH", True)
    kernel = FakeKernel()
    t = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"))
    assert not D._fast_launch(kernel, t, (1,), ("a string", 3, 1.0), {"BLOCK": 64})
    assert D.FAST_LAUNCH is False
    assert kernel.log == []  # nothing launched: the caller takes Triton's path


def test_cpu_tensors_never_take_the_shortcut(monkeypatch):
    monkeypatch.setattr(D, "FAST_LAUNCH", True)
    assert not D._fast_launch(FakeKernel(), torch.zeros(1), (1,), (), {})


def test_grid_and_block_helpers():
    assert [D.cdiv(a, 4) for a in (1, 4, 5, 8)] == [1, 1, 2, 2]
    assert [D.next_power_of_2(n) for n in (0, 1, 2, 3, 16, 17)] == [1, 1, 2, 4, 16, 32]


class FakeDirectCompiled(FakeCompiled):
    """A compiled kernel with the launcher, function handle and packed metadata Triton's runner passes on."""

    function, packed_metadata = "function", "metadata"

    def run(self, *args):
        self.log.append(("direct", args))


class FakeDirectKernel(FakeKernel):
    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeDirectCompiled(self.log)

        return run


def test_cached_kernels_launch_directly_like_tritons_runner(monkeypatch):
    """Where Triton's runner is the known one, a repeat launch calls the launcher itself with the runner's
    arguments (grid, the device's current stream, function, metadata, no launch metadata, the hooks); while a
    launch hook is set, it goes through the runner."""
    knobs = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(D, "_DIRECT", (knobs, lambda device: 1000 + device))
    kernel, x = FakeDirectKernel(), torch.randn(32)
    launcher = D._KernelLauncher(kernel)
    launcher.launch((4,), 3, (x, 100, 0.5), {"BLOCK": 64, "num_warps": 4})
    launcher.launch((8, 2), 3, (x, 100, 0.25), {"BLOCK": 64, "num_warps": 4})
    # tensors go as their addresses (the launcher then skips its per-pointer driver query)
    assert kernel.log[1] == ("direct", (8, 2, 1, 1003, "function", "metadata", None, None, None, x.data_ptr(), 100,
                                        0.25, 64))
    knobs.launch_enter_hook = print
    launcher.launch((2,), 3, (x, 100, 0.25), {"BLOCK": 64, "num_warps": 4})
    assert kernel.log[2] == ("cached", (2, 1, 1), (x, 100, 0.25, 64))


def test_unknown_dtypes_and_cpu_tensors_are_not_keyed():
    with pytest.raises(D._Unkeyable, match="complex"):
        D._arg_key(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(D._Unkeyable, match="not on the GPU"):  # never passed on as a raw address
        D._arg_key(torch.zeros(2))


def test_one_pass_key_matches_the_per_argument_key():
    base = torch.zeros(64)
    args = (base[:32], torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16)), base[1:9], 1, 96, 100, -3, 2 ** 33,
            2 ** 63 + 1, 0.5, True, None)
    codes, addresses = D._key_and_addresses(args)
    assert codes == [D._arg_key(a) for a in args]
    assert addresses[:3] == [t.data_ptr() for t in args[:3]] and addresses[3:] == list(args[3:])
    assert codes[0] != codes[2]  # aligned and not
