"""The Triton kernels of experiment scripts under ``benchmarks/`` (outside the package) against their plain-PyTorch
references, run by the Triton interpreter on the CPU (float32 and float16; bf16 is checked by the scripts on a GPU)."""
from __future__ import annotations

import pytest

from tests.helpers import run_interpreted


def test_product_sum_kernel_matches_its_reference_interpreted():
    pytest.importorskip("triton")
    results = run_interpreted(
        "import json, sys; sys.path.insert(0, 'benchmarks')\n"
        "import product_sum_kernel\n"
        "print('RESULTS ' + json.dumps({'worst': product_sum_kernel.check()}))\n")
    assert results["worst"] < 1e-2  # the float16 cases' bound; check() itself holds float32 to 1e-4
