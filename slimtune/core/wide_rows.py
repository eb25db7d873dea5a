"""A stacked chain of two LoRA layers that read one input (gate/up) as GEMMs that give each member's output whole:
its frozen weight and its B are one matrix, read against ``[s·h, x]`` ("wide rows"), so no ``[N, d_i]`` product is
written and read back to be added.

For members i = 1 … n with ``W_i`` ``[d_i, d_in]``, ``A_i`` ``[r_i, d_in]``, ``B_i`` ``[d_i, r_i]`` and
``A = [A_1; …; A_n]`` ``[R, d_in]``, a call forms ``h = x Aᵀ`` ``[N, R]`` and one buffer::

    buf = [s·h_1 | x | s·h_2 | … | s·h_n]   [N, R + d_in]

and member i's matrix ``T_i`` ``[K_i, d_i]`` (rows along the inner dimension) reads a contiguous run of its columns:
``T_1 = [B_1ᵀ; W_1ᵀ]`` the first ``r_1 + d_in``, ``T_i = [W_iᵀ; 0; B_iᵀ]`` (i ≥ 2) the columns from x to ``h_i``
(zero rows for ``h_2 … h_{i-1}``: none for two members). Then::

    y_i = buf[:, cols_i] T_i                              one GEMM: base output and adapter together
    c_i = dy_i T_iᵀ  [N, K_i]                             its x columns: dy_i W_i;  its h_i columns: dy_i B_i
    g = s·[dy_1 B_1, …]  [N, R]     dx = Σ c_i[x] + g A     dA = gᵀ x     dB_i = ((s·h_i)ᵀ dy_i)ᵀ

Against the stacked rows of :mod:`.stacked_rows` (one GEMM ``x [W; A]ᵀ``, then ``s·h_i B_iᵀ`` written by a GEMM of
its own and added): forward writes no product ``[N, d_i]`` and reads none back, and the outputs SwiGLU keeps for its
backward are GEMM outputs as in the frozen model (a 3B layer: about 170 MB less traffic forward, where run 144 had
gate/up's sums at 2.82 ms a step against the frozen model's 1.12); backward takes ``dy_i B_i`` from the ``dx`` GEMMs
instead of reading every dy once more, and adds the members' ``[N, K]`` products (one more written and read for two
members). So it is used for chains of two (:func:`wide`): for three (q/k/v) those products would cost about what
it saves, and for a chain of one (o, down) ``[dy, g] S`` already gives ``dx`` whole
(:func:`.stacked_rows.dx_from_rows`).

Compiled, buf is one ``torch.cat`` of its parts, so that Inductor writes each part into its columns: written in place
(as eager calls do: x into buf, h read from there, then each ``s·h_i`` into its columns), each column write became
a kernel that read and rewrote all of buf — two such passes a 3B layer on an H100, 1.8 ms of a seq-2048 step
(RESULTS.md run 181). The cat costs one more write of x (the norm's kernel writes x for ``h = x Aᵀ`` and into buf).

Storage: one flat buffer ``[A | T_1 | … | T_n]``, every ``W_i``, ``A_i`` and ``B_i`` a view of it. ``B_i`` is then
column-major, ``T_i``'s rows transposed (strides ``(1, d_i)``): dense, so the optimizer's foreach and fused kernels
take it, provided its state has that layout too (they take lists of tensors of one layout, else every tensor goes
one by one). The state made before (the first step runs eagerly, while the chains are learnt) is row-major, so an
optimizer step pre-hook (PyTorch's public ``register_optimizer_step_pre_hook``) gives the state of each stacked B
its layout before a step (:func:`_match_state_layouts`; also state loaded later). B is made column-major only when
stacked, not before: FSDP2 takes no non-contiguous parameter, and a model it shards is never stacked. Nothing is
stacked wide while a process group is up (:func:`wide`): DDP lays its gradient buckets out as each parameter was
when it was wrapped, and with a B's layout changed since it gave that B wrong gradients (a 1-layer Llama on gloo:
relative error 1.4 at the second step), so distributed steps keep the rows of :mod:`.stacked_rows`.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .compute import add_product, cast
from .tracing import compiling

#: the class attribute (True, on the class itself: not inherited) of the layers whose chains may stack wide: LoRA's
#: Linear (DoRA's Linear stacks as rows only: its Function reads the rows, :mod:`slimtune.methods.dora.stacked`)
STACKS_WIDE = "stacks_wide"
#: chains of this many members are stacked wide (see the module docstring for why not three or one; RESULTS.md run
#: 180: o and down, each a chain of one, stacked wide made a compiled 3B step 0.7-2.2% slower)
WIDE_MEMBERS = 2
#: every width and rank a multiple of this, so that each run of columns and each matrix starts 16-byte aligned
ALIGN = 8

Layout = tuple[int, tuple[int, ...], tuple[int, ...]]  # (d_in, widths d_i, ranks r_i)


#: the B's of every wide stack made, held weakly (a list: a WeakSet would compare tensors with ==): their optimizer
#: state is given their layout before each step
_STACKED_BS: list[weakref.ref] = []
_HOOK: list[Any] = []


def _match_state_layouts(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step pre-hook: each state tensor of a stacked B (the B's shape) laid out as B is, values kept."""
    state = optimizer.state
    _STACKED_BS[:] = [ref for ref in _STACKED_BS if ref() is not None]
    for ref in _STACKED_BS:
        p = ref()
        entries = state.get(p) if p is not None and p in state else None
        for key, value in (entries or {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                entries[key] = _laid_out_as(p, value)


def _laid_out_as(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` (its dtype and device) with ``param``'s strides."""
    return torch.empty_like(param, dtype=value.dtype, device=value.device).copy_(value)


def _x_start(layout: Layout) -> int:
    return layout[2][0]


def _columns(layout: Layout, i: int) -> tuple[int, int]:
    """The run of buf's columns member i reads: ``[start, stop)``."""
    d_in, _, ranks = layout
    return (0, ranks[0] + d_in) if i == 0 else (ranks[0], ranks[0] + d_in + sum(ranks[1:i + 1]))


def _rows(layout: Layout, i: int) -> tuple[int, int]:
    """``(first row of W_iᵀ, first row of B_iᵀ)`` in ``T_i``."""
    d_in, _, ranks = layout
    return (ranks[0], 0) if i == 0 else (0, d_in + sum(ranks[1:i]))


def flat_size(layout: Layout) -> int:
    d_in, widths, ranks = layout
    return sum(ranks) * d_in + sum((stop - start) * width for (start, stop), width
                                   in zip((_columns(layout, i) for i in range(len(widths))), widths))


def views(flat: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(A [R, d_in], [T_1, …, T_n])``, views of the 1-D ``flat``."""
    d_in, widths, ranks = layout
    offset = sum(ranks) * d_in
    down, matrices = flat[:offset].view(sum(ranks), d_in), []
    for i, width in enumerate(widths):
        start, stop = _columns(layout, i)
        matrices.append(flat[offset:offset + (stop - start) * width].view(stop - start, width))
        offset += (stop - start) * width
    return down, matrices


def member_views(flat: torch.Tensor, layout: Layout) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each member's ``(W_i [d_i, d_in], A_i [r_i, d_in], B_i [d_i, r_i])`` as views of ``flat`` (W and B
    column-major)."""
    d_in, _, ranks = layout
    down, matrices = views(flat, layout)
    out, start = [], 0
    for i, (t, rank) in enumerate(zip(matrices, ranks)):
        w_row, b_row = _rows(layout, i)
        out.append((t[w_row:w_row + d_in].t(), down[start:start + rank], t[b_row:b_row + rank].t()))
        start += rank
    return out


def layout_of(chain: Sequence[Any]) -> Layout:
    return (chain[0].in_features, tuple(m.out_features for m in chain), tuple(m.lora_A.shape[0] for m in chain))


def wide(chain: Sequence[Any]) -> bool:
    """Whether a stackable ``chain`` (:func:`.stacked_rows.stackable`) is stacked wide: two members of a class that
    stacks wide (:data:`STACKS_WIDE`), every width and rank a multiple of :data:`ALIGN`, each B a plain 2-D tensor of
    the weights' dtype and device, and no process group up (module docstring: DDP)."""
    if (len(chain) != WIDE_MEMBERS or not all(vars(type(m)).get(STACKS_WIDE) for m in chain)
            or (torch.distributed.is_available() and torch.distributed.is_initialized())):
        return False
    d_in, widths, ranks = layout_of(chain)
    weight = chain[0].base_layer.weight
    return (all(n % ALIGN == 0 for n in (d_in, *widths, *ranks))
            and all(type(m.lora_B.detach()) is torch.Tensor and m.lora_B.dim() == 2
                    and m.lora_B.dtype == weight.dtype and m.lora_B.device == weight.device for m in chain))


def build(chain: Sequence[Any]) -> torch.Tensor:
    """Copy ``chain``'s weights, A's and B's into one flat buffer (module docstring) and make each a view of it;
    returns the buffer. The B's are noted for :func:`_match_state_layouts`; a gradient a B holds already (the
    chains are learnt in a step's first micro-batch) is laid out as B now, so that autograd accumulates into it with
    no copy."""
    layout = layout_of(chain)
    weight = chain[0].base_layer.weight
    with torch.inference_mode(False):  # built in an evaluation's call, the buffer is still one training can save
        flat = torch.zeros(flat_size(layout), dtype=weight.dtype, device=weight.device)
        for m, (w, a, b) in zip(chain, member_views(flat, layout)):
            for view, param in ((w, m.base_layer.weight), (a, m.lora_A), (b, m.lora_B)):
                view.copy_(param.detach())
                param.data = view
            if m.lora_B.grad is not None:  # stacked between micro-batches: what they add next is laid out as B
                m.lora_B.grad = _laid_out_as(m.lora_B, m.lora_B.grad)
    for m in chain:
        if not any(ref() is m.lora_B for ref in _STACKED_BS):
            _STACKED_BS.append(weakref.ref(m.lora_B))
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_match_state_layouts))
    return flat


class WideLowRankFunction(torch.autograd.Function):
    """``(y_1, …, y_n)`` of the module docstring from one x. Arguments: x ``[..., d_in]``, the scaling, a callback run
    at the end of backward (or None), the layout ``(d_in, widths, ranks)``, the n A's, the n B's, then the flat
    buffer. The A's and B's are views of it, passed so that their gradients reach them; forward reads the buffer."""

    @staticmethod
    def forward(ctx, x, scaling: float, on_backward: Callable[[], None] | None, layout: Layout, *tensors):
        d_in, widths, ranks = layout
        flat = tensors[-1]
        down, matrices = views(flat, layout)
        lead, x2 = x.shape[:-1], x.reshape(-1, d_in)
        first = _x_start(layout)
        if compiling():  # buf as one cat: each part written into its columns, nothing else of buf rewritten
            h = x2 @ down.t()  # [N, R]
            buf = torch.cat([h[:, :first] * scaling, x2, h[:, first:] * scaling], dim=1)
        else:  # x written into buf once and h read from there, each s·h_i then written into its own columns
            buf = x2.new_empty(x2.shape[0], sum(ranks) + d_in)
            buf[:, first:first + d_in] = x2
            h = buf[:, first:first + d_in] @ down.t()
            buf[:, :first] = h[:, :first] * scaling
            buf[:, first + d_in:] = h[:, first:] * scaling
        outputs = []
        for i, (t, width) in enumerate(zip(matrices, widths)):
            start, stop = _columns(layout, i)
            outputs.append((buf[:, start:stop] @ t).view(*lead, width))
        ctx.set_materialize_grads(False)
        ctx.scaling, ctx.on_backward, ctx.layout, ctx.x_shape = scaling, on_backward, layout, x.shape
        ctx.save_for_backward(buf, flat)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        buf, flat = ctx.saved_tensors
        layout, scaling, needs = ctx.layout, ctx.scaling, ctx.needs_input_grad
        d_in, widths, ranks = layout
        count, first = len(widths), _x_start(layout)
        if all(g is None for g in grads):
            return (None,) * (5 + 2 * count)
        down, matrices = views(flat, layout)
        dtype, tokens = buf.dtype, buf.shape[0]
        x = buf[:, first:first + d_in]
        dx_parts, g_parts, grad_b = [], [], []
        for i, (dy, t, width, rank) in enumerate(zip(grads, matrices, widths, ranks)):
            start, _ = _columns(layout, i)
            w_row, b_row = _rows(layout, i)
            if dy is None:  # an unused output: its member gets no gradients, as alone
                g_parts.append(buf.new_zeros(tokens, rank))
                grad_b.append(None)
                continue
            dy = cast(dy.reshape(tokens, width), dtype)
            c = dy @ t.t()  # [N, K_i]: dy_i W_i and dy_i B_i
            dx_parts.append(c[:, w_row:w_row + d_in])
            g_parts.append(c[:, b_row:b_row + rank] * scaling)
            h_cols = start + b_row  # s·h_i's columns in buf
            grad_b.append((buf[:, h_cols:h_cols + rank].t() @ dy).t() if needs[4 + count + i] else None)
        g = torch.cat(g_parts, dim=1)  # s·[dy_1 B_1, …], [N, R]
        need_a = [need and dy is not None for need, dy in zip(needs[4:4 + count], grads)]
        grad_a: list[torch.Tensor | None] = [None] * count
        if any(need_a):
            grad_a = [p if need else None for p, need in zip((g.t() @ x).split_with_sizes(ranks), need_a)]
        # Σ c_i[x] + g A: compiled, one pointwise sum that Inductor fuses into dx's reader; eagerly in place
        dx = add_product(sum(dx_parts[1:], dx_parts[0]), g, down) if needs[0] else None
        if ctx.on_backward is not None:
            ctx.on_backward()
        return (dx.view(ctx.x_shape) if dx is not None else None, None, None, None, *grad_a, *grad_b, None)


def wide_lowrank_linear(x: torch.Tensor, chain: Sequence[Any], flat: torch.Tensor,
                        on_backward: Callable[[], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Every member's ``x W_iᵀ + s·(x A_iᵀ) B_iᵀ`` ``[..., d_i]`` through :class:`WideLowRankFunction`, for a chain
    stacked wide on ``flat`` (x already in its dtype; the members share one scaling)."""
    return WideLowRankFunction.apply(x, chain[0].scaling, on_backward, layout_of(chain),
                                     *[m.lora_A for m in chain], *[m.lora_B for m in chain], flat)
