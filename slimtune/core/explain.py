"""Which forward / backward variant each adapted layer takes for a given input, and what each option costs
(``slimtune profile --explain``).

Every adapter module answers :meth:`~slimtune.core.module.AdapterModule.explain` for an input like the one it
receives in training: a list of :class:`Choice` — the decision's name, the options with their FLOP and byte
counts, and the one the layer takes. The counts are the choosers' own (:func:`slimtune.core.lowrank.backward_flops`,
:class:`slimtune.core.costs.Cost`), so the report is the decision, not a re-derivation of it.
:func:`adapter_inputs` records each adapter's input during one forward pass (the meta device will do: shapes are
all the choosers read).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from rich.table import Table
from torch import nn

from . import timed
from .costs import Cost
from .lowrank import backward_flops, choose_backward
from .module import AdapterModule
from .siblings import SiblingGroup, runnable, sibling_fusion_enabled
from .stacked_rows import stackable
from .tracing import in_compiled_region
from .wide_rows import wide


@dataclasses.dataclass(frozen=True)
class Variant:
    """One option of a decision: its name, FLOPs and bytes (what each chooser counts; see :class:`Choice`)."""

    name: str
    flops: float
    bytes: float


@dataclasses.dataclass(frozen=True)
class Choice:
    """A decision a layer makes per input shape: ``what`` (e.g. ``"backward dA/dB"``), the options, the chosen
    one's name, and what ``bytes`` counts for these options (e.g. "transient" memory, or "moved")."""

    what: str
    options: tuple[Variant, ...]
    chosen: str
    bytes_meaning: str = "transient"

    def to_dict(self) -> dict:
        return {"what": self.what, "chosen": self.chosen, "bytes": self.bytes_meaning,
                "options": [dataclasses.asdict(v) for v in self.options]}


def timed_or_counted(decision: str, key: timed.Key, counted: str) -> tuple[str, str]:
    """``(choice, note)``: the winner :mod:`~slimtune.core.timed` holds for this decision (measured in this process
    or loaded from a timings file: ``profile --explain --timings FILE``) with a note naming its device, else the
    counting choice and no note."""
    found = timed.recorded(decision, key)
    return (found[0], f", timed on {found[1]}") if found else (counted, "")


def lowrank_backward_choice(tokens: int, d_in: int, d_out: int, r: int, dtype: torch.dtype) -> Choice:
    """LoRA's backward order for dA / dB (:func:`~slimtune.core.lowrank.choose_backward`, or its timed winner for
    this shape and dtype, :func:`timed_or_counted`): each variant's FLOPs and the transient bytes it allocates —
    ``"recompute"``: ``x Aᵀ`` and ``s·dy B`` ``[N, r]``; ``"gram"``: ``dyᵀ x`` ``[d_out, d_in]`` and ``s·dy B``."""
    itemsize = dtype.itemsize
    options = (Variant("recompute", backward_flops("recompute", tokens, d_in, d_out, r), 2 * tokens * r * itemsize),
               Variant("gram", backward_flops("gram", tokens, d_in, d_out, r),
                       (d_out * d_in + tokens * r) * itemsize))
    chosen, note = timed_or_counted("lowrank-backward", (tokens, d_in, d_out, r, str(dtype)),
                                    choose_backward(tokens, d_in, d_out, r))
    return Choice(f"backward dA/dB (rank {r}){note}", options, chosen)


def path_choice(costs: dict[str, Cost], chosen: str, note: str = "") -> Choice:
    """A structured update's path (:func:`~slimtune.core.costs.choose_path`, or ``chosen`` as timed: ``note``):
    FLOPs and bytes moved of each path beyond the base layer's own GEMM, forward + backward, as the chooser counts
    them."""
    options = tuple(Variant(f"{path} ({cost.launches} launches)" if cost.launches else path, cost.flops, cost.bytes)
                    for path, cost in costs.items())
    return Choice(f"path (fwd+bwd){note}", options, next(v.name for v in options if v.name.startswith(chosen)),
                  "moved")


