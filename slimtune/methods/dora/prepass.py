"""DoRA's step vectors: every DoRA layer's norm formed in one Triton launch when the model's forward starts, instead
of the norm's GEMMs and a kernel launch per layer.

A DoRA layer's vectors ``(g − 1, g, 1/‖V‖, 1/m')`` ``[4, d_out]`` (d_out: output features or channels) depend on
its parameters only (W, A, B, m), not on the input. On a host-bound step (a 3B model at a few thousand tokens) each
layer's norm costs the host two GEMM launches and a Triton launch. Here a forward pre-hook on the adapted model
(:func:`attach_prepass`) forms the vectors of all eligible layers in one launch per group (one device and set of
dtypes: :mod:`.triton_prepass`), and each layer then only scales its product, ``y = g ⊙ z (+ b)`` — one PyTorch op
(:func:`~.compose.scale`) where the per-layer path launches its vectors-and-compose kernel.

**Tickets.** Each eligible layer gets a :class:`Ticket`: the vectors, the parameter objects they were formed from
and those tensors' in-place versions, the scaling, the compute dtype the vectors assume (the base weight's) and the
magnitude floor. A layer uses the vectors only while the ticket still describes the call (:meth:`Ticket.holds`,
:meth:`Ticket.vectors_for`): the same parameter objects, unchanged (an optimizer step, a ``load``, a merge bumps a
version; ``param.data = other`` moves its storage), the same scaling, that compute dtype and the floor its route
needs. Otherwise — and for every layer that is not eligible — the layer forms its norm itself, as before. (A write
into ``param.data`` in place, which autograd does not see either, is not seen.) A ticket outlives the forward, so a
gradient-checkpointing recomputation in backward sees the very vectors the first forward used.

**Eligible** (checked on the host every forward, no sync): a Linear or a convolution (groups 1) with a dense,
unquantised base weight and contiguous parameters (not transformers' ``Conv1D``); plain tensors (no tensor
subclass: a sharded ``DTensor`` is not addressable); the Triton path on (:func:`~slimtune.core.triton.use_triton`:
CUDA or the interpreter, fp32 / fp16 / bf16, not while ``torch.compile`` traces, not in a region compiled by
:func:`~slimtune.models.layers.compile_layers`, whose forward would not use them); rank at most :data:`MAX_RANK`; the
layer enabled and unmerged; no CUDA-graph capture in progress (``capture_step`` replays the whole step: the host
cost is gone there anyway).

**The tables** (addresses, sizes, strides, offsets; :mod:`.triton_prepass`) are rebuilt on the host every forward
and uploaded only when they differ from the last upload: the uploaded copy is reused only when it holds exactly
the addresses this forward read.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...core.autograd_state import tensor_version
from ...core.frozen import base_weight_operand, is_quantized
from ...core.tracing import compiling, in_compiled_region
from ...core.triton import HAS_TRITON, use_triton

#: the largest rank the kernel takes (its ``[BLOCK_M, r]`` tile of B stays in registers)
MAX_RANK = 128
_SETTING = {"enabled": True}


def set_dora_prepass(enabled: bool) -> None:
    """Whether DoRA layers take their norms from one launch per forward (default: yes). Off, every layer forms its
    norm itself; the two agree within fp32 rounding (the sums run in another order)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_dora_prepass takes True or False, got {enabled!r}")
    _SETTING["enabled"] = enabled


class Ticket:
    """A layer's step vectors ``[4, d_out]`` fp32 and what they were formed from (module docstring)."""

    __slots__ = ("vectors", "tensors", "versions", "addresses", "scaling", "eps", "dtype", "inference")

    def __init__(self, vectors: torch.Tensor, tensors: tuple[torch.Tensor, ...], addresses: tuple[int, ...],
                 scaling: float, eps: float, dtype: torch.dtype) -> None:
        self.vectors, self.tensors, self.addresses = vectors, tensors, addresses
        self.scaling, self.eps, self.dtype = scaling, eps, dtype
        self.versions = tuple([tensor_version(t) for t in tensors])
        self.inference = vectors.is_inference()  # formed under torch.inference_mode: no use outside it

    def vectors_for(self, dtype: torch.dtype, eps: float) -> torch.Tensor | None:
        """The vectors for a call computing in ``dtype`` with magnitude floor ``eps``, or None (also for vectors
        formed under ``torch.inference_mode`` and a call outside it, where autograd cannot save them)."""
        if self.inference and not torch.is_inference_mode_enabled():
            return None
        return self.vectors if dtype == self.dtype and eps == self.eps else None

    def holds(self, weight: object, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, scaling: float) -> bool:
        """Whether a call's operands — the base weight (operand), A, B, m — are the very tensors these vectors were
        formed from, unchanged since (their in-place versions, and their storage: ``param.data = other`` swaps it
        without a version bump), and its scaling the same."""
        w, ta, tb, tm = self.tensors
        return (weight is w and a is ta and b is tb and m is tm and scaling == self.scaling
                and None not in self.versions
                and self.versions == (tensor_version(w), tensor_version(a), tensor_version(b), tensor_version(m))
                and self.addresses == (w.data_ptr(), a.data_ptr(), b.data_ptr(), m.data_ptr()))


