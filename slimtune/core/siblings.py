"""Adapted layers of one parent that read the same input — q/k/v, gate/up — learn that they do, then run as one
Function (LoRA: :mod:`.lowrank_group`; DoRA: :mod:`slimtune.methods.dora.group`): on a host-bound step every Function
and op per layer is host time.

Which siblings share an input is not in the model's structure (a cross-attention's q reads the hidden states, its
k and v the text features), so a :class:`SiblingGroup` — the LoRA (or the DoRA) Linear children of one parent
module — watches:

* **learning.** Each member's call is noted after it ran as usual. Calls with the very same input object, unchanged
  in between (its in-place version), one after another, form a chain — ``(q, k, v)``, ``(gate, up)``. Calls inside
  a backward pass (checkpointing's recomputation) are not watched. A member seen in two different chains, or a chain
  that changes, means no fusing for this group (until it relearns: :func:`relearn`, at every checkpoint).
* **active.** Once a backward pass has run through a member since the chains were seen, the next call of a chain's
  first member (outside a backward pass) runs the chain as one Function (the members' class's ``run_together``,
  which may decline a call) and holds the others' outputs; each of them,
  called next with the same input object unchanged (and autograd in the same mode), takes its output. Anything else
  — another input, an output never taken, a member disabled or with dropout in training — and the member runs alone
  as before; a surprise (a held output not taken, or taken with another input) turns fusing off for the group
  from the next call of a chain's first member after a backward pass.
* **off.** Every member runs alone.

Why the mode changes only on a member's call outside a backward pass, and only after a backward pass has run
through the group since the change became due: gradient checkpointing reruns a layer's forward in backward and requires it to save what the
first run saved. A switch between those two runs would break that; this rule keeps a forward pass and its
recomputation on one side of every switch, as long as a step's forward passes are each followed by their backward
before the next forward (the usual loop, gradient accumulation included). ``slimtune.set_sibling_fusion(False)``
turns the whole mechanism off, for a model that does otherwise.

Under ``torch.compile`` (**traced**): nothing is learnt or switched inside a graph (Dynamo cannot branch on a version
counter, and a graph cannot register hooks). A group whose chains were learnt in eager calls (state active) runs each
chain as one Function in the graph too: Inductor does not merge sibling GEMMs itself (the stacked ``x Aᵀ``, ``dA``
and ``dx`` GEMMs launched 278 fewer kernels in a compiled 3B step on an H100, RESULTS.md run 120). The held outputs pass to the other members inside the traced frame, taken by a
member called with the very same tensor object (what the trace can check; the eager learning saw the input
unchanged between the members' calls). Otherwise — chains not learnt, the group off, a class that does not fuse
compiled (:attr:`fuses_when_compiled`) — every member runs alone. :func:`~slimtune.models.layers.compile_layers` runs
a layer eagerly while a group within it learns (:func:`watched_groups`, :meth:`SiblingGroup.settle`), so its graph is
traced with the chains learnt.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from .autograd_state import inside_backward
from .caches import TensorMark
from .lowrank import choose_backward
from .tracing import cached_unless_traced, compiling

LEARNING, ACTIVE, OFF = "learning", "active", "off"
_SETTING = {"enabled": True}
#: eager forward calls of a compiled region (:func:`~slimtune.models.layers.compile_layers`) that wait for a group's
#: first backward pass before its graph is traced unfused anyway (a model run only without gradients never ends
#: learning)
MAX_EAGER_WAIT = 8


def set_sibling_fusion(enabled: bool) -> None:
    """Whether LoRA layers that read the same input (q/k/v, gate/up) may run as one Function (default: yes). Off,
    every adapted layer runs alone; the results agree within rounding either way (the stacked GEMM and the one
    ``dx`` sum round differently)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_sibling_fusion takes True or False, got {enabled!r}")
    _SETTING["enabled"] = enabled


def sibling_fusion_enabled() -> bool:
    return _SETTING["enabled"]


class _InputMark(TensorMark):
    """The input a call saw (:class:`~.caches.TensorMark`) and autograd's mode then: a later call that sees the same
    object, unchanged, in the same mode, matches."""

    __slots__ = ("_grad",)

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__(x)
        self._grad = torch.is_grad_enabled()

    def matches(self, x: torch.Tensor) -> bool:
        return super().matches(x) and torch.is_grad_enabled() == self._grad


