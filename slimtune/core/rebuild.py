"""Keep a recipe instead of a tensor: while a layer runs, autograd saves a given tensor ``y`` as the tensors ``y`` is
computed from, which something else keeps anyway, and rebuilds ``y`` from them when backward asks for it.

The case this is for: a gated MLP's product ``h = act(g) ⊙ u`` feeds the output projection. When that projection has
an adapter, the adapter keeps h (``[tokens, d_ff]``) for its weight gradient, while the product's own backward keeps
g and u (or the projection ``p = [u, g]``). h is one elementwise pass from them. :func:`rebuilt_from` saves h as that
pass: for a Llama-3.2-3B MLP at 4x2048 tokens, 128 MiB per layer (it applies from
:data:`~.lean_layers.MLP_RECIPE_BYTES`); in a Stable Diffusion UNet's transformer blocks, the norms' and the GEGLU's
outputs, 0.6 GiB of LoRA's step at batch 4. Every method's Function keeps its input as it is given
(``save_for_backward(x)``), so the hooks work for all of them without touching one.

It is PyTorch's public ``torch.autograd.graph.saved_tensors_hooks``: the pack hook replaces exactly ``y`` (the same
tensor object, unchanged in place since) and returns every other tensor as it is; the unpack hook runs
``rebuild(*sources)`` under ``no_grad`` (autograd gives the unpacked tensor the saved one's place in the graph, so
second derivatives through it stay right: tested). ``rebuild`` must compute what produced ``y`` with the same ops on
the same inputs, so the rebuilt tensor is ``y`` bit for bit (the tests check it per layer). Under hooks
autograd does not check ``y``'s in-place version on unpacking; the recipe gives ``y`` as it was saved, whatever
changed it later. The sources are checked by the Function that saved them (its backward runs after the consumer's
and raises), so a changed source still fails the backward pass.

Two forms: :func:`rebuilt_from` around one consumer (the Llama MLP's ``down_proj``: the product and its consumer are
in one forward), and :class:`RebuildScope` around a block whose layers :func:`offer` their outputs as they run (a
diffusers transformer block: its LayerNorms' outputs to the attention projections and the feed-forward, the GEGLU's
to the output Linear), for consumers the block's code calls in between. In a scope the hooks are not around the
whole block: a consumer enters them itself, for the call whose input is an offered tensor
(:func:`keeps_recipes`, which :class:`~.module.AdapterModule` puts around every method's ``forward``). The block's
other layers save their tensors with no Python hook on the way: a UNet step saves ~1,000 tensors in its blocks, and
a few dozen of them are an adapter's input.

In a scope a consumer's Function may also keep the recipe itself, with no hook at all (:func:`keep_input` in its
forward, :func:`kept_input` in its backward): it saves the recipe's tensors in x's place with its own
``save_for_backward`` — so autograd checks them, frees them after that backward and gives them back with their place
in the graph — and keeps the rest on its ``ctx``. LoRA's, LoHa's and LoKr's Functions do (their classes set
``keeps_recipes_itself``, and their ``forward`` runs without the hooks). The hooks cost a context per consumer call
and a Python call per saved tensor each way: a diffusers transformer block with LoRA takes ~65 µs less host time per
step without them (RESULTS.md run 96), and a q/k/v member that takes its output from its sibling group saves nothing,
so it needs none.

Callers skip it where other saved-tensor hooks own what is saved (checkpointing, offloading:
:func:`~.autograd_state.saved_tensor_hooks_active`) and under ``torch.compile``. The pack hook is marked transparent
(:func:`~.autograd_state.mark_transparent`): the only tensor it keeps instead of ``y`` is one already kept, so layers
that look for owning hooks (DoRA's ``dora_recompute="auto"``) behave as without it.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

import torch

from .autograd_state import mark_transparent, saved_tensor_hooks_active, transparent_hooks
from .caches import TensorMark
from .tracing import compiling


class _Recipe:
    """What the pack hook saves in place of ``y``, for every consumer that saves y: rebuilt once, at the first unpack,
    and shared by the others (a LoCon convolution's base and down convolutions both keep their input; q, k and v
    running alone each keep the norm's output). The rebuilt tensor lives while any consumer still holds the recipe,
    as y itself would have without it. ``direct``: the recipe as Functions keep it themselves (:func:`keep_input`)."""

    __slots__ = ("rebuild", "sources", "rebuilt", "direct")

    def __init__(self, rebuild: Callable[..., torch.Tensor], sources: tuple[Any, ...]) -> None:
        self.rebuild, self.sources = rebuild, sources
        self.rebuilt: torch.Tensor | None = None
        self.direct: _DirectRecipe | None = None

    def tensor(self) -> torch.Tensor:
        """y, rebuilt under ``no_grad`` at the first call."""
        if self.rebuilt is None:
            with torch.no_grad():
                self.rebuilt = self.rebuild(*self.sources)
        return self.rebuilt


class _DirectRecipe:
    """An offered tensor as the Functions that keep it save it themselves (:func:`keep_input`), with no hook: the
    recipe's tensors go into each Function's own ``save_for_backward`` — autograd checks them, frees them after that
    Function's backward, and gives them back with their place in the graph — and the rest (the rebuild, its other
    arguments) is here, on each Function's ``ctx``, with no tensor but the rebuilt one: rebuilt once for every Function
    that kept it, and let go when the last of them has taken it (``waiting``), so it lives as y would have."""

    __slots__ = ("rebuild", "template", "slots", "rebuilt", "waiting")

    def __init__(self, recipe: _Recipe) -> None:
        self.rebuild = recipe.rebuild
        self.slots = tuple(i for i, s in enumerate(recipe.sources) if isinstance(s, torch.Tensor))
        self.template = tuple(None if isinstance(s, torch.Tensor) else s for s in recipe.sources)
        self.rebuilt: torch.Tensor | None = None
        self.waiting = 0

    def take(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """y from the recipe's tensors as saved (in order). In a ``create_graph`` backward (grad mode on) y is rebuilt
        as a function of them, for this caller alone, so that second derivatives reach the sources through it."""
        rebuilt = self.rebuilt
        if rebuilt is None or torch.is_grad_enabled():
            args = list(self.template)
            for slot, t in zip(self.slots, tensors):
                args[slot] = t
            if torch.is_grad_enabled():
                return self.rebuild(*args)
            rebuilt = self.rebuilt = self.rebuild(*args)
        self.waiting -= 1
        if self.waiting <= 0:
            self.rebuilt = None
        return rebuilt


#: an offered tensor: its mark (the very object, unchanged in place since) and its recipe
_Offer = tuple[TensorMark, _Recipe]


def _offer(y: torch.Tensor, rebuild: Callable[..., Any], sources: tuple[Any, ...]) -> _Offer:
    return TensorMark(y), _Recipe(rebuild, sources)


def _hooks(offers: list[_Offer]) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks that save each tensor of ``offers`` (the very object, unchanged in place since) as its
    recipe, any other as it is. Only the innermost hooks run: where they nest inside transparent ones (the memory
    meter's), those still see every tensor, a recipe's sources in its place."""
    outer = transparent_hooks()

    def find(t: torch.Tensor) -> _Recipe | None:
        for mark, recipe in offers:
            if mark.matches(t):
                return recipe
        return None

    def unpack(saved: Any) -> torch.Tensor:
        return saved.tensor() if type(saved) is _Recipe else saved

    if outer is None:
        @mark_transparent
        def pack(t: torch.Tensor) -> Any:
            recipe = find(t)
            return t if recipe is None else recipe

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
    outer_pack, outer_unpack = outer

    @mark_transparent
    def pack_through(t: torch.Tensor) -> Any:
        recipe = find(t)
        if recipe is None:
            return outer_pack(t)
        for source in recipe.sources:
            if isinstance(source, torch.Tensor):
                outer_pack(source)
        return recipe

    def unpack_through(saved: Any) -> torch.Tensor:
        return unpack(saved) if type(saved) is _Recipe else outer_unpack(saved)

    return torch.autograd.graph.saved_tensors_hooks(pack_through, unpack_through)


