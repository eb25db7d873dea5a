"""Shared test setup."""
from __future__ import annotations

import pytest

from slimtune.core import lean_layers


@pytest.fixture(autouse=True)
def _unet_lean_layers_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' UNets are tiny: every lean layer and recipe scope applies at any size, so that the tests check them
    (``tests/core/test_lean_layers.py`` checks the size rule itself, :data:`lean_layers.UNET_LEAN_BYTES`)."""
    monkeypatch.setattr(lean_layers, "UNET_LEAN_BYTES", 0)
