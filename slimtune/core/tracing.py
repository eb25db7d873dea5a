"""What the adapters do differently while ``torch.compile`` traces them (``fullgraph=True``: no graph break).

Eager code keeps its host-side shortcuts — caches checked by tensor version, per-shape decisions in bounded caches,
a dropout seed read back as a Python int, the DoRA output probe — because each of them saves launches or memory on
every step. None of them can be traced: Dynamo cannot branch on a version counter, read a storage, call
``.item()`` or create a ``torch.Generator`` inside a graph. So every such place asks :func:`compiling` (PyTorch's
public ``torch.compiler.is_compiling``, a constant while Dynamo traces, so the branch costs nothing in the graph)
and takes a trace-safe path there: recompute instead of look up, decide from shapes (known at trace time), and draw
dropout masks through the custom op below, which Dynamo and AOTAutograd treat as one opaque operator.

**A Function's output, its own tensor.** Under ``torch.compile`` in torch 2.11 an ``autograd.Function`` whose
forward returns the very tensor object of one of its intermediates — what an op that returns its input gives:
``.to`` to the dtype a tensor has, an in-place op, ``out=`` — gets all-zero gradients: the traced backward reads a
zero tensor instead of the incoming gradient (seen on the CPU and on CUDA; not in torch 2.13; pytorch/pytorch#184113
reports this silent error). Such outputs go through :func:`distinct_when_traced`, a copy while Dynamo traces, which
Inductor writes in the kernel that computes the tensor (its code for one DoRA Linear has the same kernels with and
without the copy). ``tests/core/test_compile.py`` reads each traced Function's forward for such an output under any
torch, and its training-step cases fail under torch 2.11 without the copy (the lent GPU machines' version;
``benchmarks/pending_gpu.sh 76`` runs them there).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")

#: PyTorch's public query: True while Dynamo (or export) traces the calling code, False in eager execution.
compiling = torch.compiler.is_compiling


def distinct_when_traced(t: torch.Tensor) -> torch.Tensor:
    """``t`` eagerly; while Dynamo traces, a copy of it — for what an ``autograd.Function``'s forward returns or saves
    as its output (module docstring: a Function's output, its own tensor)."""
    return t.clone() if compiling() else t


def cached_unless_traced(cached: Callable[..., T]) -> Callable[..., T]:
    """``cached`` (a :func:`functools.lru_cache` function) in eager code; while Dynamo traces, the function it wraps
    (``__wrapped__``): Dynamo warns about an ``lru_cache`` it would bypass, and the decision it caches is made once
    per trace anyway."""
    return cached.__wrapped__ if compiling() else cached  # type: ignore[attr-defined]


#: the instance attribute marking a module inside a region that ``torch.compile`` runs (:func:`mark_compiled`)
_COMPILED_REGION = "_slimtune_compiled_region"


def mark_compiled(region: torch.nn.Module) -> None:
    """Mark ``region`` and every module under it as compiled (:func:`slimtune.models.layers.compile_layers` does, for
    each layer it compiles): eager work done ahead for such a module — DoRA's step vectors, formed when the model's
    forward starts — would go unused, since its compiled forward takes the trace-safe path."""
    for module in region.modules():
        module.__dict__[_COMPILED_REGION] = True


def in_compiled_region(module: torch.nn.Module) -> bool:
    """Whether :func:`mark_compiled` marked ``module``."""
    return module.__dict__.get(_COMPILED_REGION, False)


@torch.library.custom_op("slimtune::seeded_keep_mask", mutates_args=())
def seeded_keep_mask(like: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The scaled dropout keep mask ``bernoulli(1 − p) / (1 − p)`` of ``like``'s shape, dtype and device, drawn from
    a generator seeded with ``seed`` (an int64 tensor of one element; the same seed gives the same mask): what
    :func:`slimtune.core.lowrank.dropout_keep_mask` draws for an int seed, as one operator a graph can hold."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(int(seed.item()))
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p, generator=gen)
    return mask.mul_(1.0 / (1.0 - p))


@seeded_keep_mask.register_fake
def _(like: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def traced_seed() -> torch.Tensor:
    """A fresh dropout seed as a one-element int64 tensor, drawn from torch's generator inside the graph (a Python
    int would be a constant baked into the compiled code: the same mask on every step)."""
    return torch.randint(0, 2**62, (1,))