def rebuilt_from(y: torch.Tensor, rebuild: Callable[..., Any],
                 *sources: Any) -> torch.autograd.graph.saved_tensors_hooks:
    """A context in which autograd saves ``y`` as ``rebuild(*sources)`` (module docstring); the tensors among
    ``sources`` must be kept by backward anyway (they are held until the recipe is unpacked and freed)."""
    return _hooks([_offer(y, rebuild, sources)])


class _Scope(threading.local):
    """The offers of the :class:`RebuildScope` running on this thread (None outside one)."""

    offers: list[_Offer] | None = None


_SCOPE = _Scope()


def offer(y: torch.Tensor, rebuild: Callable[..., Any], *sources: Any) -> None:
    """Inside a :class:`RebuildScope` on this thread, have autograd save ``y`` as ``rebuild(*sources)`` from here
    to the scope's end (as :func:`rebuilt_from`); elsewhere nothing, and nothing where other hooks own what is saved
    (a producer inside a checkpointed region: backward keeps none of its tensors, so a recipe would keep the
    sources alive instead of y)."""
    offers = _SCOPE.offers
    if offers is not None and not saved_tensor_hooks_active():  # a producer under checkpointing: its sources are
        offers.append(_offer(y, rebuild, sources))                # not kept, so y is better kept as it is


