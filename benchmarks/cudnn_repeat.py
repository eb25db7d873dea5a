"""Whether autograd's own convolution input gradient repeats bit for bit on CUDA with cuDNN's default algorithms:
20 runs per dtype and kernel dimension, and the count of distinct results (1: it repeats). A diagnostic for
``tests/core/test_aten_grads.py``, which compares the lean convolution's backward with autograd's under cuDNN's
deterministic algorithms. Run on a GPU: ``python benchmarks/cudnn_repeat.py``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distinct_input_grads(dtype: torch.dtype, dims: int, runs: int = 20) -> int:
    """How many different input gradients ``runs`` backward passes of one 3x3(x3) convolution give."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *[8] * dims, generator=gen).to("cuda", dtype).requires_grad_()
    weight = torch.randn(6, 4, *[3] * dims, generator=gen).to("cuda", dtype)
    y = (F.conv2d if dims == 2 else F.conv3d)(x, weight, None, 1, 1)
    grad = torch.randn(y.shape, generator=gen).to("cuda", dtype)
    runs_of = (torch.autograd.grad(y, x, grad, retain_graph=True)[0] for _ in range(runs))
    results = {g.float().cpu().numpy().tobytes() for g in runs_of}  # bf16 is exact in float32
    return len(results)


if __name__ == "__main__":
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for dims in (2, 3):
            print(f"autograd's convolution input gradient, {dtype}, {dims}-D: "
                  f"{distinct_input_grads(dtype, dims)} distinct result(s) in 20 runs", flush=True)
