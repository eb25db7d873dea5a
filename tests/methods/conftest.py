"""Fixtures the adapter methods' tests share."""
import pytest

from tests.methods.fakes import FakeQuantLinear


@pytest.fixture
def fake_quant():
    """Make slimtune see FakeQuantLinear as a 4-bit layer (its handle), through the public registration."""
    from slimtune.core.frozen import register_quantized_layer

    unregister = register_quantized_layer(lambda m: m.handle if isinstance(m, FakeQuantLinear) else None)
    yield FakeQuantLinear
    unregister()
