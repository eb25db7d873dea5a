"""What state PyTorch's autograd is in, for layers whose forward adapts to it (HRA's factor cache, DoRA's
``dora_recompute="auto"``, the DoRA norm cache): inside a backward pass, under saved-tensor hooks, a tensor's
in-place version. And one question for the memory estimator: whether CUDA runs ``F.rms_norm`` as a fused kernel.

These are the only private PyTorch queries slimtune makes, kept together here. Each is guarded so that a PyTorch
without it answers the cautious way ("no" / "changed"), and ``tests/core/test_autograd_state.py`` fails loudly
when one of them disappears or changes meaning, so a PyTorch upgrade cannot silently turn the behaviour off.
"""
from __future__ import annotations

from typing import Callable

import torch

_TRANSPARENT = "slimtune_transparent"


def inside_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (e.g. reentrant checkpointing's
    recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks that own what is saved (checkpointing, offloading) are active; hooks marked by
    :func:`mark_transparent` (they only look, as the memory profiler's meter) do not count."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks is not None and not getattr(hooks[0], _TRANSPARENT, False)


def mark_transparent(pack: Callable) -> Callable:
    """Mark a saved-tensor pack hook as one that keeps nothing alive on its own: it returns what it is given, or (the
    recipes of :mod:`.rebuild`) what rebuilds it from tensors backward keeps anyway."""
    setattr(pack, _TRANSPARENT, True)
    return pack


def transparent_hooks() -> tuple[Callable, Callable] | None:
    """The innermost saved-tensor hooks ``(pack, unpack)`` when they are marked transparent (the memory meter's), else
    None. Only the innermost hooks run, so hooks nested inside these pass what they save on to them."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks if hooks is not None and getattr(hooks[0], _TRANSPARENT, False) else None


def tensor_version(t: torch.Tensor) -> int | None:
    """The in-place version counter autograd keeps for ``t`` (bumped by every in-place change), or None where there
    is none — an inference tensor (made under ``torch.inference_mode``: reading its counter raises), or a PyTorch
    without one — so that a cache or hand-off keyed on it never hits."""
    if t.is_inference():
        return None
    return getattr(t, "_version", None)


def fused_rms_norm_on_cuda() -> bool:
    """Whether this PyTorch runs ``F.rms_norm`` on CUDA as one fused kernel (``aten._fused_rms_norm``: it saves the
    input and a float32 rstd, where the meta device's decomposition saves two float32 copies of the input); the
    memory estimator mirrors it. False (the decomposition) where the op does not exist."""
    return hasattr(torch.ops.aten, "_fused_rms_norm")