@dataclasses.dataclass(frozen=True)
class LayerExplanation:
    """An adapted layer's qualified name, adapter class, input shape and its choices (none: a fixed path)."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    choices: tuple[Choice, ...]

    def to_dict(self) -> dict:
        return {"layer": self.name, "adapter": self.kind, "input_shape": list(self.input_shape),
                "choices": [c.to_dict() for c in self.choices]}


@contextlib.contextmanager
def adapter_inputs(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, each adapter module's first input of the forward pass run there is recorded
    (qualified name -> the tensor: on the meta device, shapes only); the hooks go when the block ends."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            handles.append(module.register_forward_pre_hook(recorder(name)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def sibling_choice(chain: tuple[nn.Module, ...], names: dict[nn.Module, str], x: torch.Tensor) -> Choice:
    """An adapted layer that runs in one Function with the layers beside it that read its input
    (:mod:`~slimtune.core.siblings`), as the recorded forward pass showed them. Both options do the same adapter
    FLOPs (forward ``2N·r·(d_in + d_out)``, backward by the recompute order plus ``dx``'s ``2N·r·d_in``, summed over
    the members; a DoRA member adds its norm's ``W Aᵀ`` and ``A Aᵀ``) and allocate the same transients (``x Aᵀ`` and
    ``s·dy B``, ``[N, Σr]``); what differs is the kernels launched. For LoRA, per forward + backward (no scaling, no
    bias): alone 9 per layer plus autograd's ``n − 1`` sums of the input gradients, together ``5n + 6`` — one stacked
    ``x Aᵀ`` GEMM each way, one ``dA`` GEMM, one ``dx``. DoRA's grouping shares the same GEMMs; its Triton launches
    stay one per member each way."""
    tokens, n = x.numel() // x.shape[-1], len(chain)
    lora = not hasattr(chain[0], "magnitude")  # a group holds one class of layer (core.siblings)
    flops = sum(2 * tokens * m.r * (m.in_features + m.out_features) + backward_flops(
        "recompute", tokens, m.in_features, m.out_features, m.r) + 2 * tokens * m.r * m.in_features
        + (0 if lora else 2 * m.r * m.in_features * (m.out_features + m.r)) for m in chain)
    transient = 2 * tokens * sum(m.r for m in chain) * x.dtype.itemsize
    together = ", ".join(names[m].rpartition(".")[2] for m in chain)
    options = (Variant(f"one Function: {together}" + (f" ({5 * n + 6} launches)" if lora else ""), flops, transient),
               Variant("alone" + (f" ({10 * n - 1} launches)" if lora else ""), flops, transient))
    return Choice("siblings (same input, from step 2)", options, options[0].name)


def compiled_chain_choice(chain: tuple[nn.Module, ...], names: dict[nn.Module, str], x: torch.Tensor) -> Choice:
    """How a compiled layer (:func:`~slimtune.models.layers.compile_layers`) runs the chain an adapted layer is in
    from the second step on — ``chain`` being its sibling chain as learnt, or the layer alone (o, down) — by the rule
    the compiled layer applies (:func:`~slimtune.core.stacked_rows.stackable`, :func:`~slimtune.core.wide_rows.wide`):
    wide rows (each member's frozen weight and B one matrix, so each output is one GEMM; not while a process group is
    up, where a chain of two keeps rows), stacked rows (the frozen weights and A's one tensor: one GEMM gives every
    base output and ``x Aᵀ``), or, where the chain cannot stack or run on its rows (a bias; DoRA in fp16), the
    members' own Function (one for a chain, or each alone), or each alone where the chain cannot run as one (dropout in
    training: :func:`~slimtune.core.siblings.runnable`). The options do the same adapter FLOPs and allocate the
    same transients (:func:`sibling_choice`'s counts); they differ in the GEMMs launched."""
    together = ", ".join(names[m].rpartition(".")[2] for m in chain)
    lora = not hasattr(chain[0], "magnitude")  # DoRA's grouped Function declines a call its routes cannot take
    counted = sibling_choice(chain, names, x).options[0]
    own = ("alone" if len(chain) == 1 else f"one Function: {together}" if lora
           else f"one Function or alone, by the members' routes (kept for dm): {together}")
    options = [f"wide rows: {together}", f"stacked rows: {together}", own, "alone"]
    if len(chain) > 1 and not runnable(chain, x):  # each member runs on its own (dropout in training, …)
        chosen = options[3]
    elif (stackable(chain) and chain[0].base_layer.weight.dtype == x.dtype
          and type(chain[0]).runs_on_rows(chain, x)):  # the rows' dtype is the weights'
        chosen = options[0] if wide(chain) else options[1]
    else:
        chosen = options[2]
    return Choice("compiled (from step 2)", tuple(Variant(o, counted.flops, counted.bytes)
                                                  for o in dict.fromkeys(options)), chosen)


def explain_layers(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[LayerExplanation]:
    """Each adapted layer's choices for the input recorded by :func:`adapter_inputs`, in module order (layers that
    the forward pass did not reach are left out); a LoRA layer that will run in one Function with its siblings (as
    that forward pass showed them) says so. A layer in a region marked compiled
    (:func:`~slimtune.core.tracing.mark_compiled`) whose siblings stack when compiled says how its compiled chain
    runs instead (:func:`compiled_chain_choice`)."""
    names = {module: name for name, module in model.named_modules()}
    chains: dict[nn.Module, tuple[nn.Module, ...]] = {}
    for module in names:
        group = getattr(module, "siblings", None)
        if group is not None and module not in chains:
            chains.update(group.learnt_chains())
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule) and name in inputs:
            x = inputs[name]
            choices = tuple(module.explain(x))
            group = getattr(module, "siblings", None)
            if (in_compiled_region(module) and isinstance(group, SiblingGroup)
                    and getattr(type(module), "fuses_when_compiled", False)):
                chain = chains.get(module, (module,)) if sibling_fusion_enabled() else (module,)
                choices += (compiled_chain_choice(chain, names, x),)
            elif module in chains:
                choices += (sibling_choice(chains[module], names, x),)
            rows.append(LayerExplanation(name, type(module).__name__, tuple(x.shape), choices))
    return rows


def _amount(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def explanation_table(rows: list[LayerExplanation], title: str | None = None) -> Table:
    """One row per decision: layer, adapter, input shape, the decision, the chosen option (bold) and every
    option's FLOPs / bytes."""
    table = Table(title=title)
    for column in ("layer", "adapter", "input", "decision", "chosen", "options: FLOPs / bytes"):
        table.add_column(column)
    for row in rows:
        choices = row.choices or (Choice("(fixed path)", (), "-"),)
        for i, choice in enumerate(choices):
            options = "\n".join(
                f"{'[bold]' if v.name == choice.chosen else ''}{v.name}: {_amount(v.flops, 'FLOP')} / "
                f"{_amount(v.bytes, 'B')} {choice.bytes_meaning}{'[/bold]' if v.name == choice.chosen else ''}"
                for v in choice.options)
            first = i == 0
            table.add_row(row.name if first else "", row.kind if first else "",
                          "x".join(map(str, row.input_shape)) if first else "", choice.what, choice.chosen, options)
    return table
