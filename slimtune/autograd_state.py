"""What state PyTorch's autograd is in, for layers whose forward adapts to it (HRA's factor cache, DoRA's
``dora_recompute="auto"``): inside a backward pass, under saved-tensor hooks. Private ``torch._C`` queries, each
guarded so that a PyTorch without them answers "no"."""
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
    """Mark a saved-tensor pack hook as one that returns what it is given and keeps nothing alive on its own."""
    setattr(pack, _TRANSPARENT, True)
    return pack
