"""The chunked loss's Triton kernel on a GPU, bf16 included (the CPU interpreter cannot check bf16): row losses and
gradients against the float64 reference at Llama-3's vocabulary, and the whole loss through a bf16 head against
float64 ``F.cross_entropy``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.memory.chunked_loss import IGNORE_INDEX, LinearCrossEntropy, softmax_cross_entropy_reference

from ..helpers import BF16_TOL, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_float64_at_llama_vocabulary(dtype, masked):
    from slimtune.memory.triton_cross_entropy import softmax_cross_entropy_triton

    torch.manual_seed(0)
    logits = torch.randn(37, 128256, device="cuda") * 4
    labels = torch.randint(0, 128256, (37,), device="cuda")
    keep = (torch.arange(37, device="cuda") % 3 != 0) if masked else None
    loss, grad = softmax_cross_entropy_triton(logits, labels, keep, dtype)
    ref_loss, ref_grad = softmax_cross_entropy_reference(logits.double(), labels, keep)
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    assert grad.dtype == dtype and rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < tol


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_head_loss_and_gradient_match_float64(masked):
    torch.manual_seed(0)
    hidden = (torch.randn(300, 256, device="cuda") * 2).bfloat16().requires_grad_()
    weight = (torch.randn(5000, 256, device="cuda") / 8).bfloat16()
    labels = torch.randint(0, 5000, (300,), device="cuda")
    labels[::7] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    h, y = (hidden, labels) if masked else (hidden[keep], labels[keep])
    loss = LinearCrossEntropy.apply(h, weight, None, y, 64, masked)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ weight.double().t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert rel_err(loss, ref) < 1e-4 and rel_err(hidden.grad, h64.grad) < BF16_TOL


def test_loss_and_backward_never_wait_on_the_host():
    """On CUDA the ignored rows stay, masked (no boolean index, whose count would be read back to the host): the
    loss and its backward run under ``torch.cuda.set_sync_debug_mode("error")``, which raises on a synchronisation.
    (Added on 2026-12-06 without a GPU run: RESULTS.md run 133 measured the change, not this test.)"""
    from slimtune.memory.chunked_loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(64, 1000, bias=False).to("cuda", torch.bfloat16).requires_grad_(False)
    labels = torch.randint(0, 1000, (2, 33), device="cuda")
    labels[:, :5] = IGNORE_INDEX
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = chunked_causal_lm_loss(hidden, head, labels, reduction="mean", chunk=16)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    keep = labels[:, 1:] != IGNORE_INDEX
    h64 = hidden.detach().double()[:, :-1][keep].requires_grad_()
    ref = F.cross_entropy(h64 @ head.weight.double().t(), labels[:, 1:][keep])
    assert rel_err(loss, ref) < 1e-4
