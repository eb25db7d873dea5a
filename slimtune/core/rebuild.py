"""Keep a recipe instead of a tensor: while a layer runs, autograd saves a given tensor ``y`` as the tensors ``y`` is
computed from, which something else keeps anyway, and rebuilds ``y`` from them when backward asks for it.

The case this is for: a gated MLP's product ``h = act(g) ⊙ u`` feeds the output projection. When that projection has
an adapter, the adapter keeps h (``[tokens, d_ff]``) for its weight gradient, while the product's own backward keeps
g and u (or the projection ``p = [u, g]``). h is one elementwise pass from them. :func:`rebuilt_from` saves h as that
pass: for a Llama MLP at 4x512 tokens, 32 MiB per layer; for a Stable Diffusion UNet's feed-forward, a third of its
activations. Every method's Function keeps its input as it is given (``save_for_backward(x)``), so this works for all
of them without touching one.

It is PyTorch's public ``torch.autograd.graph.saved_tensors_hooks``: the pack hook replaces exactly ``y`` (the same
tensor object, unchanged in place since: :class:`~.caches.TensorMark`) and returns every other tensor as it is; the
unpack hook runs ``rebuild(*sources)`` under ``no_grad``. ``rebuild`` must compute what produced ``y`` with the same
ops on the same inputs, so the rebuilt tensor is ``y`` bit for bit (the tests check it per layer). Under hooks
autograd does not check ``y``'s in-place version on unpacking; the recipe gives ``y`` as it was saved, whatever
changed it later. The sources are checked by the Function that saved them (its backward runs after the consumer's
and raises), so a changed source still fails the backward pass.

Two forms: :func:`rebuilt_from` around one consumer (the Llama MLP's ``down_proj``: the product and its consumer are
in one forward), and :func:`rebuild_scope` around a block whose layers :func:`offer` their outputs as they run (a
diffusers transformer block: its LayerNorms' outputs to the attention projections and the feed-forward, the GEGLU's
to the output Linear), for consumers the block's code calls in between.

Callers skip it where other saved-tensor hooks own what is saved (checkpointing, offloading:
:func:`~.autograd_state.saved_tensor_hooks_active`) and under ``torch.compile``. The pack hook is marked transparent
(:func:`~.autograd_state.mark_transparent`): the only tensor it keeps instead of ``y`` is one already kept, so layers
that look for owning hooks (DoRA's ``dora_recompute="auto"``) behave as without it.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch

from .autograd_state import mark_transparent, transparent_hooks
from .caches import TensorMark


class _Recipe:
    """What the pack hook saves in place of ``y``."""

    __slots__ = ("rebuild", "sources")

    def __init__(self, rebuild: Callable[..., torch.Tensor], sources: tuple[Any, ...]) -> None:
        self.rebuild, self.sources = rebuild, sources


def _hooks(find: Callable[[torch.Tensor], _Recipe | None]) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks that save a tensor as ``find(t)`` where that is a recipe, else as it is. Only the innermost
    hooks run: where they nest inside transparent ones (the memory meter's), those still see every tensor, a
    recipe's sources in its place."""
    outer = transparent_hooks()
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    @mark_transparent
    def pack(t: torch.Tensor) -> Any:
        recipe = find(t)
        if outer_pack is None:
            return t if recipe is None else recipe
        if recipe is None:
            return outer_pack(t)
        for source in recipe.sources:
            if isinstance(source, torch.Tensor):
                outer_pack(source)
        return recipe

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, _Recipe):
            with torch.no_grad():
                return saved.rebuild(*saved.sources)
        return saved if outer_unpack is None else outer_unpack(saved)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def rebuilt_from(y: torch.Tensor, rebuild: Callable[..., Any],
                 *sources: Any) -> torch.autograd.graph.saved_tensors_hooks:
    """A context in which autograd saves ``y`` as ``rebuild(*sources)`` (module docstring); the tensors among
    ``sources`` must be kept by backward anyway (they are held until the recipe is unpacked and freed)."""
    mark = TensorMark(y)
    recipe = _Recipe(rebuild, sources)
    return _hooks(lambda t: recipe if mark.matches(t) else None)


class _Scope(threading.local):
    """The offers of the :func:`rebuild_scope` running on this thread (None outside one)."""

    offers: list[tuple[TensorMark, _Recipe]] | None = None


_SCOPE = _Scope()


def offer(y: torch.Tensor, rebuild: Callable[..., Any], *sources: Any) -> None:
    """Inside a :func:`rebuild_scope` on this thread, have autograd save ``y`` as ``rebuild(*sources)`` from here
    to the scope's end (as :func:`rebuilt_from`); elsewhere nothing."""
    offers = _SCOPE.offers
    if offers is not None:
        offers.append((TensorMark(y), _Recipe(rebuild, sources)))


@contextlib.contextmanager
def rebuild_scope() -> Iterator[None]:
    """A block's forward in which layers :func:`offer` their outputs as recipes: a consumer later in the block that
    saves one of those very tensors saves its recipe instead (a block's layers are few, so the newest offers are
    looked at first and a pack looks at a handful)."""
    offers: list[tuple[TensorMark, _Recipe]] = []

    def find(t: torch.Tensor) -> _Recipe | None:
        for mark, recipe in reversed(offers):
            if mark.matches(t):
                return recipe
        return None

    outer, _SCOPE.offers = _SCOPE.offers, offers
    try:
        with _hooks(find):
            yield
    finally:
        _SCOPE.offers = outer
