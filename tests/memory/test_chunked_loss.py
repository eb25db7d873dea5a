"""The chunked causal-LM loss: loss and gradients (hidden states, a trainable head's weight and bias, tied
embeddings) against float64 ``F.cross_entropy`` on the full logits, and no ``[tokens, vocab]`` tensor anywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import slimtune
from slimtune.errors import ConfigError
from slimtune.memory.chunked_loss import IGNORE_INDEX, LinearCrossEntropy, chunked_causal_lm_loss, model_causal_lm_loss

from ..helpers import BF16_TOL, FP32_TOL, check_interpreted_errors, rel_err


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _head(h: int, v: int, dtype: torch.dtype, bias: bool) -> nn.Linear:
    torch.manual_seed(1)
    head = nn.Linear(h, v, bias=bias)
    with torch.no_grad():
        head.weight.mul_(3.0)
        if bias:
            head.bias.normal_()
    return head.to(dtype)


def _reference(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, reduction: str):
    """Loss and gradients (hidden, weight, bias) in float64 through the full logits."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    b64 = head.bias.detach().double().requires_grad_() if head.bias is not None else None
    logits = F.linear(h64, w64, b64)[:, :-1].flatten(0, 1)
    loss = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    (loss * 0.7).backward()
    return loss, h64.grad, w64.grad, None if b64 is None else b64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_trainable_head_matches_float64(dtype, bias, reduction):
    b, t, h, v = 3, 11, 24, 50
    head = _head(h, v, dtype, bias)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 8:] = IGNORE_INDEX  # padding
    loss = chunked_causal_lm_loss(hidden, head, labels, reduction=reduction, chunk=7)  # several chunks, one short
    (loss * 0.7).backward()
    ref, grad_h, grad_w, grad_b = _reference(hidden, head, labels, reduction)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert loss.dtype == torch.float32 and rel_err(loss, ref) < tol
    assert rel_err(hidden.grad, grad_h) < tol and rel_err(head.weight.grad, grad_w) < tol
    assert head.weight.grad.dtype == dtype
    if bias:
        assert rel_err(head.bias.grad, grad_b) < tol and head.bias.grad.dtype == dtype


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_logits_are_the_autocast_gemm_upcast(head_dtype):
    """Under bf16 autocast the chunk's GEMM runs in bf16 as F.linear's would, the softmax in fp32; a head of another
    dtype than the hidden states is cast once, not refused."""
    head = _head(24, 50, head_dtype, bias=True).requires_grad_(False)
    hidden = torch.randn(2, 9, 24, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk=5)
    loss.backward()
    ref, grad_h, _, _ = _reference(hidden, head, labels, "sum")
    assert loss.dtype == torch.float32 and rel_err(loss, ref) < BF16_TOL
    assert rel_err(hidden.grad, grad_h / 0.7) < BF16_TOL