def step_vectors(layer: nn.Module, weight: object, dtype: torch.dtype, eps: float) -> torch.Tensor | None:
    """``layer``'s step vectors for a call on ``weight`` (its base weight operand) computing in ``dtype`` with
    magnitude floor ``eps`` (:meth:`Ticket.vectors_for`), or None (the layer forms them itself) — always None while
    ``torch.compile`` traces (the graph forms the norm itself; a ticket from an eager forward is not an input the
    graph could take)."""
    slot = layer.prepass_slot
    ticket = slot.ticket if slot is not None and not compiling() else None
    if ticket is None or not ticket.holds(weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling):
        return None
    return ticket.vectors_for(dtype, eps)


def _plain(*tensors: torch.Tensor) -> bool:
    return all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


class _Entry:
    """What the tables need of one layer, as last read: its parameters (the objects), the group key (None: not
    eligible), the table row (addresses, sizes, strides), its scaling and floor. Reused while the layer holds the
    same objects at the same addresses and shapes (:meth:`VectorPrepass._entry`)."""

    __slots__ = ("objects", "placement", "shapes", "key", "row", "scalars", "wsq", "dtype", "bias", "w_version")


def _read_entry(layer: nn.Module, objects: tuple) -> _Entry:
    """The entry of ``layer`` (parameters ``objects`` = W, A, B, m, contiguous: a Linear's as they are, a
    convolution's as ``[c_out, c_in·k…]`` / ``[r, c_in·k…]`` / ``[c_out, r]`` / ``[c_out]``). Not eligible (module
    docstring): ``key`` None — kept with the objects' ``placement`` (W's device and dtype, A's dtype), so that the
    next forward pays one check of them (a stale "not eligible" only costs the per-layer path, never a result)."""
    weight, a, b, m = objects
    entry = _Entry()
    entry.objects, entry.key, entry.placement = objects, None, (weight.device, weight.dtype, a.dtype)
    if (getattr(layer, "fan_in_fan_out", False) or is_quantized(base_weight_operand(layer.base_layer))
            or not _plain(weight, a, b, m) or not use_triton(weight) or a.shape[0] > MAX_RANK or a.dtype != b.dtype
            or not (weight.is_contiguous() and a.is_contiguous() and b.is_contiguous() and m.is_contiguous())
            or not (a.device == b.device == m.device == weight.device)):
        return entry
    d_out, rank = weight.shape[0], a.shape[0]
    d_in = weight.numel() // max(d_out, 1)
    if m.numel() != d_out or a.numel() != rank * d_in or b.numel() != d_out * rank:
        return entry
    wsq = layer.cached_weight_row_norm_sq()
    if wsq is None:
        return entry
    dtype = weight.dtype
    entry.objects, entry.shapes, entry.wsq, entry.dtype = objects, (weight.shape, a.shape), wsq, dtype
    entry.bias, entry.w_version = layer.base_layer.bias, tensor_version(weight)
    entry.key = (weight.device, dtype, a.dtype, m.dtype)
    entry.row = (weight.data_ptr(), a.data_ptr(), b.data_ptr(), m.data_ptr(), wsq.data_ptr(), 0, d_out, d_in,
                 rank, d_in, d_in, rank)  # contiguous rows: W and A d_in apart, B r apart
    entry.scalars = (float(layer.scaling), layer.vectors_floor(dtype))
    return entry


