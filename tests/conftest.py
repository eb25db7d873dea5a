"""Shared test setup."""
from __future__ import annotations

import pytest
import torch

from slimtune.core import lean_layers


@pytest.fixture(autouse=True)
def _unet_lean_layers_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' UNets are tiny: every lean layer and recipe scope applies at any size, so that the tests check them
    (``tests/core/test_lean_layers.py`` checks the size rule itself, :data:`lean_layers.UNET_LEAN_BYTES`)."""
    monkeypatch.setattr(lean_layers, "UNET_LEAN_BYTES", 0)


@pytest.fixture
def deterministic_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's deterministic algorithms for one test (``torch.backends.cudnn.deterministic``, no benchmarking): its
    default backward-data algorithms do not repeat autograd's own convolution gradients bit for bit in float64 and
    for 3-D kernels (RESULTS.md run 88), so bit-for-bit comparisons on CUDA run under these."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
