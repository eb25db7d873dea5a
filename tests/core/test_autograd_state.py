"""The private PyTorch queries slimtune makes live in one module; these tests fail loudly when PyTorch changes them
(the module itself answers cautiously when one is missing, which would quietly turn a feature off)."""
from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from slimtune.core import autograd_state as A


def test_the_private_queries_exist():
    assert callable(getattr(torch._C, "_current_graph_task_id", None)), "torch._C._current_graph_task_id is gone"
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    assert callable(top), "torch._C._autograd._top_saved_tensors_default_hooks is gone"
    assert isinstance(torch.zeros(1)._version, int), "Tensor._version is gone"
    assert A.fused_rms_norm_on_cuda(), "aten._fused_rms_norm is gone (the estimator's RMSNorm model needs a look)"


def test_inside_backward_is_true_only_in_a_backward_pass():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", A.inside_backward()))
            return x * 2

        @staticmethod
        def backward(ctx, dy):
            seen.append(("backward", A.inside_backward()))
            return dy * 2

    x = torch.ones(3, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)]


def test_saved_tensor_hooks_are_seen_and_transparent_ones_are_not():
    assert not A.saved_tensor_hooks_active()
    with saved_tensors_hooks(lambda t: t, lambda t: t):
        assert A.saved_tensor_hooks_active()
    with saved_tensors_hooks(A.mark_transparent(lambda t: t), lambda t: t):
        assert not A.saved_tensor_hooks_active()
    seen = []

    def body(x):
        seen.append(A.saved_tensor_hooks_active())
        return x.sin()

    checkpoint(body, torch.ones(2, requires_grad=True), use_reentrant=False).sum().backward()
    assert seen[0], "non-reentrant checkpointing installs saved-tensor hooks"


def test_transparent_hooks_are_the_innermost_marked_ones():
    assert A.transparent_hooks() is None
    pack, unpack = A.mark_transparent(lambda t: t), (lambda t: t)
    with saved_tensors_hooks(pack, unpack):
        assert A.transparent_hooks() == (pack, unpack)
        with saved_tensors_hooks(lambda t: t, unpack):
            assert A.transparent_hooks() is None


def test_tensor_version_counts_in_place_changes():
    t = torch.zeros(3)
    v = A.tensor_version(t)
    t.add_(1)
    assert A.tensor_version(t) == v + 1


def test_an_inference_tensor_has_no_version():
    """Reading an inference tensor's counter raises; tensor_version says None (a mark or stamp on it never matches)."""
    with torch.inference_mode():
        t = torch.zeros(3)
    assert t.is_inference() and A.tensor_version(t) is None