def test_frozen_head_gets_no_gradient():
    head = _head(16, 40, torch.float32, True).requires_grad_(False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    chunked_causal_lm_loss(hidden, head, labels, chunk=5).backward()
    ref, grad_h, _, _ = _reference(hidden, head, labels, "sum")
    assert rel_err(hidden.grad, grad_h / 0.7) < FP32_TOL and head.weight.grad is None


def test_no_full_logits_forward_or_backward():
    n, h, v, chunk = 64, 16, 256, 8
    head = _head(h, v, torch.float32, True)
    hidden = torch.randn(1, n + 1, h, requires_grad=True)
    labels = torch.randint(0, v, (1, n + 1))
    with LargestTensor() as mode:
        chunked_causal_lm_loss(hidden, head, labels, chunk=chunk).backward()
    assert mode.largest <= max(chunk * v, v * h)  # one chunk of logits, or the head's own [V, H] gradient
    assert mode.largest < n * v


def test_tied_embeddings_trainable():
    """A model whose head shares the input embedding, everything training: the chunked loss gives transformers'
    loss and every gradient (the shared weight's from both uses), against the float64 model."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=96, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref_model = transformers.LlamaForCausalLM(cfg).double()
    ref_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, :3] = IGNORE_INDEX
    loss = model_causal_lm_loss(model, ids, labels, reduction="mean")
    loss.backward()
    ref = ref_model(input_ids=ids, labels=labels).loss
    ref.backward()
    assert rel_err(loss, ref) < FP32_TOL
    ours, theirs = dict(model.named_parameters()), dict(ref_model.named_parameters())
    assert all(rel_err(ours[k].grad, theirs[k].grad) < FP32_TOL for k in ours)


def test_linear_cross_entropy_without_targets_is_zero():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss = LinearCrossEntropy.apply(hidden, weight, None, torch.zeros(0, dtype=torch.long), 4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not weight.grad.any()


def test_bad_input_is_named():
    head = nn.Linear(8, 20)
    with pytest.raises(ConfigError, match="reduction"):
        chunked_causal_lm_loss(torch.randn(1, 4, 8), head, torch.zeros(1, 4, dtype=torch.long), reduction="max")
    with pytest.raises(ConfigError, match=r"\[B, T, H\]"):
        chunked_causal_lm_loss(torch.randn(1, 4, 6), head, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="2-D weight"):
        chunked_causal_lm_loss(torch.randn(1, 4, 8), nn.ReLU(), torch.zeros(1, 4, dtype=torch.long))


def test_public_name():
    assert slimtune.chunked_causal_lm_loss is chunked_causal_lm_loss


@pytest.mark.parametrize("bias", [False, True])
def test_masked_rows_carry_no_loss_and_no_gradient(bias):
    """``masked=True`` (a CUDA graph's capture: no shape may follow the labels) keeps the ignored rows and zeroes
    their loss and gradients: the same loss and gradients as with those rows dropped, in float64 (the bias's
    gradient accumulates in float32: its rounding)."""
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    head = _head(6, 9, torch.float64, bias)
    labels = torch.randint(0, 9, (11,))
    labels[[0, 4, 5, 10]] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    params = [hidden, head.weight, *([head.bias] if bias else [])]
    masked = LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, 4, True)
    got = torch.autograd.grad(masked, params)
    dropped = LinearCrossEntropy.apply(hidden[keep], head.weight, head.bias, labels[keep], 4)
    want = torch.autograd.grad(dropped, params)
    assert rel_err(masked, dropped) < 1e-12
    assert all(rel_err(g, w) < 1e-6 for g, w in zip(got, want))  # the bias's gradient sums in float32
    assert torch.all(got[0][~keep] == 0)


INTERPRETED = r"""
import json, torch
import torch.nn.functional as F
from slimtune.memory.chunked_loss import LinearCrossEntropy, softmax_cross_entropy_reference
from slimtune.memory.triton_cross_entropy import softmax_cross_entropy_triton
from tests.helpers import rel_err

torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float16):
    for rows, vocab, masked in ((5, 50, False), (4, 4100, True), (3, 9000, False)):
        logits = torch.randn(rows, vocab) * 4
        labels = torch.randint(0, vocab, (rows,))
        keep = torch.tensor([True, False] * rows)[:rows] if masked else None
        loss, grad = softmax_cross_entropy_triton(logits, labels, keep, dtype)
        ref_loss, ref_grad = softmax_cross_entropy_reference(logits.double(), labels, keep)
        results[f"{str(dtype)[6:]}/{rows}x{vocab}"] = [rel_err(loss, ref_loss), rel_err(grad, ref_grad),
                                                       float(grad.dtype != dtype)]
hidden = torch.randn(2, 9, 16, dtype=torch.float32) * 2
weight = torch.randn(300, 16) * 3
labels = torch.randint(0, 300, (2, 9))
labels[0, 3] = -100
h = hidden[:, :-1].reshape(-1, 16)
y = labels[:, 1:].reshape(-1)
for masked in (False, True):
    for kernel in (True, False):  # False: the plain-PyTorch chunk where the kernel would run
        hh = (h if masked else h[y != -100]).clone().requires_grad_()
        yy = y if masked else y[y != -100]
        loss = LinearCrossEntropy.apply(hh, weight, None, yy, 4, masked, kernel)
        loss.backward()
        h64 = (h if masked else h[y != -100]).double().requires_grad_()
        ref = F.cross_entropy(h64 @ weight.double().t(), yy, ignore_index=-100, reduction="sum")
        ref.backward()
        results[f"float32/function masked={masked} kernel={kernel}"] = [rel_err(loss, ref), rel_err(hh.grad, h64.grad)]
print("RESULTS " + json.dumps(results))
"""


def test_triton_kernel_matches_the_reference_interpreted():
    """One launch per chunk (``softmax_cross_entropy_triton``) against the float64 reference under the interpreter:
    row losses and gradients (float32 and float16), vocabularies under, across and over one block, masked rows; and
    ``LinearCrossEntropy`` through the kernel, and with ``kernel=False`` through the plain chunk, against float64
    ``F.cross_entropy``."""
    check_interpreted_errors(INTERPRETED, cases=10, fp32_tol=1e-5)


BAD_LABELS = r"""
import json, math, torch
from slimtune.memory.chunked_loss import LinearCrossEntropy
from slimtune.memory.triton_cross_entropy import softmax_cross_entropy_triton

torch.manual_seed(0)
logits = torch.randn(4, 300)
loss, grad = softmax_cross_entropy_triton(logits, torch.tensor([3, 300, -5, 7]), None, torch.float32)
rows_nan = [bool(math.isnan(loss[i])) and bool(grad[i].isnan().all()) for i in range(4)]
rows_fine = [bool(torch.isfinite(loss[i])) and bool(torch.isfinite(grad[i]).all()) for i in range(4)]
hidden = torch.randn(3, 8, requires_grad=True)
masked = LinearCrossEntropy.apply(hidden, torch.randn(50, 8), None, torch.tensor([1, -100, -5]), 2, True)
print("RESULTS " + json.dumps({"nan": rows_nan, "finite": rows_fine, "masked": math.isnan(masked.item())}))
"""


def test_labels_outside_the_vocabulary_are_never_a_silent_value():
    """A label outside ``[0, V)`` (other than -100) gives a NaN loss through the kernel (on CUDA, where checking it
    would wait on the host), also where ignored rows are masked (a negative label is not folded into class 0); the
    CPU's reference path raises an index error."""
    pytest.importorskip("triton")
    from ..helpers import run_interpreted

    got = run_interpreted(BAD_LABELS)
    assert got == {"nan": [False, True, True, False], "finite": [True, False, False, True], "masked": True}
    head = nn.Linear(8, 20, bias=False)
    with pytest.raises(RuntimeError, match="out of bounds"):
        chunked_causal_lm_loss(torch.randn(1, 4, 8), head, torch.tensor([[0, 3, 25, 1]]))
