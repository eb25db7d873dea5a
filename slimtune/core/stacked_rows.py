"""A LoRA chain's frozen weights and A factors in one tensor ("stacked rows"), so that one GEMM gives every member's
base output and ``x Aᵀ``, and two give ``dx``.

For a chain of LoRA layers that read one input — q/k/v, gate/up (:mod:`.siblings`), or one layer alone (o, down) —
with frozen ``W_i`` ``[d_i, d_in]`` and ``A_i`` ``[r_i, d_in]``, the rows ``S = [W_1; …; W_n; A_1; …; A_n]``
``[Σd + R, d_in]`` are copied into one tensor once, and every ``W_i`` and ``A_i`` becomes a row view of it (the
parameters stay the same objects, with the same names, values and state-dict keys; the optimizer's in-place updates
of A land in S). Then::

    out = x Sᵀ  [N, Σd + R]        y_i = out[:, d_i-slice] + s·h_i B_iᵀ   (h = out[:, Σd:])
    g = s·[dy_1 B_1, …, dy_n B_n]  [N, R]     dx = [dy_1, …, dy_n] W + g A     dA = gᵀ x     dB_i = s·dy_iᵀ h_i

(``W``, ``A``: S's two blocks of rows): one GEMM where there were n + 1 forward, two where there were n + 1 for
``dx`` (one for a chain of one: ``dx = [dy, g] S``, :func:`dx_from_rows`), and no stacking copy of the A's. The
products ``s·h_i B_iᵀ`` (traced) and g are one GEMM each against the B's block diagonal (:func:`block_factor`), where
they were n GEMMs and a copy into g. Why: under ``torch.compile`` a LoRA step was bound by the host's GEMM launches
(RESULTS.md runs 134-135: 47 GEMM calls a 3B layer, 33 of them the adapter's); stacked, a layer runs 11 GEMMs
forward and 26 backward (18 and 29 before; 24 backward since o's and down's ``dx`` is one GEMM). On an H100 the
compiled 3B step took 0.96x the time (run 139, with ``dx`` as one GEMM against ``[dy_1, …, dy_n, g]``, which copied
every dy once more). With gate/up wide and the block-diagonal B's, a tiny Llama layer's compiled CPU code runs 9
GEMMs forward and 21 backward (run 166).

A chain of two (gate/up) is stacked *wide* instead where its widths and ranks align and no process group is up
(:mod:`.wide_rows`: each member's weight and B one matrix, the stack one 1-D tensor, so the outputs need no product
and sum).

Where: :func:`~slimtune.models.layers.compile_layers` stacks each compiled layer's chains once they are learnt
(:class:`LayerStacks`), and before every call of the layer checks that each stack still holds its members' tensors
(:func:`intact`: their storage is the rows' storage) and stacks them again where not — after ``model.to(...)``, which
gives every parameter and buffer a storage of its own, or ``load_state_dict(assign=True)`` of the adapters. That
check reads the members' tensors through their modules only after some module has registered a parameter or a base
layer (counted by torch's global registration hooks, which this module adds on import: :class:`_Registrations`);
otherwise it checks the tensors it read last (:class:`_Held`), a few microseconds a layer instead of 30. A
chain whose frozen weights are no longer the parameters they were at ``compile_layers`` (FSDP wrapped around the
model, or above the module ``compile_layers`` was given; new weights loaded by assignment) is not stacked again. An
eager call of a stacked member (called on its own, or while its layer learns again) checks its stack itself
(:func:`stacked_rows`). Eager steps are not stacked by the library (``benchmarks/paired_steps.py``'s ``stacked:lora``
stacks them to measure it), nor is a model FSDP manages (:func:`sharded`). :func:`unstack` gives every tensor its
own storage back; taking the adapters out (``unload``, ``detach``) does it first, so that a plain model never shares
storage between its weights. A stacked member's state dict holds a copy of its A (:func:`_a_of_its_own`), so that
saving the adapters' entries writes the adapters only. A chain is stacked only where every member is a plain
:class:`~slimtune.methods.lora.linear.LoraLinear` over a dense, frozen ``nn.Linear`` without bias, and its weights
and A's share one dtype and device (:func:`stackable`); a weight set to train after stacking leaves the stack.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .compute import add_as_views, add_product, cast, mm_scaled, mm_scaled_as, scaled_product
from .rebuild import keep_input, kept_input
from .tracing import compiling
from .wide_rows import build as build_wide, wide, wide_lowrank_linear

#: the class attribute (True, on the class itself: not inherited) of the layers whose chains stack: LoRA's Linear, and
#: DoRA's (its compiled chains run :mod:`slimtune.methods.dora.stacked` on the rows)
STACKS = "stacks_rows"
#: in a stack's first member's ``__dict__``: the rows S (a plain attribute, not a buffer: DDP broadcasts every buffer
#: before each forward, and a captured step's snapshot clones them). ``model.to()`` leaves S where it was; the next
#: call of the layer stacks again and so frees it (or :func:`unstack`)
ROWS = "_stacked_rows"
#: in a stack's first member's ``__dict__``: its members (held weakly), in order
MEMBERS = "_stacked_members"
#: in every stacked member's ``__dict__``: its stack's first member (held weakly)
HEAD = "_stacked_head"
#: in a member's ``__dict__`` once :func:`_a_of_its_own` is among its state-dict hooks
HOOKED = "_stacked_state_hook"


class StackedLowRankFunction(torch.autograd.Function):
    """``(y_1, …, y_n)`` of the module docstring from one x. Arguments: x ``[..., d_in]``, the scaling, a callback run
    at the end of backward (or None), the member widths ``d_i`` (a tuple), the n A's, the n B's, then the rows S.
    The A's are views of S: they are passed so that their gradients reach them; forward reads S."""

    @staticmethod
    def forward(ctx, x, scaling: float, on_backward: Callable[[], None] | None, widths: tuple[int, ...], *tensors):
        count = len(widths)
        ups, rows = tensors[count:2 * count], tensors[-1]
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        out = F.linear(x2, rows)  # [N, Σd + R]: every base output, then h = x Aᵀ
        ranks, traced = tuple(up.shape[1] for up in ups), compiling()
        h = out[:, sum(widths):]
        if traced:  # kept for dB: its own [N, R] buffer (a saved view would keep all of out alive)
            h = h.contiguous()
        bases = out[:, :sum(widths)].split_with_sizes(widths, dim=1)
        factors = [(h_i, cast(up, x.dtype).t()) for h_i, up in zip(h.split_with_sizes(ranks, dim=1), ups)]
        # out of place: each output its own tensor, not a view of out. Traced, every product first, then every sum:
        # Inductor then fuses gate's sum into the SwiGLU kernel beside up's, where a sum formed before up's product
        # was a kernel of its own (RESULTS.md run 142: 1.07 ms of a 3B step; seen in the CPU output code)
        if traced:  # a chain's products from one GEMM against its B's block diagonal (one launch where n were)
            products = (scaled_product(h, block_factor(ups, x.dtype).t(), scaling).split_with_sizes(widths, dim=1)
                        if count > 1 else [scaled_product(h_i, up_t, scaling) for h_i, up_t in factors])
            ys = [add_as_views(base, p) for base, p in zip(bases, products)]
        else:
            ys = [torch.addmm(base, h_i, up_t, alpha=scaling) for base, (h_i, up_t) in zip(bases, factors)]
        outputs = [y.view(*lead, width) for y, width in zip(ys, widths)]
        ctx.set_materialize_grads(False)
        ctx.scaling, ctx.on_backward, ctx.widths, ctx.kept_h = scaling, on_backward, widths, traced
        # eagerly h is formed again in backward (x Aᵀ is not saved); compiled, the step's partitioner keeps it anyway
        ctx.save_for_backward(*keep_input(ctx, x), rows, *ups, *((h,) if ctx.kept_h else ()))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x, saved = kept_input(ctx, ctx.saved_tensors)
        widths, scaling = ctx.widths, ctx.scaling
        count = len(widths)
        rows, ups = saved[0], saved[1:1 + count]
        dtype, x2 = x.dtype, x.reshape(-1, x.shape[-1])
        needs = ctx.needs_input_grad  # x, scaling, on_backward, widths, A's, B's, rows
        h = saved[1 + count] if ctx.kept_h else x2 @ rows[sum(widths):].t()
        used = [g is not None for g in grads]  # an unused output: its member gets no gradients, as alone
        if not any(used):
            return (None,) * (5 + 2 * count)
        dys = [cast(g.reshape(x2.shape[0], width), dtype) if g is not None else x2.new_zeros(x2.shape[0], width)
               for g, width in zip(grads, widths)]
        dx, grad_a, grad_b = rows_backward(dys, used, x2, h, rows, ups, scaling, needs[0],
                                           needs[4:4 + count], needs[4 + count:4 + 2 * count])
        if ctx.on_backward is not None:
            ctx.on_backward()
        return (dx.view(x.shape) if dx is not None else None, None, None, None, *grad_a, *grad_b, None)


