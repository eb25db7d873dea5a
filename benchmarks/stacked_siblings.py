"""A prototype for ``paired_steps.py``'s ``stacked:lora`` configurations, not part of slimtune: each LoRA sibling
chain's frozen weights and A factors held in one buffer, so that one GEMM gives every member's base output and the
stacked ``x Aᵀ``.

RESULTS.md run 135 reads compiled LoRA's gap to issue 19's 0.9x as idle GPU time while the host queues 33 adapter
GEMM calls a layer. This measures what fewer calls buy before anyone redesigns how weights are held. For a chain
(q, k, v) with frozen ``W_i`` ``[d_i, d_in]`` and ``A_i`` ``[r_i, d_in]`` (one dtype, no bias, dense), the rows
``S = [W_1; …; W_n; A_1; …; A_n]`` ``[Σd + R, d_in]`` are copied into one tensor once, and every ``W_i`` and ``A_i``
becomes a row view of it (``.data``): the optimizer's updates of A land in S. Forward is then
``out = x Sᵀ`` ``[N, Σd + R]``, ``y_i = out[:, d-slice] + s·h_i B_iᵀ`` with ``h = out[:, Σd:]`` — one GEMM where
there were n + 1, and no stacking copy of the A's. Backward takes ``dx`` from one GEMM against S as well.

Limits, as a prototype: built once the chains are learnt (after an eager step), on a model already on its device
(``.to()`` would separate the views from S: their later values would not be S's); LoRA only. A LoRA layer in no
chain (o, down) is stacked as a chain of one, ``[W; A]``. :func:`stack_siblings` replaces ``LoraLinear.run_together``
and ``LoraLinear.forward`` for the process: a layer or chain without rows (another model's in the same rounds) goes
the usual way. RESULTS.md run 136 has the H100's numbers. Usage:
``python benchmarks/paired_steps.py --compile --configs lora stacked:lora peft-bf16:lora``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from slimtune.core.compute import add_product, cast, mm_scaled
from slimtune.core.frozen import base_weight_operand, is_quantized
from slimtune.core.rebuild import keep_input, kept_input
from slimtune.core.siblings import SiblingGroup
from slimtune.core.tracing import compiling
from slimtune.methods.lora.linear import LoraLinear

#: the attribute (a non-persistent buffer of a chain's first member) that holds the chain's rows S
ROWS = "stacked_rows"


class StackedGroupFunction(torch.autograd.Function):
    """The members' ``y_i = x W_iᵀ + s·(x A_iᵀ) B_iᵀ`` (:class:`GroupedLowRankFunction`'s, without biases) with the
    base outputs and ``x Aᵀ`` from one GEMM against the rows S, passed last (the members' weights and A's are views
    of S). Backward takes ``dx`` from one GEMM too: ``dx = Σ dy_i W_i + g A = [dy_1, …, dy_n, g] S``, where ``g =
    s·[dy_1 B_1, …, dy_n B_n]`` ``[N, R]``. Under ``torch.compile`` forward keeps ``h = x Aᵀ`` for ``dB`` (copied out
    of the GEMM's output, ``[N, R]``), as the compiled step's partitioner does for slimtune's LoRA (RESULTS.md run
    134); eagerly backward forms it again."""

    @staticmethod
    def forward(ctx, x, scaling: float, count: int, on_backward: Callable[[], None] | None, *operands_and_rows):
        *operands, rows = operands_and_rows
        weights, ups = operands[:count], operands[3 * count:]
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        out = F.linear(x2, rows)  # [N, Σd + R]: every base output, then h = x Aᵀ
        widths, ranks = [w.shape[0] for w in weights], [u.shape[1] for u in ups]
        h = out[:, sum(widths):]
        if compiling():  # kept for dB: its own [N, R] buffer, or the saved view would keep all of out alive
            h = h.contiguous()
        outputs, start, rank_start = [], 0, 0
        for width, rank, up in zip(widths, ranks, ups):
            base, h_i = out[:, start:start + width], h[:, rank_start:rank_start + rank]
            # out of place: the outputs are their own tensors, not views of out
            y = add_product(base, h_i, up.t(), scaling) if compiling() else torch.addmm(base, h_i, up.t(), alpha=scaling)
            outputs.append(y.view(*lead, width))
            start, rank_start = start + width, rank_start + rank
        ctx.set_materialize_grads(False)
        ctx.scaling, ctx.on_backward, ctx.widths, ctx.ranks = scaling, on_backward, widths, ranks
        ctx.kept_h = compiling()
        ctx.save_for_backward(*keep_input(ctx, x), rows, *ups, *((h,) if ctx.kept_h else ()))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x, saved = kept_input(ctx, ctx.saved_tensors)
        count, widths, ranks, scaling = len(ctx.widths), ctx.widths, ctx.ranks, ctx.scaling
        rows, ups = saved[0], saved[1:1 + count]
        dtype, x2 = x.dtype, x.reshape(-1, x.shape[-1])
        h = saved[1 + count] if ctx.kept_h else x2 @ rows[sum(widths):].t()
        dys = [cast(g.reshape(x2.shape[0], width), dtype) if g is not None else x2.new_zeros(x2.shape[0], width)
               for g, width in zip(grads, widths)]
        gs = [mm_scaled(dy, cast(up, dtype), scaling) for dy, up in zip(dys, ups)]  # s·dy_i B_i
        hs = h.split_with_sizes(ranks, dim=1)
        grad_b = [cast(mm_scaled(dy.t(), h_i, scaling), up.dtype) for dy, h_i, up in zip(dys, hs, ups)]
        g = torch.cat(gs, dim=1)
        grad_a = [cast(p, dtype) for p in (g.t() @ x2).split_with_sizes(ranks)]
        dx = torch.cat([*dys, g], dim=1) @ rows if ctx.needs_input_grad[0] else None
        if ctx.on_backward is not None:
            ctx.on_backward()
        return (dx.view(x.shape) if dx is not None else None, None, None, None, *([None] * (2 * count)),
                *grad_a, *grad_b, None)


_RUN_TOGETHER = LoraLinear.run_together


def run_together(chain: Sequence[LoraLinear], x: torch.Tensor,
                 on_backward: Callable[[], None] | None) -> tuple[torch.Tensor, ...] | None:
    """LoRA's ``run_together``, through :class:`StackedGroupFunction` for a chain stacked by :func:`stack_chain`
    (and as before for every other chain)."""
    first = chain[0]
    rows = getattr(first, ROWS, None)
    if rows is None or first.__dict__.get("stacked_count") != len(chain):
        return _RUN_TOGETHER(chain, x, on_backward)
    xc, _, _, context = first._inputs(x)
    if xc.dtype != rows.dtype:
        return _RUN_TOGETHER(chain, x, on_backward)
    weights = [m.weight_operand(xc.dtype) for m in chain]
    with context:
        return StackedGroupFunction.apply(xc, first.scaling, len(chain), on_backward, *weights,
                                          *([None] * len(chain)), *[m.lora_A for m in chain],
                                          *[m.lora_B for m in chain], rows)


def stack_chain(chain: Sequence[Any]) -> bool:
    """Copy ``chain``'s ``[W_1; …; W_n; A_1; …; A_n]`` into one tensor and make each a row view of it; False (and
    nothing changed) for a chain this prototype does not take."""
    if any(type(m) is not LoraLinear or m.fan_in_fan_out or m.base_layer.bias is not None
           or is_quantized(base_weight_operand(m.base_layer)) for m in chain):
        return False
    tensors = [m.base_layer.weight for m in chain] + [m.lora_A for m in chain]
    if any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors):
        return False
    rows = torch.cat([t.detach() for t in tensors])
    start = 0
    for t in tensors:
        t.data = rows[start:start + t.shape[0]]
        start += t.shape[0]
    chain[0].register_buffer(ROWS, rows, persistent=False)
    chain[0].__dict__["stacked_count"] = len(chain)
    return True


_FORWARD = LoraLinear.forward


def forward(self: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """LoRA's ``forward``, for a layer in no chain (o, down) stacked as a chain of one by :func:`stack_siblings`:
    ``[W; A]`` in one buffer, ``x [W; A]ᵀ`` in one GEMM, ``dx = [dy, g] [W; A]`` in one; as before for every other
    layer and where the prototype does not apply (dropout, another dtype, a disabled or merged adapter). A class
    attribute, as ``run_together``: an instance ``forward`` would be a guard of its own in each compiled layer."""
    rows = getattr(self, ROWS, None)
    if rows is None or self.__dict__.get("stacked_count") != 1 or self.disabled or self.merged:
        return _FORWARD(self, x)
    xc, bias, p, context = self._inputs(x)
    if p or bias is not None or xc.dtype != rows.dtype:
        return _FORWARD(self, x)
    with context:
        return StackedGroupFunction.apply(xc, self.scaling, 1, None, self.weight_operand(xc.dtype), None,
                                          self.lora_A, self.lora_B, rows)[0]


def stack_siblings(model: torch.nn.Module) -> int:
    """Stack every learnt LoRA chain of ``model`` (:func:`stack_chain`) and route them through
    :class:`StackedGroupFunction`, and every LoRA layer in no chain as a chain of one (:func:`forward`); returns how
    many chains."""
    LoraLinear.run_together = staticmethod(run_together)
    LoraLinear.forward = forward
    groups: list[SiblingGroup] = []
    for module in model.modules():
        group = getattr(module, "siblings", None)
        if isinstance(group, SiblingGroup) and not any(g is group for g in groups):
            groups.append(group)
    stacked = 0
    for group in groups:
        group.learnt_chains()
        stacked += sum(stack_chain(chain) for chain in group.chains.values())
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, ROWS) and not any(
                module in chain for group in groups for chain in group.chains.values()):
            stacked += stack_chain([module])
    return stacked
