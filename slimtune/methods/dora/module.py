"""DoRA (Liu et al., weight-decomposed LoRA): ``LoraConfig(use_dora=True)``, PEFT-compatible.

Each output row (output channel, for convolutions) of the LoRA-updated weight is rescaled to a learned
magnitude: ``W' = g ⊙ (W + s·B A)``, ``g = m / ‖W + s·B A‖_row``, the norm treated as a constant in backward
(DoRA's paper, §4.3; PEFT). The bias is added unscaled. m is PEFT's ``lora_magnitude_vector``: ``[d_out]`` on a
Linear / transformers ``Conv1D``, ``[1, c_out, 1(, 1)]`` on a Conv1d / Conv2d; it starts at the row norms of W,
so a fresh DoRA layer computes what its base does.

The norm comes from :func:`~.norm.factored_row_norm_sq` once per forward — O(d_out·d_in·r) work,
``[d_out, r]`` / ``[r, r]`` intermediates, never the dense ``B A`` — with ``‖W‖²_row`` cached (W is frozen; the
cache is keyed on the stored weight's storage and version and dropped on merge, unmerge and load). The Linear
training path is :func:`~.function.dora_linear` (it computes the norm itself, after the base GEMM — unless the
model's forward formed every layer's vectors ahead in one launch, :mod:`.prepass`); convolutions run LoCon's two
convolutions and :func:`~.compose.dora_scale` along the channel axis. In layers that
:func:`~slimtune.models.layers.compile_layers` compiles, each chain of Linear layers that read one input (q/k/v,
gate/up; o and down alone) is stacked and runs :mod:`.stacked` in the graph: one GEMM for the base outputs and
``x Aᵀ``, one for every member's norm. Grouped convolutions are refused (the update is not a dense
``[c_out, c_in·k]`` matrix).

A 4-bit base (:mod:`slimtune.quant`) reaches the Linear path as a handle (:func:`base_weight_operand`) and is
dequantised right before each use — the base GEMM and ``W Aᵀ`` in forward, ``dx`` (and a recomputed z) in
backward, ``‖W‖²`` once for the cache — never kept or saved. Merging onto it is refused: dequantise first.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.autograd_state import inside_backward, saved_tensor_hooks_active
from ...core.caches import TensorStamp
from ...core.compute import cast_optional, compute_setting
from ...core.explain import Choice, Variant
from ...core.frozen import WeightOperand, base_weight_operand, is_quantized, materialize, weight_dtype
from ...core.removers import Removers
from ...core.siblings import install as install_siblings
from ...core.stacked_rows import runs_stacked, stacked_rows
from ...core.tracing import compiling, in_compiled_region
from ...errors import ConfigError, SlimtuneError
from ..lora.config import LoraConfig
from ..lora.conv import LoraConv
from ..lora.linear import LoraLinear
from .compose import dora_scale
from .function import backward_route, dora_linear
from .group import grouped_dora_linear, groupable
from .norm import factored_row_norm_sq, floor_for, in_magnitude_precision, saves_output, weight_row_norm_sq
from .prepass import TicketSlot, attach_prepass, step_vectors
from .probe import OutputProbe, attach_output_probe
from .stacked import runs_on_rows, stacked_dora_linear


class DoraMixin:
    """The magnitude vector, the norm (and its cache), DoRA's merge and the PEFT key, for Linear and conv."""

    magnitude: nn.Parameter
    use_dora = True
    #: LoraConfig.dora_recompute for this layer: True keeps no [tokens, d_out] tensor (z is recomputed in
    #: backward), False keeps the output (or z); None: not decided yet ("auto", see OutputProbe)
    recompute: bool | None = False
    output_probe: OutputProbe | None = None
    #: holds the step vectors formed when the model's forward started (:mod:`.prepass`)
    prepass_slot: TicketSlot | None = None

    # -- 2-D views: weight rows are output units -------------------------------------------------------------
    def weight2d(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the base's layout -> ``[d_out, d_in]`` (a view)."""
        if getattr(self, "fan_in_fan_out", False):
            return weight.t()
        return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)

    def _from2d(self, weight2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return weight2d.t() if getattr(self, "fan_in_fan_out", False) else weight2d.reshape(like.shape)

    def factors2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ``[r, d_in]``, B ``[d_out, r]``) as matrices (conv kernels flattened)."""
        return self.lora_A.reshape(self.lora_A.shape[0], -1), self.lora_B.reshape(self.lora_B.shape[0], -1)

    def weight_operand(self) -> WeightOperand:
        """The base weight as ``[d_out, d_in]``: a dense view (no copy) or a quantised handle."""
        operand = base_weight_operand(self.base_layer)
        return self.weight2d(operand) if isinstance(operand, torch.Tensor) else operand

    def dense_weight2d(self) -> torch.Tensor:
        """W ``[d_out, d_in]`` in the base's compute dtype; for a 4-bit base a fresh copy: drop it after use."""
        return materialize(self.weight_operand(), weight_dtype(self.base_layer)).detach()

    def _setup_dora(self, shape: tuple[int, ...]) -> None:
        self._weight_sq_cache: tuple[TensorStamp, torch.Tensor] | None = None
        self._merged_norm: torch.Tensor | None = None
        norm = self.weight_norm(self.dense_weight2d())
        self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype).reshape(shape))

    # -- the norm ------------------------------------------------------------------------------------------
    def cached_weight_row_norm_sq(self) -> torch.Tensor | None:
        """``‖W‖²_row`` ``[d_out]`` fp32, recomputed only when the stored weight (the packed buffer, for a 4-bit
        base: dequantised once, upcast a few rows at a time) is another tensor or changed in place
        (:class:`~slimtune.core.caches.TensorStamp`). None under ``torch.compile`` (a stamp cannot be traced): the
        norm's consumers then form it from the W they already hold, inside the graph."""
        if compiling():
            return None
        w = self.base_layer.weight
        cache = self._weight_sq_cache
        if cache is None or not cache[0].matches(w):
            cache = self._weight_sq_cache = (TensorStamp(w), weight_row_norm_sq(self.dense_weight2d()))
        return cache[1]

    def vectors_floor(self, dtype: torch.dtype) -> float:
        """The magnitude floor the step vectors (:mod:`.prepass`) assume for a call computing in ``dtype`` (0 here:
        a convolution's tail keeps z)."""
        return 0.0

    def invalidate_norm_cache(self) -> None:
        self._weight_sq_cache = None

    @torch.no_grad()
    def weight_norm(self, weight2d: torch.Tensor) -> torch.Tensor:
        """``‖W + s·B A‖_row`` ``[d_out]`` fp32 (no grad), factored; ``weight2d``: W in the compute dtype."""
        a, b = self.factors2d()
        norm = factored_row_norm_sq(weight2d, a, b, self.scaling, self.cached_weight_row_norm_sq()).sqrt_()
        return in_magnitude_precision(norm, self.lora_A.dtype)  # the magnitude takes the adapters' dtype

    # -- merge: W' = g·(W + s·B A); the norm of the unmerged weight is kept for unmerge -------------------------
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        v = self.weight2d(weight) + self.weight2d(self.delta_weight().to(weight.dtype))  # dense: merging only
        self._merged_norm = in_magnitude_precision(v.norm(dim=1), self.magnitude.dtype)
        g = self.magnitude.detach().reshape(-1).to(weight.dtype) / self._merged_norm
        return self._from2d(g[:, None] * v, weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        g = self.magnitude.detach().reshape(-1).to(weight.dtype) / self._merged_norm.to(weight.dtype)
        w2 = self.weight2d(weight) / g[:, None] - self.weight2d(self.delta_weight().to(weight.dtype))
        return self._from2d(w2, weight)

    def merge(self) -> None:
        if is_quantized(base_weight_operand(self.base_layer)):
            raise SlimtuneError(
                f"{type(self).__name__} sits on a 4-bit base layer, which cannot hold a merged DoRA update: call "
                "slimtune.dequantize(model) first (dense base layers), then merge")
        super().merge()
        self.invalidate_norm_cache()

    def unmerge(self) -> None:
        super().unmerge()
        self._merged_norm = None
        self.invalidate_norm_cache()

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().load_peft_tensors(name, tensors)
        self.invalidate_norm_cache()

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().peft_parameters(), "lora_magnitude_vector": self.magnitude}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoraLinear(DoraMixin, LoraLinear):
    """DoRA over a frozen ``nn.Linear`` (or transformers ``Conv1D``)."""

    #: under ``torch.compile`` a learnt chain (q/k/v, gate/up) runs as one Function, and a compiled layer's chains
    #: (and o, down alone) on stacked rows (:mod:`.stacked`: LoRA's stacked GEMMs and one for every member's norm)
    fuses_when_compiled = True
    stacks_rows = True
    runs_on_rows = staticmethod(runs_on_rows)  #: :func:`.stacked.runs_on_rows` (also an output standing in for z)

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora, init, adapter_dtype)
        self._setup_dora((self.out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._shortcut(x)
        if y is not None:
            return y
        xc, bias, p, context = self._inputs(x)
        rows = stacked_rows(self, 1) if compiling() else None  # o, down: stacked alone by compile_layers
        if runs_stacked(xc, rows, (self,)):
            with context:
                y = stacked_dora_linear(xc, (self,), rows)[0]
            if self.siblings is not None:
                self.siblings.note(self, x, y)
            return y
        recompute = self.recompute
        watch = False
        if recompute is None:
            recompute, watch = self._undecided(xc, bias, p)
        weight = self.weight_operand()
        vec = step_vectors(self, weight, xc.dtype, self.vectors_floor(xc.dtype))
        with context:
            y = dora_linear(xc, weight, bias, self.lora_A, self.lora_B, self.magnitude, self.scaling, p,
                            self.cached_weight_row_norm_sq() if vec is None else None, recompute, vec)
        if watch:
            self.output_probe.watch(self, y)
        if self.siblings is not None:
            self.siblings.note(self, x, y)
        return y

    # -- siblings (core.siblings): DoRA layers that read the same x as one Function (.group) -------------------
    @staticmethod
    def run_together(chain: Sequence[DoraLinear], x: torch.Tensor,
                     on_backward: Callable[[], None] | None) -> tuple[torch.Tensor, ...] | None:
        """Every member's output on x through :func:`~.group.grouped_dora_linear`, or None (the members run alone):
        a member's ``"auto"`` route is not decided yet (the first step's probe), or a route is not one the group
        takes (:data:`~.group.GROUPED_ROUTES`: a bias or fp16 keeps z) — unless nothing needs a gradient at all.
        While traced, a chain stacked by ``compile_layers`` runs :func:`~.stacked.stacked_dora_linear` instead."""
        xc, _, _, context = chain[0]._inputs(x)
        rows = stacked_rows(chain[0], len(chain)) if compiling() else None
        if runs_stacked(xc, rows, chain):
            with context:
                return stacked_dora_linear(xc, chain, rows, on_backward)
        if any(m.recompute is None for m in chain):
            return None
        weights = [m.weight_operand() for m in chain]
        biases = [cast_optional(m.base_layer.bias, xc.dtype) for m in chain]
        routes = [backward_route(xc, w, b, m.lora_A, m.lora_B, m.magnitude, 0.0, bool(m.recompute))
                  for m, w, b in zip(chain, weights, biases)]
        if not groupable(routes):
            return None
        floors = [m.vectors_floor(xc.dtype) for m in chain]
        ahead = [step_vectors(m, w, xc.dtype, f) for m, w, f in zip(chain, weights, floors)]
        with context:
            return grouped_dora_linear(
                xc, weights, biases, [m.lora_A for m in chain], [m.lora_B for m in chain], [m.magnitude for m in chain],
                [m.cached_weight_row_norm_sq() if v is None else None for m, v in zip(chain, ahead)],
                chain[0].scaling, routes, floors, on_backward, ahead)

    def explain(self, x: torch.Tensor) -> list[Choice]:
        """LoRA's backward order, and what the layer keeps for ``dm``: its output (bytes: ``[N, d_out]``, free where
        the next op saves it too), z, or nothing — z rebuilt in backward (FLOPs: the base GEMM and the low-rank product
        again), by :func:`~.function.backward_route`'s rule; compiled (a marked region), the partitioner decides."""
        tokens, d_in, d_out = x.numel() // x.shape[-1], self.in_features, self.out_features
        kept = tokens * d_out * x.element_size()
        rebuild = 2 * tokens * d_out * d_in + 2 * tokens * self.r * (d_in + d_out)
        options = (Variant("output", 0, kept), Variant("z", 0, kept), Variant("recompute", rebuild, 0))
        if in_compiled_region(self):
            chosen = "compiled: the graph's partitioner decides what is kept"
        elif self.dropout_p > 0 or not saves_output(self.base_layer.bias, x.dtype):
            chosen = "recompute" if self.recompute else "z"
        elif self.recompute is None:
            chosen = "auto (output if shared, else recompute: measured on the first step)"
        else:
            chosen = "recompute" if self.recompute else "output"
        return [*super().explain(x), Choice("kept for dm", options, chosen, "kept")]

    def vectors_floor(self, dtype: torch.dtype) -> float:
        """:func:`~.norm.floor_for` this layer's bias and ``dtype``."""
        return floor_for(self.base_layer.bias, dtype)

    def _undecided(self, x: torch.Tensor, bias: torch.Tensor | None, p: float) -> tuple[bool, bool]:
        """``(recompute now, watch the output)`` for a layer whose ``dora_recompute="auto"`` is not decided yet.

        Only a training forward of a layer that would keep its output is measured (with dropout, a bias or fp16
        the layer keeps z, the rule of :func:`~.norm.saves_output`); it recomputes this once. Under
        saved-tensor hooks (gradient checkpointing, offloading) or inside a backward pass (reentrant
        checkpointing's recomputation) the output is kept without deciding: those hooks own what is saved; so it
        is under ``torch.compile``, whose partitioner decides what the graph saves."""
        if (p > 0 or not torch.is_grad_enabled() or not self.magnitude.requires_grad
                or not saves_output(bias, x.dtype) or self.output_probe is None or compiling()):
            return False, False
        if saved_tensor_hooks_active() or inside_backward():
            return False, False
        return True, True


class DoraConv(DoraMixin, LoraConv):
    """DoRA over a frozen ``nn.Conv1d`` / ``nn.Conv2d`` (groups 1): LoCon's factors, norm per output channel."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        if getattr(base_layer, "groups", 1) != 1:
            raise ConfigError(f"DoRA on a grouped convolution (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer, r, alpha, dropout, rslora, init, adapter_dtype)
        self._setup_dora((1, self.out_channels, *(1,) * (base_layer.weight.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        base = self.base_layer
        dtype, context = compute_setting(x)
        p = self.dropout_p if self.training else 0.0
        vec = step_vectors(self, base.weight, dtype, self.vectors_floor(dtype))
        with context:
            x, weight = x.to(dtype), base.weight.to(dtype)
            bias = base.bias.to(dtype) if base.bias is not None else None
            xd = F.dropout(x, p, training=True) if p > 0 else x
            geometry = (base.stride, base.padding, base.dilation)
            h = self._conv(xd, self.lora_A.to(dtype), None, *geometry)
            z = base._conv_forward(xd, weight, None) + self._conv(h, (self.lora_B * self.scaling).to(dtype))
            if vec is None:
                out = dora_scale(z, self.magnitude, self.weight_norm(self.weight2d(weight)), bias, dim=1)
            else:  # the step's vectors, formed ahead (.prepass)
                out = dora_scale(z, self.magnitude, None, bias, dim=1, vectors=vec)
            if p > 0:  # PEFT's x Wᵀ + (g−1)·drop(x) Wᵀ: the rest of the base term on the dropped part
                out = out + base._conv_forward(x - xd, weight, None)
            return out


def build_dora(config: LoraConfig, name: str, base: nn.Module) -> DoraMixin:
    """The DoRA adapter (``LoraConfig(use_dora=True)``) for ``base``: DoraConv on a Conv1d / Conv2d, else DoraLinear;
    its ``recompute`` from ``dora_recompute`` (None under ``"auto"``: decided by :func:`finalize_dora`'s probe)."""
    layer = (DoraConv if isinstance(base, (nn.Conv1d, nn.Conv2d)) else DoraLinear)(base, **config.layer_kwargs(name))
    layer.recompute = config.recompute_for(name)
    return layer


def finalize_dora(config: LoraConfig, model: nn.Module, adapters: list) -> Callable[[], None]:
    """Sibling groups for the DoRA Linear layers that read one input (:func:`slimtune.core.siblings.install`), their
    step vectors formed in one launch when the model's forward starts (:func:`~.prepass.attach_prepass`) and, under
    ``dora_recompute="auto"``, one :class:`~.probe.OutputProbe` for them, resolved when the model's forward returns;
    returns what takes them away."""
    linears = [a for a in adapters if isinstance(a, DoraLinear)]
    dora = [a for a in adapters if isinstance(a, DoraMixin)]
    removers = [install_siblings(model, adapters, (DoraLinear,)), attach_prepass(model, dora)]
    if config.dora_recompute == "auto":
        removers.append(attach_output_probe(model, linears))

    return Removers(removers)