class SiblingGroup:
    """The fusable adapted layers of one parent module (see the module docstring); each member holds it as
    ``member.siblings`` and calls :meth:`take` before running alone and :meth:`note` after.

    The group holds its members weakly (a member holds the group): no reference cycle keeps a deleted model's layers
    — and their weights — alive until the garbage collector runs. Internally a member is its position."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self._refs = tuple(weakref.ref(m) for m in members)
        self._reset()

    @property
    def members(self) -> tuple[nn.Module, ...]:
        return tuple(m for m in (ref() for ref in self._refs) if m is not None)

    @property
    def chains(self) -> dict[nn.Module, tuple[nn.Module, ...]]:
        """First member -> the chain, as learnt."""
        return {self._refs[head](): tuple(self._refs[i]() for i in chain) for head, chain in self._chains.items()}

    def _reset(self) -> None:
        self.state = LEARNING
        self._chains: dict[int, tuple[int, ...]] = {}  # first member's position -> the chain's positions
        self._open: list[int] = []
        self._open_mark: _InputMark | None = None
        self._backward_seen = False
        self._hook_set = False
        self._held: dict[int, tuple[_InputMark, torch.Tensor]] = {}
        self._held_in_backward = False
        self._surprised = False
        self._traced_held: dict[int, tuple[torch.Tensor, bool, torch.Tensor]] = {}
        self._eager_waits = 0

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickling) starts learning afresh: nothing transient travels
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self._refs = tuple(weakref.ref(m) for m in state["members"])
        self._reset()

    def _position(self, member: nn.Module) -> int:
        index = member.__dict__.get("_sibling_position")  # set by install: asked on every member's call
        if index is not None and index < len(self._refs) and self._refs[index]() is member:
            return index
        for i, ref in enumerate(self._refs):
            if ref() is member:
                return i
        raise ValueError(f"{type(member).__name__} is not a member of this sibling group")

    # -- learning ------------------------------------------------------------------------------------------
    def note(self, member: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """After ``member`` ran alone on x (output y): extend or start the open chain; arm the backward signal.
        Calls under ``torch.inference_mode`` teach nothing (their inputs carry no version to match)."""
        if self.state is not LEARNING or compiling() or torch.is_inference_mode_enabled():
            return
        if not self._hook_set and y.grad_fn is not None:  # the first backward through the group ends learning
            y.grad_fn.register_hook(self._after_backward)
            self._hook_set = True
        if inside_backward():  # checkpointing's recomputation: seen already
            return
        index, mark = self._position(member), self._open_mark
        if mark is not None and index not in self._open and mark.matches(x):
            self._open.append(index)
        else:
            self._close()
            self._open, self._open_mark = [index], _InputMark(x)

    def _after_backward(self, *_: Any) -> None:
        self._backward_seen = True

    def _close(self) -> None:
        chain = tuple(self._open)
        self._open, self._open_mark = [], None
        if len(chain) < 2:
            return
        known = self._chains.get(chain[0])
        elsewhere = any(i in c for head, c in self._chains.items() if head != chain[0] for i in chain)
        if (known is not None and known != chain) or elsewhere:
            self.state, self._chains = OFF, {}
        else:
            self._chains[chain[0]] = chain

    # -- running -------------------------------------------------------------------------------------------
    def take(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output when the group computes it (its chain's first member: the whole chain runs now), or
        None: the member runs alone — always under ``torch.inference_mode``, whose tensors carry no version by which
        a later member could check that its input is the one the chain ran on (and nothing there counts as a
        surprise: fusion resumes after it)."""
        if compiling():  # before asking for inference mode, which Dynamo cannot trace
            return self._take_traced(member, x)
        if torch.is_inference_mode_enabled():
            return None
        if self.state is LEARNING:
            self._end_learning()
        if self.state is not ACTIVE:
            return None
        index = self._position(member)
        chain = self._chains.get(index)
        if chain is None:
            held = self._held.pop(index, None)
            if held is None:
                return None
            if held[0].matches(x):
                return held[1]
            self._surprise()
            return None
        if self._held:  # outputs of the last run nobody took (a recomputation may stop before taking them: no surprise)
            self._held.clear()
            if not self._held_in_backward:
                self._surprise()
        if not inside_backward() and (self._surprised and self._backward_seen or not sibling_fusion_enabled()):
            self.state = OFF
            return None
        members = [self._refs[i]() for i in chain]
        if any(m is None for m in members) or not runnable(members, x):
            return None
        outputs = type(members[0]).run_together(members, x, self._after_backward)
        if outputs is None:  # the members' class declined this call (DoRA: a layer on its "z" route)
            return None
        mark, self._held_in_backward = _InputMark(x), inside_backward()
        for other, y in zip(chain[1:], outputs[1:]):
            self._held[other] = (mark, y)
        return outputs[0]

    def _end_learning(self) -> None:
        """Leave learning — for active where chains were seen, else off — once a backward pass has run through the
        group, outside a backward pass, with fusion enabled."""
        if not (self._backward_seen and sibling_fusion_enabled() and not inside_backward()):
            return
        self._close()
        self.state = ACTIVE if self.state is not OFF and self._chains else OFF
        if self.state is OFF:
            self._chains = {}

    def settle(self) -> bool:
        """Before an eager-or-compiled decision (:func:`~slimtune.models.layers.compile_layers`' layers): end
        learning where the next eager call of a chain's first member would, and say whether the group is still
        learning — False also after :data:`MAX_EAGER_WAIT` such calls outside a backward pass without one
        running through the group (the compiled layer is then traced with its members alone)."""
        if self.state is not LEARNING or not sibling_fusion_enabled():
            return False
        self._end_learning()
        if self.state is not LEARNING or inside_backward():
            return self.state is LEARNING
        self._eager_waits += 1
        return self._eager_waits <= MAX_EAGER_WAIT

    def _take_traced(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """:meth:`take` while Dynamo traces: the chain's first member runs it as one Function (the group active, its
        class fusing compiled) and holds the others' outputs for the frame; a member called with the same tensor
        object (and autograd in the same mode) takes its output. Nothing is learnt or switched here."""
        if self.state is not ACTIVE or not sibling_fusion_enabled():
            return None
        index = self._position(member)
        chain = self._chains.get(index)
        if chain is None:
            held = self._traced_held.pop(index, None)
            if held is not None and held[0] is x and held[1] == torch.is_grad_enabled():
                return held[2]
            return None
        members = [self._refs[i]() for i in chain]
        if (any(m is None for m in members) or not getattr(type(members[0]), "fuses_when_compiled", False)
                or not runnable(members, x)):
            return None
        outputs = type(members[0]).run_together(members, x, None)
        if outputs is None:
            return None
        grad = torch.is_grad_enabled()
        self._traced_held = {other: (x, grad, y) for other, y in zip(chain[1:], outputs[1:])}
        return outputs[0]

    def clear_traced(self) -> None:
        """Drop held outputs that a traced frame left untaken (after each compiled call: not kept to the next)."""
        if self._traced_held:
            self._traced_held = {}

    def learnt_chains(self) -> dict[nn.Module, tuple[nn.Module, ...]]:
        """Each member of a chain seen so far -> its chain (the open one closed first): after a forward pass, which
        layers will run as one from the next step (``slimtune profile --explain``)."""
        if self.state is LEARNING:
            self._close()
        return {m: chain for chain in self.chains.values() for m in chain}

    def _surprise(self) -> None:
        self._surprised, self._backward_seen = True, False


@functools.lru_cache(maxsize=1024)
def _recompute_order(tokens: int, d_in: int, d_out: int, r: int) -> bool:
    """Whether :func:`~.lowrank.choose_backward` picks ``"recompute"`` for these sizes (asked on every chain's call:
    remembered per shape)."""
    return choose_backward(tokens, d_in, d_out, r) == "recompute"


def runnable(chain: Sequence[Any], x: torch.Tensor) -> bool:
    """Whether this call can run the chain as one: every member of one class, enabled, unmerged, without dropout in
    training, of one scaling and one input width, its dA / dB by the ``"recompute"`` order (the fused backward's).
    The class itself may still decline (``run_together`` returning None: DoRA's routes)."""
    first = chain[0]
    kind, d_in = type(first), x.shape[-1]
    tokens = x.numel() // d_in if d_in else 0
    recompute_order = cached_unless_traced(_recompute_order)
    for m in chain:
        if (type(m) is not kind or m.disabled or m.merged or (m.training and m.dropout_p > 0)
                or m.scaling != first.scaling or m.in_features != d_in
                or not recompute_order(tokens, m.in_features, m.out_features, m.r)):
            return False
    return True


def relearn(model: nn.Module) -> None:
    """Send every :class:`SiblingGroup` in ``model`` back to learning. Called where a checkpoint is taken: a run
    resumed from it starts learning, and fused and lone layers round differently (the stacked ``x Aᵀ`` GEMM, one
    ``dx`` sum), so the run that goes on must learn from the same step to continue bit for bit. It costs one step
    of lone layers per checkpoint."""
    for module in model.modules():
        group = getattr(module, "siblings", None)
        if isinstance(group, SiblingGroup):
            group._reset()  # once per member: resetting twice is the same


def watched_groups(region: nn.Module) -> list[SiblingGroup]:
    """The sibling groups of ``region``'s adapted layers whose class fuses under ``torch.compile``
    (:attr:`fuses_when_compiled`), each once: what a compiled region watches (:func:`still_learning`)."""
    groups: list[SiblingGroup] = []
    for module in region.modules():
        group = getattr(module, "siblings", None)
        if (isinstance(group, SiblingGroup) and getattr(type(module), "fuses_when_compiled", False)
                and not any(g is group for g in groups)):
            groups.append(group)
    return groups


def still_learning(groups: Sequence[SiblingGroup]) -> bool:
    """Whether any of ``groups`` is still learning (each settled first: :meth:`SiblingGroup.settle`)."""
    return any([group.settle() for group in groups])  # a list: every group settles


def install(model: nn.Module, adapters: Sequence[nn.Module], kinds: tuple[type, ...]) -> Any:
    """Give every parent module with two or more adapters of ``kinds`` among its children one :class:`SiblingGroup`
    (``adapter.siblings``); returns a function that takes them away."""
    chosen = {a for a in adapters if type(a) in kinds}
    grouped: list[nn.Module] = []
    for parent in model.modules():
        members = [child for child in parent.children() if child in chosen]
        if len(members) >= 2:
            group = SiblingGroup(members)
            for position, member in enumerate(members):
                member.siblings = group
                member.__dict__["_sibling_position"] = position
            grouped.extend(members)
    return _Ungroup(grouped)


class _Ungroup:
    """:func:`install`'s remover: the members leave their groups (an object, not a closure: a copy of the model
    gets one for its own members)."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members

    def __call__(self) -> None:
        for member in self.members:
            member.siblings = None
            member.__dict__.pop("_sibling_position", None)