class RebuildScope:
    """A block's forward (``with RebuildScope(): ...``) in which layers :func:`offer` their outputs as recipes: a
    consumer later in the block (:func:`keeps_recipes`) that saves one of those very tensors saves its recipe
    instead."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer, _SCOPE.offers = _SCOPE.offers, []

    def __exit__(self, *exc: Any) -> None:
        _SCOPE.offers = self._outer


def _offered(x: Any) -> _Offer | None:
    """The offer for ``x`` (the very object, unchanged in place since) in the running scope, where a consumer may keep
    its recipe (not under ``torch.compile``, nor inside a checkpointed region, whose hooks own what is saved)."""
    offers = _SCOPE.offers
    if not offers or compiling() or saved_tensor_hooks_active():
        return None
    for offered in offers:
        if offered[0].matches(x):
            return offered
    return None


def keep_input(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What an autograd Function saves in the place of its input x: pass it first to its ``ctx.save_for_backward``,
    and take x back in backward with :func:`kept_input`. That is ``(x,)``, or where x is a tensor offered in the
    running :class:`RebuildScope`, the tensors its recipe rebuilds it from (the rest of the recipe goes on ``ctx``):
    what the hooks of :func:`keeps_recipes` do, without a Python hook per saved tensor or a context per call (a
    class whose Functions all do this sets ``keeps_recipes_itself``; :class:`~.module.AdapterModule`)."""
    offered = _offered(x)
    if offered is None:
        ctx.input_recipe = None
        return (x,)
    recipe = offered[1]
    direct = recipe.direct
    if direct is None:
        direct = recipe.direct = _DirectRecipe(recipe)
    direct.waiting += 1
    ctx.input_recipe = direct
    return tuple(recipe.sources[slot] for slot in direct.slots)


def kept_input(ctx: Any, saved: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """``(x, the rest)`` from ``saved`` (``ctx.saved_tensors``, or the part of them that began with what
    :func:`keep_input` gave): x itself, or rebuilt from its recipe."""
    direct = ctx.input_recipe
    if direct is None:
        return saved[0], saved[1:]
    count = len(direct.slots)
    return direct.take(saved[:count]), saved[count:]


def keeps_recipes(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``forward(self, x, ...)`` of a layer that keeps its input for backward: where ``x`` is a tensor offered in the
    running :class:`RebuildScope` (the very object, unchanged in place since), the call runs under hooks that save
    ``x`` as its recipe; any other call runs as it is, with no hook (so does a call inside a checkpointed region, whose
    hooks own what is saved)."""

    @functools.wraps(forward)
    def run(self: Any, x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        offered = _offered(x)
        if offered is not None:
            with _hooks([offered]):
                return forward(self, x, *args, **kwargs)
        return forward(self, x, *args, **kwargs)

    return run