def rows_backward(dys: Sequence[torch.Tensor], used: Sequence[bool], x2: torch.Tensor, h: torch.Tensor,
                  rows: torch.Tensor, ups: Sequence[torch.Tensor], scaling: float, need_x: bool,
                  need_a: Sequence[bool], need_b: Sequence[bool], scales: Sequence[torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """``(dx [N, d_in], dA's, dB's)`` of a stacked chain's product ``z_i = x W_iᵀ + s·h_i B_iᵀ`` (module docstring),
    from each member's ``dz_i`` ``[N, d_i]`` in x's dtype (zeros where its output was unused: it then gets no dA,
    dB), x2 ``[N, d_in]``, ``h = x Aᵀ`` ``[N, R]`` and the rows; None where not needed. With ``scales`` (DoRA's
    stacked chains, :mod:`slimtune.methods.dora.stacked`: fp32 ``g_i`` ``[d_i]``), the dys are the outputs'
    gradients and ``dz_i = g_i ⊙ dy_i`` (:func:`_scaled_one` for a chain of one)."""
    if scales is not None and len(dys) == 1:
        return _scaled_one(dys[0], scales[0], x2, h, rows, ups[0], scaling, need_x, need_a[0] and used[0],
                           need_b[0] and used[0])
    if scales is not None:
        dys = [_scaled(dy, scale, x2.dtype) for dy, scale in zip(dys, scales)]
    count, dtype = len(dys), x2.dtype
    widths, ranks = [dy.shape[1] for dy in dys], [up.shape[1] for up in ups]
    # [N, Σd], and every later use reads its slices: under compile the kernels that form the dy's write them there
    # (a dy used on its own too would be written twice, RESULTS.md run 139)
    dcat = torch.cat(list(dys), dim=1) if count > 1 else dys[0]
    dys = dcat.split_with_sizes(widths, dim=1) if count > 1 else dys
    # s·[dy_1 B_1, …, dy_n B_n] [N, R]: one GEMM against the B's block diagonal (an unused output's dy is zeros)
    g = mm_scaled(dcat, block_factor(ups, dtype) if count > 1 else cast(ups[0], dtype), scaling)
    grad_b = [cast(mm_scaled_as(dy.t(), h_i, scaling, up), up.dtype) if need and use else None
              for dy, h_i, up, need, use in zip(dys, h.split_with_sizes(ranks, dim=1), ups, need_b, used)]
    need_a = [n and u for n, u in zip(need_a, used)]
    grad_a: list[torch.Tensor | None] = [None] * count
    if any(need_a):
        grad_a = [cast(p, dtype) if need else None for p, need in zip((g.t() @ x2).split_with_sizes(ranks), need_a)]
    return (dx_from_rows(dcat, g, rows, count) if need_x else None), grad_a, grad_b


def _scaled_one(dy: torch.Tensor, scale: torch.Tensor, x2: torch.Tensor, h: torch.Tensor, rows: torch.Tensor,
                up: torch.Tensor, scaling: float, need_x: bool, need_a: bool, need_b: bool
                ) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """:func:`rows_backward` of a chain of one whose ``dz = scale ⊙ dy`` (``scale`` fp32 ``[d]``): g and dB from dy
    itself, ``g = s·dy (scale ⊙ B)`` ``[N, r]``, ``dB = scale ⊙ s·dyᵀ h``, so that dz is read only by ``dx = [dz, g] S``
    (:func:`dx_from_rows`). Compiled, the kernel that forms dz can then write it once, into ``[dz, g]``, where dz read
    by the GEMMs too was written to a buffer of its own and then copied there: for o and down, two kernels of 3.3 ms
    a 3B DoRA step at seq 2048 on an H100 (RESULTS.md runs 157 and 167)."""
    dtype, acc = x2.dtype, scale.dtype
    g = mm_scaled(dy, cast(up.to(acc) * scale[:, None], dtype), scaling)
    grad_b = cast(mm_scaled_as(dy.t(), h, scaling, up).to(acc) * scale[:, None], up.dtype) if need_b else None
    grad_a = cast(g.t() @ x2, dtype) if need_a else None
    return (dx_from_rows(_scaled(dy, scale, dtype), g, rows, 1) if need_x else None), [grad_a], [grad_b]


def _scaled(dy: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dz = scale ⊙ dy`` ``[N, d]`` in ``dtype``, formed in scale's precision (``scale`` ``[d]``)."""
    return cast(dy.to(scale.dtype) * scale, dtype)


def block_factor(ups: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The chain's B's as one block-diagonal ``[Σd, R]`` matrix in ``dtype``: ``h`` times its transpose gives every
    member's ``h_i B_iᵀ`` side by side, and ``[dy_1, …, dy_n]`` times it gives ``[dy_1 B_1, …, dy_n B_n]``, each one
    GEMM where there were n (the zero blocks add exact zeros)."""
    return torch.block_diag(*[cast(up, dtype) for up in ups])


def dx_from_rows(dcat: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """``dx = [dy_1, …, dy_n] W + g A`` ``[N, d_in]`` (``dcat`` ``[N, Σd]``, ``g`` ``[N, R]``, ``rows`` ``[W; A]``).
    For a chain of one (o, down), one GEMM against all the rows, ``[dy, g] S``: copying ``[N, d + R]`` moves fewer
    bytes than writing the product ``g A`` ``[N, d_in]`` and reading it back to add (down's ``d_in`` is the MLP's
    width), and it is one GEMM fewer. A longer chain's ``[dy_1, …, dy_n]`` is as wide as all its outputs (gate/up:
    twice the MLP's width), so there the two GEMMs' products are added."""
    if count == 1:
        return torch.cat([dcat, g], dim=1) @ rows
    d = dcat.shape[1]
    return add_product(dcat @ rows[:d], g, rows[d:])


def stacked_lowrank_linear(x: torch.Tensor, chain: Sequence[Any], rows: torch.Tensor,
                           on_backward: Callable[[], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Every member's ``x W_iᵀ + s·(x A_iᵀ) B_iᵀ`` ``[..., d_i]`` through :class:`StackedLowRankFunction`, for a chain
    stacked on ``rows`` (x already in the rows' dtype; the members share one scaling); a chain stacked wide (1-D
    ``rows``: :mod:`.wide_rows`) through its Function."""
    if rows.dim() == 1:
        return wide_lowrank_linear(x, chain, rows, on_backward)
    widths = tuple(m.out_features for m in chain)
    return StackedLowRankFunction.apply(x, chain[0].scaling, on_backward, widths, *[m.lora_A for m in chain],
                                        *[m.lora_B for m in chain], rows)


class _Refs:
    """Modules held weakly (a stack's members, or a member's first member). A copy of the model (deepcopy, pickling)
    gets an empty one: its parameters are copied one by one, so its stacks are gone. ``held``: a stack's
    :class:`_Held`, or None."""

    __slots__ = ("_refs", "count", "held")

    def __init__(self, modules: Iterable[nn.Module] = ()) -> None:
        self._refs = tuple(weakref.ref(m) for m in modules)
        self.count = len(self._refs)
        self.held: _Held | None = None

    def modules(self) -> list[Any] | None:
        """The modules, or None where there are none or one is gone."""
        modules = [ref() for ref in self._refs]
        return modules if modules and all(m is not None for m in modules) else None

    def __deepcopy__(self, memo: dict) -> "_Refs":
        return _Refs()

    def __reduce__(self) -> tuple:
        return _Refs, ()


def stacked_rows(first: nn.Module, count: int) -> torch.Tensor | None:
    """The rows of the stack whose first member is ``first``, where it stacks exactly ``count`` members and is intact;
    else None (the members then run on their own tensors). Traced, the stack is taken as intact: the compiled layer's
    wrapper checks it before each call (:class:`LayerStacks`); eagerly (a member called on its own, or a layer
    learning again) it is checked here, since a moved model's rows are a stale copy."""
    refs = first.__dict__.get(MEMBERS)
    if refs is None or refs.count != count:  # an int: what a compiled graph's trace reads
        return None
    if not compiling() and not intact(first):
        return None
    return first.__dict__.get(ROWS)


def runs_stacked(x: torch.Tensor, rows: torch.Tensor | None, chain: Sequence[Any]) -> bool:
    """Whether a call on x (in the compute dtype) runs ``chain`` on its stack: the rows are there
    (:func:`stacked_rows`) in x's dtype, and the members' class runs on them for x (its ``runs_on_rows``)."""
    return rows is not None and rows.dtype == x.dtype and type(chain[0]).runs_on_rows(chain, x)


def _tensors(member: Any, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A member's frozen weight and A, and its B where ``rows`` is a wide stack's: what its stack holds."""
    if rows.dim() == 1:
        return member.base_layer.weight, member.lora_A, member.lora_B
    return member.base_layer.weight, member.lora_A


def stackable(chain: Sequence[Any]) -> bool:
    """Whether ``chain`` can be stacked: LoRA (or DoRA) Linear layers of one class (a class with :data:`STACKS` set on
    itself: a subclass may compute otherwise) over dense, frozen ``nn.Linear`` weights without bias, one scaling,
    their weights and A's plain tensors (no subclass) of one floating dtype and device."""
    if not chain or len({type(m) for m in chain}) != 1 or any(
            not vars(type(m)).get(STACKS) or type(m.base_layer) is not nn.Linear or m.fan_in_fan_out
            or m.base_layer.bias is not None or m.merged for m in chain):
        return False
    if len({m.scaling for m in chain}) != 1 or len({m.in_features for m in chain}) != 1:
        return False
    if any(m.base_layer.weight.requires_grad for m in chain):  # the Function gives the rows no gradient
        return False
    tensors = [t for m in chain for t in (m.base_layer.weight, m.lora_A)]
    return all(type(t.detach()) is torch.Tensor  # no tensor subclass (a sharded DTensor, a 4-bit weight)
               and t.dtype == tensors[0].dtype and t.device == tensors[0].device and t.dtype.is_floating_point
               for t in tensors)


def _members(first: nn.Module) -> list[Any] | None:
    refs = first.__dict__.get(MEMBERS)
    return refs.modules() if refs is not None else None


class _Registrations:
    """How many parameters, and submodules named ``base_layer``, any module has registered (assigned) since this
    module was imported, counted by torch's global registration hooks (public API; counting is all they do): while
    the count stands still, no stack member's weight, A, B or base layer has been given another object, so its
    stack checks the tensors it noted (:class:`_Held`). Other submodules are not counted: transformers' Llama slices
    its ``nn.ModuleList`` of layers each forward, which registers every layer in a new list."""

    count = 0

    @classmethod
    def parameter(cls, *_: Any) -> None:  # hook(module, name, param) -> None: registered unchanged
        cls.count += 1

    @classmethod
    def submodule(cls, _module: nn.Module, name: str, _submodule: nn.Module) -> None:
        if name == "base_layer":
            cls.count += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_Registrations.parameter)
torch.nn.modules.module.register_module_module_registration_hook(_Registrations.submodule)


class _Held:
    """The tensors a stack's members hold (their frozen weights; every weight, A, and B where wide), noted when
    :func:`intact` last read them through the modules, at a registration count: while the count stands still the
    modules hold these very objects, and :func:`intact` checks them without reading the modules (each module
    attribute read is about a microsecond of Python, 2-3 a member, before every call of a compiled layer)."""

    __slots__ = ("count", "weights", "tensors")

    def __init__(self, weights: tuple[torch.Tensor, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        self.count, self.weights, self.tensors = _Registrations.count, weights, tensors


def intact(first: nn.Module) -> bool:
    """Whether the stack on ``first`` still holds every member's weight and A (and B, stacked wide): their storage
    is the rows'; and the weights are still frozen (one set to train since must leave the stack to get its
    gradient)."""
    refs, rows = first.__dict__.get(MEMBERS), first.__dict__.get(ROWS)
    if refs is None or rows is None:
        return False
    members = refs.modules()
    if members is None:
        return False
    storage, held = rows.untyped_storage(), refs.held
    if held is None or held.count != _Registrations.count:  # read through the modules, and noted
        weights = tuple(m.base_layer.weight for m in members)
        held = refs.held = _Held(weights, tuple(t for m in members for t in _tensors(m, rows)))
    return (not any(w.requires_grad for w in held.weights)
            and all(t.untyped_storage() is storage for t in held.tensors))


def _unstack_head(first: nn.Module) -> None:
    """Give every member of the stack on ``first`` its own storage (values kept), and forget the stack."""
    refs = first.__dict__.pop(MEMBERS, None)
    rows = first.__dict__.pop(ROWS, None)
    for member in (refs.modules() or []) if refs is not None else []:
        member.__dict__.pop(HEAD, None)
        if rows is not None:
            for t in _tensors(member, rows):
                if t.untyped_storage() is rows.untyped_storage():
                    # the weight and A row-major again; B keeps its layout (its optimizer state has it: wide_rows)
                    layout = torch.preserve_format if t is member.lora_B else torch.contiguous_format
                    with torch.inference_mode(False):
                        t.data = t.detach().clone(memory_format=layout)


def unstack_member(member: nn.Module) -> None:
    """Undo the stack ``member`` is in, if any (every member of it gets its own storage back)."""
    head = member.__dict__.get(HEAD)
    firsts = head.modules() if head is not None else None
    if firsts is not None:
        _unstack_head(firsts[0])
    member.__dict__.pop(HEAD, None)


def stack(chain: Sequence[Any]) -> bool:
    """Stack ``chain`` (module docstring): copy its ``[W_1; …; W_n; A_1; …; A_n]`` into one tensor and make each a row
    view of it. A chain already stacked as such and intact is left as it is; a member in another stack leaves that
    stack first. Returns whether ``chain`` is stacked (False, with nothing changed, where not :func:`stackable`)."""
    first = chain[0]
    if _members(first) == list(chain) and intact(first):
        return True
    if not stackable(chain):
        return False
    for member in chain:
        unstack_member(member)
    if wide(chain):
        rows = build_wide(chain)
    else:
        tensors = [m.base_layer.weight for m in chain] + [m.lora_A for m in chain]
        with torch.inference_mode(False):  # built in an evaluation's call, S is still a tensor training can save
            rows = torch.cat([t.detach() for t in tensors])
            start = 0
            for t in tensors:
                t.data = rows[start:start + t.shape[0]]
                start += t.shape[0]
    first.__dict__[ROWS] = rows
    first.__dict__[MEMBERS] = _Refs(chain)
    for member in chain:
        member.__dict__[HEAD] = _Refs((first,))
        if not member.__dict__.get(HOOKED):
            member.register_state_dict_post_hook(_a_of_its_own)
            member.__dict__[HOOKED] = True
    return True


def _a_of_its_own(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A state-dict post-hook of a stacked member: its A and B as row-major copies of their own, not views whose
    storage is the whole stack (``torch.save`` of the adapters' entries would write every frozen weight too), and its
    frozen weight row-major where the stack holds it transposed (stacked wide: ``save_pretrained`` and safetensors
    take row-major tensors only). Parameters themselves (``keep_vars=True``) are left as they are."""
    for key in (prefix + "lora_A", prefix + "lora_B", prefix + "base_layer.weight"):
        tensor = state_dict.get(key)
        if not isinstance(tensor, torch.Tensor) or isinstance(tensor, nn.Parameter):
            continue
        shared = tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous() or (shared and not key.endswith("weight")):
            state_dict[key] = tensor.clone(memory_format=torch.contiguous_format)


def unstack(model: nn.Module) -> int:
    """Give every stacked weight and A of ``model`` its own storage back (values kept); returns how many stacks."""
    heads = [m for m in model.modules() if MEMBERS in m.__dict__]
    for first in heads:
        _unstack_head(first)
    return len(heads)


def sharded(model: nn.Module) -> bool:
    """Whether FSDP manages a module of ``model`` (FSDP2's ``fully_shard``, or ``FullyShardedDataParallel``): it
    gives each forward its parameters as tensors all-gathered into its own buffers, so a stack would hold copies that
    go stale (the losses after a step differ). Such a model is never stacked."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


class LayerStacks:
    """The stacks of one compiled layer: each learnt chain of its sibling groups, and each member in no chain as a
    chain of one (o, down). Made with the compiled layer (:func:`~slimtune.models.layers.compile_layers`), it notes
    each member's frozen weight then; :meth:`build` stacks the chains once they are learnt, and :meth:`keep`, before
    every call, stacks again a stack no longer intact. A chain is stacked only while each member still holds the weight
    noted (the same parameter: ``.to()`` keeps it), and nothing while FSDP manages a module of ``within`` (the model,
    held weakly: :func:`sharded`): FSDP gives each forward weights all-gathered into buffers of its own and frees
    their storage after, also where it wraps a module above ``within``, which only the changed weights show."""

    def __init__(self, groups: Iterable[Any], within: nn.Module | None = None) -> None:
        self.groups = list(groups)
        self.within = weakref.ref(within) if within is not None else None
        members = [m for group in self.groups for m in group.members]
        self.weights = [(weakref.ref(m), weakref.ref(w)) for m in members
                        if isinstance(w := getattr(getattr(m, "base_layer", None), "weight", None), torch.Tensor)]
        self.heads: list[Any] = []

    def _sharded(self) -> bool:
        model = self.within() if self.within is not None else None
        return model is not None and sharded(model)

    def _noted(self, chain: Sequence[Any]) -> bool:
        """Whether every member of ``chain`` holds the weight it held when this was made."""
        return all(any(member() is m and weight() is m.base_layer.weight for member, weight in self.weights)
                   for m in chain)

    def build(self) -> None:
        """Stack each chain the groups have learnt, and each member in no chain alone (the groups' chains as learnt
        now: called again once they learn again)."""
        chains: list[tuple[Any, ...]] = []
        for group in self.groups:
            learnt = list(group.chains.values())
            chained = [m for chain in learnt for m in chain]
            chains += learnt + [(m,) for m in group.members if not any(m is c for c in chained)]
        self.heads = [] if self._sharded() else [chain[0] for chain in chains if self._noted(chain) and stack(chain)]

    def keep(self) -> None:
        if all(intact(first) for first in self.heads):
            return
        restack = not self._sharded()  # sharded since (its parameters are FSDP's now): unstacked for good
        kept = []
        for first in self.heads:
            members = _members(first)
            if restack and members is not None and self._noted(members) and stack(members):
                kept.append(first)
            else:
                _unstack_head(first)
        self.heads = kept