class VectorPrepass:
    """The forward pre-hook of :func:`attach_prepass`: tickets for every eligible layer of ``layers``."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = list(layers)
        self._entries: list[_Entry | None] = [None] * len(self.layers)
        self._uploaded: dict[tuple, tuple] = {}  # group key -> (host rows, device tables, aligned)

    def _entry(self, i: int, layer: nn.Module) -> _Entry | None:
        """Layer i's entry: the last one while its parameters are the same objects at the same addresses and
        shapes, W unchanged, with the same scaling and bias (the floor's condition); else read again."""
        if layer.disabled or layer.merged or in_compiled_region(layer):
            return None
        base = layer.base_layer
        objects = (base.weight, layer.lora_A, layer.lora_B, layer.magnitude)
        entry = self._entries[i]
        if entry is not None:
            weight, a, b, m = objects
            old = entry.objects
            if weight is old[0] and a is old[1] and b is old[2] and m is old[3]:
                if entry.key is None:  # not eligible last time: the same objects on the same device and dtypes
                    if (weight.device, weight.dtype, a.dtype) == entry.placement:
                        return None
                elif ((weight.data_ptr(), a.data_ptr(), b.data_ptr(), m.data_ptr()) == entry.row[:4]
                        and (weight.shape, a.shape) == entry.shapes and float(layer.scaling) == entry.scalars[0]
                        and tensor_version(weight) == entry.w_version and base.bias is entry.bias):
                    return entry  # W unchanged: its ‖W‖² (held here) still holds
        entry = self._entries[i] = _read_entry(layer, objects)
        return entry if entry.key is not None else None

    def __call__(self, *_: object) -> None:
        if compiling() or not HAS_TRITON:
            return
        enabled = _SETTING["enabled"]
        groups: dict[tuple, list] = {}
        for i, layer in enumerate(self.layers):
            layer.prepass_slot.ticket = None  # (switched off: the last forward's tickets go too)
            if not enabled:
                continue
            entry = self._entry(i, layer)
            if entry is not None:
                groups.setdefault(entry.key, []).append((layer, entry))
        for key, members in groups.items():
            if not (key[0].type == "cuda" and torch.cuda.is_current_stream_capturing()):
                self._launch(key, members)

    def _launch(self, key: tuple, members: list) -> None:
        """One launch for ``members`` (``(layer, entry)``, one group): their tickets."""
        from . import triton_prepass  # imports triton (optional): only behind use_triton

        rows, scalars, sizes = [], [], []
        offset = 0
        for _, entry in members:
            row = entry.row
            rows.append(row[:5] + (offset,) + row[6:])
            scalars.append(entry.scalars)
            sizes.append(row[6])
            offset += row[6]
        signature = (rows, scalars)
        uploaded = self._uploaded.get(key)
        if uploaded is None or uploaded[0] != signature:
            uploaded = self._uploaded[key] = (signature, triton_prepass.tables(rows, scalars, key[0]),
                                              triton_prepass.aligned(rows, key[1].itemsize, key[2].itemsize))
        out = torch.empty(4, offset, device=key[0], dtype=torch.float32)  # layer i: the columns of its rows
        first = members[0][1]
        triton_prepass.launch_prepass(*uploaded[1], out, (*first.objects, first.wsq), max(row[8] for row in rows),
                                      uploaded[2])
        for (layer, entry), vectors in zip(members, out.split(sizes, dim=1)):
            layer.prepass_slot.ticket = Ticket(vectors, entry.objects, entry.row[:4], *entry.scalars, entry.dtype)


class TicketSlot:
    """Where a layer's :class:`Ticket` lives (a plain attribute of the layer: setting it skips ``nn.Module``'s
    ``__setattr__``, which a per-step write to 200 layers would pay for)."""

    __slots__ = ("ticket",)

    def __init__(self) -> None:
        self.ticket: Ticket | None = None


def attach_prepass(model: nn.Module, layers: Sequence[nn.Module]) -> Callable[[], None] | None:
    """A :class:`VectorPrepass` for the DoRA ``layers`` as ``model``'s forward pre-hook; returns its remover
    (which also drops the layers' tickets), or None when there are no layers."""
    if not layers:
        return None
    for layer in layers:
        layer.prepass_slot = TicketSlot()
    prepass = VectorPrepass(layers)
    return _Detach(model.register_forward_pre_hook(prepass), prepass)


class _Detach:
    """:func:`attach_prepass`'s remover: the hook goes, and the layers' tickets (an object, not a closure: a copy of
    the model gets one for its own hook and layers)."""

    def __init__(self, handle: RemovableHandle, prepass: VectorPrepass) -> None:
        self.handle, self.prepass = handle, prepass

    def __call__(self) -> None:
        self.handle.remove()
        for layer in self.prepass.layers:
            layer.prepass_slot.ticket = None
