"""Test doubles the adapter methods' tests share: a fake 4-bit Linear (its weight behind a handle, dequantised on
each use) with the checks run against it, a dispatch mode that records the largest new tensor, one that counts the
ATen ops called, and the check that a method's training dropout draws as PEFT's does."""
import collections

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import FP32_TOL, rel_err


class MaxAllocation(TorchDispatchMode):
    """Records the largest new tensor any op produces (views and aliases of inputs are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


class CountOps(TorchDispatchMode):
    """Counts the ATen ops called while active, by name (``aten.convolution_backward`` → ``"convolution_backward"``)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class FakeHandle:
    """A :class:`~slimtune.core.frozen.QuantizedWeight` over a dense tensor: every dequantize is a fresh copy,
    tracked by weak references (so a test can see that none outlives its GEMM)."""

    def __init__(self, dense: torch.Tensor) -> None:
        self._dense = dense
        self.copies: list = []

    shape = property(lambda self: self._dense.shape)
    dtype = property(lambda self: self._dense.dtype)
    device = property(lambda self: self._dense.device)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        import weakref

        out = self._dense.to(dtype, copy=True)
        self.copies.append(weakref.ref(out))
        return out

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.copies)


class FakeQuantLinear(nn.Module):
    """A Linear stored "packed": ``weight`` is a uint8 ``[n/2, 1]`` buffer (as NF4 storage), the values live
    behind ``handle``."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros((dense.weight.numel() + 1) // 2, 1, dtype=torch.uint8))
        self.bias = None if dense.bias is None else nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
        self.handle = FakeHandle(dense.weight.detach().clone())

    def forward(self, x):
        return F.linear(x, self.handle.dequantize(x.dtype), self.bias)


def quantized_pair(layer_class, make_kwargs: dict, d_in=24, d_out=40, bias=True):
    """The same adapter (float64, random factors) over a dense Linear and over its fake 4-bit twin."""
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out, bias=bias).double().requires_grad_(False)
    layers = []
    for base in (dense, FakeQuantLinear(dense)):
        torch.manual_seed(1)
        layers.append(layer_class(base, **make_kwargs))
    return layers


def check_quantized_matches_dense(dense_layer, quant_layer, path: str, x_shape=(3, 5, 24)) -> None:
    """Same output and gradients as on the dense base; nothing of the weight's size saved for backward; every
    dequantised copy freed right after its use (forward, and backward)."""
    handle = quant_layer.base_layer.handle
    n_weight = handle.shape.numel()
    results = []
    for layer in (dense_layer, quant_layer):
        layer.path = path
        x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = layer(x)
        if layer is quant_layer:
            assert n_weight not in saved and handle.alive() == 0
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, *(p.grad for p in layer.peft_parameters().values())])
    assert handle.alive() == 0 and len(handle.copies) == 2  # one in forward, one in backward
    assert quant_layer.last_path == path
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < 1e-12


class LinearAndConv(nn.Module):
    """A Linear ``fc`` and a Conv2d ``conv`` (3x3, padding 1), called on ``(x, img)``: both kinds of layer in one net."""

    def __init__(self, fc: tuple[int, int], conv: tuple[int, int]):
        super().__init__()
        self.fc = nn.Linear(*fc)
        self.conv = nn.Conv2d(*conv, 3, padding=1)

    def forward(self, x, img):
        return self.fc(x), self.conv(img)


def check_training_dropout_matches_peft(peft_config, our_config, fc: tuple[int, int], conv: tuple[int, int]) -> None:
    """rank_dropout / module_dropout in training: an ``fc`` + ``conv`` net adapted by PEFT (``peft_config``) and by
    slimtune (``our_config``) with PEFT's factors, stepped 8 times under the same seeds, gives the same outputs (the
    same draws) within fp32's tolerance, and module dropout skips the adapter on some steps, not on all."""
    import peft

    import slimtune

    torch.manual_seed(0)
    theirs, ours = LinearAndConv(fc, conv), LinearAndConv(fc, conv)
    ours.load_state_dict(theirs.state_dict())
    theirs = peft.get_peft_model(theirs, peft_config).train()
    slimtune.adapt(ours, our_config).train()
    with torch.no_grad():
        for name in ("fc", "conv"):
            src = theirs.base_model.model.get_submodule(name)
            for key, p in ours.get_submodule(name).peft_parameters().items():
                p.copy_(getattr(src, key)["default"])
    x, img = torch.randn(5, fc[0]), torch.randn(2, conv[0], 6, 6)
    skipped = 0
    for step in range(8):
        torch.manual_seed(100 + step)
        want = theirs(x, img)
        torch.manual_seed(100 + step)
        got = ours(x, img)
        for g, w in zip(got, want):
            assert rel_err(g, w) < FP32_TOL
        skipped += int(torch.equal(got[0], ours.fc.base_layer(x)))
    assert 0 < skipped < 8  # module dropout did skip the adapter on some steps, not on all
