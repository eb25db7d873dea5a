"""slimtune.core.rebuild: a tensor saved as the recipe that rebuilds it — the same gradients bit for bit, only that
tensor replaced, autograd's in-place check kept, and the hooks seen as transparent."""
from __future__ import annotations

import weakref

import pytest
import torch

from slimtune.core.autograd_state import saved_tensor_hooks_active
from slimtune.core.rebuild import RebuildScope, keep_input, kept_input, keeps_recipes, offer, rebuilt_from
from slimtune.memory.accounting import SavedTensorMeter


def _product(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return y * w  # saves y (for w's gradient) and w (for y's)


class _Consumer:
    """A layer that keeps its input, as an adapter does (``AdapterModule`` puts ``keeps_recipes`` on each forward)."""

    @keeps_recipes
    def forward(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _product(y, w)


def _consume(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _Consumer().forward(y, w)


def test_only_the_marked_tensor_is_rebuilt_and_gradients_are_equal():
    torch.manual_seed(0)
    p = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    rebuilt: list[torch.Tensor] = []

    def rebuild(source: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(source[:, :3])
        rebuilt.append(out)
        return out

    y = torch.tanh(p[:, :3])
    with rebuilt_from(y, rebuild, p.detach()):
        assert not saved_tensor_hooks_active()  # transparent: DoRA's auto decision still runs under it
        out = _product(y, w)
    out.sum().backward()
    assert len(rebuilt) == 1 and torch.equal(rebuilt[0], y)
    grads = (p.grad.clone(), w.grad.clone())
    p.grad = w.grad = None
    _product(torch.tanh(p[:, :3]), w).sum().backward()
    assert torch.equal(grads[0], p.grad) and torch.equal(grads[1], w.grad)



def test_a_recipe_saved_by_several_consumers_is_rebuilt_once():
    """Three consumers keep the same offered tensor (q, k, v running alone; a LoCon conv's base and down
    convolutions): one rebuild serves them all, and the gradients are the plain path's."""
    torch.manual_seed(1)
    p = torch.randn(4, 6, requires_grad=True)
    ws = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    calls: list[int] = []

    def rebuild(source: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.sigmoid(source)

    y = torch.sigmoid(p)
    with RebuildScope():
        offer(y, rebuild, p.detach())
        outs = [_consume(y, w) for w in ws]
    sum(o.sum() for o in outs).backward()
    assert len(calls) == 1
    grads = [t.grad.clone() for t in (p, *ws)]
    for t in (p, *ws):
        t.grad = None
    y = torch.sigmoid(p)
    sum(_product(y, w).sum() for w in ws).backward()
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (p, *ws)))

def test_an_in_place_change_after_saving_does_not_reach_the_gradient():
    """With a recipe saved, a later in-place change of y is not checked by autograd (hooks own the saved value): the
    gradient uses y as it was saved, rebuilt — what autograd without the recipe would have computed, had it allowed
    the change."""
    p = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    y = p * 2
    with rebuilt_from(y, lambda source: source * 2, p):
        out = _product(y, w)
    y.add_(1)
    out.sum().backward()
    assert torch.equal(w.grad, p * 2)


def test_a_different_tensor_of_the_same_values_is_saved_as_it_is():
    p = torch.randn(4, 3, requires_grad=True)
    y = p * 2
    twin = y.detach().clone().requires_grad_()
    calls: list[int] = []
    with rebuilt_from(y, lambda source: calls.append(1) or source * 2, p.detach()):
        out = _product(twin, p)
    out.sum().backward()
    assert not calls


def test_the_memory_meter_outside_still_sees_what_is_kept():
    """Only the innermost saved-tensor hooks run: a recipe inside the meter's hands it the sources, not y."""
    p = torch.randn(64, 3)
    w = torch.randn(64, 3, requires_grad=True)
    y = p * 2
    meter = SavedTensorMeter()
    with meter.record():
        with rebuilt_from(y, lambda source: source * 2, p):
            out = _product(y, w)
    assert meter.bytes == 64 * 3 * 4  # p, in the place of y (w gets the gradient: y * w keeps y alone)
    out.sum().backward()
    assert torch.equal(w.grad, y)


def test_a_scope_saves_offered_tensors_as_recipes_until_it_ends():
    p = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    y, z = p * 2, p * 3
    calls: list[str] = []
    offer(y, lambda source: calls.append("outside") or source * 2, p)  # no scope: nothing
    with RebuildScope():
        offer(y, lambda source: calls.append("y") or source * 2, p)
        out = _consume(y, w) + _consume(z, w)
    after = _consume(y, w)  # the scope has ended: y saved as it is
    (out + after).sum().backward()
    assert calls == ["y"] and torch.allclose(w.grad, 2 * y + z, rtol=1e-6, atol=0)


def test_in_a_scope_an_op_that_is_no_consumer_saves_the_offered_tensor_as_it_is():
    """The hooks run only around a consumer's call (no Python hook for the block's other saved tensors): a plain op
    in the scope keeps y itself, so autograd's in-place check still catches a later change of y."""
    p = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    y = p * 2
    with RebuildScope():
        offer(y, lambda source: source * 2, p)
        taken = _consume(y, w)
        plain = _product(y, w)
    y.add_(1)
    taken.sum().backward()  # the recipe: no check, y as it was
    assert torch.equal(w.grad, p * 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        plain.sum().backward()


def test_second_derivatives_through_a_recipe_are_the_plain_ones():
    """In a ``create_graph`` backward autograd gives the rebuilt y the saved y's place in the graph: d²/dp² through
    y = p² saved by y * w is the plain one (a rebuilt y cut from the graph would drop that term silently)."""
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    grads = []
    for recipe in (False, True):
        p = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = p * p
        if recipe:
            with rebuilt_from(y, lambda source: source * source, p):
                out = (y * w).sum()
        else:
            out = (y * w).sum()
        (gw,) = torch.autograd.grad(out, w, create_graph=True)  # = y: its graph reaches p only through the recipe
        (gp,) = torch.autograd.grad(gw.sum(), p)
        grads.append(gp)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_an_offer_from_a_checkpointed_producer_is_not_taken():
    """A producer inside a checkpointed region keeps none of its tensors for backward: a recipe would hold its
    sources alive, so the consumer after the region keeps y itself."""
    p = torch.randn(8, 3, requires_grad=True)
    w = torch.randn(8, 3, requires_grad=True)
    calls: list[int] = []

    def produce(q: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(q)
        offer(y, lambda source: calls.append(1) or torch.tanh(source), q)
        return y

    with RebuildScope():
        y = torch.utils.checkpoint.checkpoint(produce, p, use_reentrant=False)
        out = _consume(y, w)
    out.sum().backward()
    assert not calls and torch.equal(w.grad, torch.tanh(p).detach())


def test_a_consumer_inside_a_checkpointed_region_of_a_scope_saves_through_the_checkpoint():
    """A block's feed-forward checkpointed inside its scope (``memory="balanced"``): the checkpoint's hooks own what
    its consumers save, so no recipe is taken there (the recomputation would save other tensors than the forward)."""
    p = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    y = p * 2
    calls: list[int] = []
    with RebuildScope():
        offer(y, lambda source: calls.append(1) or source * 2, p)
        out = torch.utils.checkpoint.checkpoint(_consume, y, w, use_reentrant=False)
    out.sum().backward()
    assert not calls and torch.equal(w.grad, y)


class _Keeper(torch.autograd.Function):
    """``y * w`` keeping y through :func:`keep_input` (as LoRA's Functions do): y itself, or its recipe."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*keep_input(ctx, y), w)
        return y * w

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, (w,) = kept_input(ctx, ctx.saved_tensors)
        return grad * w, grad * y


def test_functions_keeping_a_recipe_themselves_rebuild_once_and_let_it_go():
    """Functions that keep an offered input themselves (no hooks): one rebuild for all of them, the plain gradients bit
    for bit, and the rebuilt tensor let go once the last of them has taken it (the graph still alive)."""
    torch.manual_seed(2)
    p = torch.randn(4, 6, requires_grad=True)
    ws = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    rebuilt: list[weakref.ref] = []

    def rebuild(source: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(source)
        rebuilt.append(weakref.ref(out))
        return out

    y = torch.sigmoid(p)
    with RebuildScope():
        offer(y, rebuild, p)
        outs = [_Keeper.apply(y, w) for w in ws]
    total = sum(o.sum() for o in outs)
    total.backward()
    assert len(rebuilt) == 1 and rebuilt[0]() is None  # `total` and its graph are still here
    grads = [t.grad.clone() for t in (p, *ws)]
    for t in (p, *ws):
        t.grad = None
    y = torch.sigmoid(p)
    sum((y * w).sum() for w in ws).backward()
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (p, *ws)))


def test_a_function_keeping_a_recipe_saves_its_sources_where_the_meter_sees_them():
    """The meter outside sees the recipe's source (kept anyway: here by a producer-like product), not y."""
    p = torch.randn(64, 3)
    w = torch.randn(64, 3, requires_grad=True)
    y = p * 2
    meter = SavedTensorMeter()
    with RebuildScope():
        offer(y, lambda source: source * 2, p)
        with meter.record():
            kept_anyway = _product(p, w)  # keeps p and w
            out = _Keeper.apply(y, w)
    assert meter.bytes == 2 * 64 * 3 * 4  # p and w: no y
    (out + kept_anyway).sum().backward()
    assert torch.equal(w.grad, y + p)


def test_a_function_keeping_a_recipe_checks_its_sources_and_rebuilds_y_as_it_was():
    """The sources are saved by the Function itself: a later in-place change of one fails backward, as for any saved
    tensor. A change of y itself does not reach the gradient (y is rebuilt as it was saved, as with the hooks)."""
    for changed in ("source", "y"):
        p = torch.randn(4, 3)
        w = torch.randn(4, 3, requires_grad=True)
        y = p * 2
        with RebuildScope():
            offer(y, lambda source: source * 2, p)
            out = _Keeper.apply(y, w)
        (p if changed == "source" else y).add_(1)
        if changed == "source":
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
        else:
            out.sum().backward()
            assert torch.equal(w.grad, p * 2)


def test_second_derivatives_through_a_recipe_kept_by_a_function_are_the_plain_ones():
    """A ``create_graph`` backward rebuilds y from its saved sources with grad on, so d²/dp² through y = p² reaches p
    (a y rebuilt without grad would drop that term silently)."""
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    grads = []
    for recipe in (False, True):
        p = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = p * p
        with RebuildScope():
            if recipe:
                offer(y, lambda source: source * source, p)
            out = _Keeper.apply(y, w).sum()
        (gw,) = torch.autograd.grad(out, w, create_graph=True)
        (gp,) = torch.autograd.grad(gw.sum(), p)
        grads.append(gp)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_a_function_outside_a_scope_or_given_another_tensor_keeps_it_as_it_is():
    p = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    y = p * 2
    calls: list[int] = []
    outside = _Keeper.apply(y, w)
    with RebuildScope():
        offer(y, lambda source: calls.append(1) or source * 2, p)
        other = _Keeper.apply(y.clone(), w)
    (outside + other).sum().backward()
    assert not calls and torch.equal(w.grad, 2 * y)


def test_a_recipe_kept_by_a_function_serves_a_second_backward_of_a_retained_graph():
    """``retain_graph=True``: the first backward lets the rebuilt tensor go; the second rebuilds it again from the
    sources the Function still holds, and gets the same gradients."""
    p = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    y = torch.sigmoid(p)
    calls: list[int] = []
    with RebuildScope():
        offer(y, lambda source: calls.append(1) or torch.sigmoid(source), p)
        out = _Keeper.apply(y, w).sum() + _Keeper.apply(y, w).sum()
    (first,) = torch.autograd.grad(out, w, retain_graph=True)
    (second,) = torch.autograd.grad(out, w)
    assert torch.equal(first, 2 * y) and torch.equal(second, first) and len(calls) == 3
