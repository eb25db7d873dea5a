"""Trainer ends each run with ``gc.collect()`` (accelerate's ``free_memory``), which walks every object the imports of
transformers and peft made (about a second a run here): move those out of the collector's way once."""
import gc

import pytest


@pytest.fixture(scope="package", autouse=True)
def _freeze_imported_objects():
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
