"""What LoHa and LoKr layers share: their common config fields, the layers they accept, PEFT's rank dropout, and
the layer skeleton (base geometry, dropout draws, the structured / folded path choice, the forward).

Each method subclasses :class:`StructuredConfig` and :class:`StructuredAdapter` and provides its parameters, its
cost counts and ``run`` (which Function applies the update on the chosen path).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from .caches import BoundedCache
from .compute import compute_setting
from .config import AdapterConfig, check_bool, check_probability, resolve_adapter_dtype
from . import timed
from .costs import PATHS, Cost, choose_path
from .explain import Choice, path_choice, timed_or_counted
from .frozen import WeightOperand, base_weight_operand, is_quantized, weight_dtype, weight_shape
from .module import AdapterModule
from .structured import ConvSpec
from .targeting import is_hf_conv1d
from .tracing import compiling

PATH_CHOICES = ("auto", "structured", "folded")
_DENSE_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # exact types: never a 4-bit layer
Scale = float | torch.Tensor  # s, or s · rank-dropout mask over output rows ([d_out])


# -- config -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class StructuredConfig(AdapterConfig):
    """The fields LoHa and LoKr share (PEFT's names): ``rank_dropout``, ``module_dropout``,
    ``use_effective_conv2d``; and slimtune's ``path`` (``"auto"`` picks structured or folded per layer and call
    by FLOP, byte and launch counts; ``"structured"`` / ``"folded"`` force one — structured falls back to folded
    where it cannot run) and ``adapter_dtype`` (as :class:`~slimtune.LoraConfig`: ``None`` is the base weight's
    dtype)."""

    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    path: str = "auto"
    adapter_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rank_dropout = check_probability("rank_dropout", self.rank_dropout)
        self.module_dropout = check_probability("module_dropout", self.module_dropout)
        check_bool("use_effective_conv2d", self.use_effective_conv2d)
        if self.path not in PATH_CHOICES:
            raise ConfigError(f"path must be one of {PATH_CHOICES}, got {self.path!r}")
        self.adapter_dtype = resolve_adapter_dtype(self.adapter_dtype)

    def layer_kwargs(self, name: str) -> dict[str, Any]:
        """The keyword arguments every structured layer takes, for the layer at qualified name ``name`` (rank and
        alpha patterns applied, the rank checked)."""
        r = self.rank_for(name)
        self.check_rank(f"rank for {name}", r)
        return dict(r=r, alpha=self.alpha_for(name), rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
                    use_effective_conv2d=self.use_effective_conv2d, path=self.path, adapter_dtype=self.adapter_dtype)


def check_structured_target(method: str, name: str, base: nn.Module) -> None:
    """LoHa/LoKr adapt nn.Linear (also 4-bit: slimtune's NF4Linear, bitsandbytes' Linear4bit), nn.Conv1d and
    nn.Conv2d (PEFT's set) with zero padding; a :class:`~slimtune.TargetError` names anything else."""
    if is_quantized(base_weight_operand(base)):
        return
    if is_hf_conv1d(base) or not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise TargetError(f"{method} adapts nn.Linear, nn.Conv1d and nn.Conv2d; {name!r} is a {type(base).__name__}")
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        if base.padding_mode != "zeros":
            raise TargetError(f"{method} cannot adapt {name!r}: padding_mode={base.padding_mode!r} (needs 'zeros')")
        try:
            ConvSpec.of(base)
        except ValueError as exc:
            raise TargetError(f"{method} cannot adapt {name!r}: {exc}") from None


def rank_dropout_mask(d_out: int, p: float, normalize: bool, device: torch.device, dtype: torch.dtype,
                      scale: float = 1.0) -> torch.Tensor:
    """PEFT's "rank" dropout: keep each output row of ΔW with probability ``1 − p`` (drawn like PEFT, from the
    CPU generator), optionally divided by the kept fraction, times ``scale``. ``[d_out]`` in ``dtype``."""
    keep = (torch.rand(d_out) > p).float()
    if normalize:
        keep /= keep.mean().clamp_min(1.0 / d_out)  # all dropped: zeros rather than PEFT's NaN
    if scale != 1.0:
        keep *= scale
    if torch.device(device).type == "cuda" and not compiling():  # no stall: pinned copy behind the queued work
        return keep.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return keep.to(device=device, dtype=dtype)


def module_dropout_mask(keep: torch.Tensor, mask: torch.Tensor | None, d_out: int, device: torch.device,
                        dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Module dropout as ``torch.compile`` traces it (a graph cannot branch on a random draw): the rank-dropout
    ``mask`` (or ``scale`` in every row) times ``keep`` (``rand > p``, one bool), so a dropped layer adds a zero
    update — the base's output, as eager's skip gives, but its adapter gets zero gradients rather than None.
    ``[d_out]`` in ``dtype``."""
    rows = mask if mask is not None else torch.full((d_out,), scale, device=device, dtype=dtype)
    return rows * keep.to(device=device, dtype=dtype)


# -- module -----------------------------------------------------------------------------------------
class StructuredAdapter(AdapterModule):
    """What LoHa and LoKr layers share: base geometry, dropout draws, path choice, the forward skeleton.

    The base weight reaches the Functions as :func:`~slimtune.core.frozen.base_weight_operand` (a dense tensor,
    or a 4-bit handle dequantised right before each use); shapes come from
    :func:`~slimtune.core.frozen.weight_shape`. Convolutions are dense only.
    """

    #: every path's Function (structured, folded, LoKr's Kronecker Linear, LoHa's fused Linear) keeps an offered
    #: input's recipe itself (:func:`~slimtune.core.rebuild.keep_input`): no saved-tensor hooks around the call (a
    #: call that module dropout skips runs the base layer alone, and a base convolution then keeps its input itself)
    keeps_recipes_itself = True

    def _setup(self, r: int, alpha: float, rank_dropout: float, module_dropout: float, path: str) -> None:
        base = self.base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout, self.path = float(rank_dropout), float(module_dropout), path
        self.conv = ConvSpec.of(base) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else None
        self.weight_shape = tuple(weight_shape(base))
        self.kernel: tuple[int, ...] = self.weight_shape[2:]
        self.out_features = self.weight_shape[0]
        # input features (a Linear) / input channels (a convolution: c_in/groups per group, times the groups)
        self.in_features = self.weight_shape[1] * (1 if self.conv is None else self.conv.groups)
        self._last_path: list[str | None] = [None]  # a list: set per forward without nn.Module.__setattr__
        self._choices: BoundedCache[str] = BoundedCache(64)  # "auto" path per (input shape, dtype, backward)

    @property
    def last_path(self) -> str | None:
        """The path the latest forward took (``"structured"`` / ``"folded"``; diagnostics and tests)."""
        return self._last_path[0]

    def _adapter_kwargs(self, adapter_dtype: torch.dtype | None) -> dict[str, Any]:
        """Device and dtype of new adapter parameters (a 4-bit base: its compute dtype, never uint8)."""
        return dict(device=self.base_layer.weight.device, dtype=adapter_dtype or weight_dtype(self.base_layer))

    # provided by each method
    structured_ok: bool = True
    normalize_rank_dropout: bool = True
    mask_has_scaling: bool = False  # whether the rank-dropout mask handed to run() includes s = alpha / r

    _names: tuple[str, ...] = ()  # the parameters' PEFT names, in the ops' order (set by each method)

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self._names}

    def _params(self) -> tuple[nn.Parameter, ...]:
        """The parameters in the ops' order (:attr:`_names`)."""
        return tuple(map(self._parameters.__getitem__, self._names))

    def costs(self, x: torch.Tensor, backward: bool) -> dict[str, Cost]:
        raise NotImplementedError

    def run(self, x: torch.Tensor, path: str, mask: torch.Tensor | None, params: tuple[nn.Parameter, ...]
            ) -> torch.Tensor:
        """The adapted layer's output on the given path; ``mask``: rank dropout over output rows, or None;
        ``params``: :meth:`_params`."""
        raise NotImplementedError

    def base_operand(self, base: nn.Module | None = None) -> WeightOperand:
        """The base weight for the Functions: ``base.weight`` (dense), or a 4-bit layer's handle (``base``: the
        base layer, when the caller has it at hand)."""
        base = self.base_layer if base is None else base
        return base.weight if type(base) in _DENSE_BASES else base_weight_operand(base)

    def _check_input(self, x: torch.Tensor) -> None:
        """A clear error for an input the base layer cannot take (naming the layer and the expected shape)."""
        name = type(self).__name__
        if self.conv is None:
            if x.dim() == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"{name} expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        else:
            spatial = len(self.kernel)
            batched = x.dim() == spatial + 2
            if not (batched or x.dim() == spatial + 1) or x.shape[1 if batched else 0] != self.in_features:
                raise ValueError(f"{name} over a Conv{spatial}d expects inputs [batch, {self.in_features}, <{spatial} "
                                 f"spatial sizes>] (or without the batch), got {tuple(x.shape)}")

    def explain(self, x: torch.Tensor) -> list[Choice]:
        """The training path (structured or folded) for an input like x, with both paths' counts."""
        chosen, note = self.choose(x, True), ""
        if self.structured_ok and self.path not in ("folded", "structured"):  # a chosen path: a timed one shown
            chosen, note = timed_or_counted(*self._path_decision(x, True), chosen)
        return [path_choice(self.costs(x, True), chosen, note)]

    def choose(self, x: torch.Tensor, backward: bool) -> str:
        if not self.structured_ok or self.path == "folded":
            return "folded"
        if self.path == "structured":
            return "structured"
        if compiling():  # decided once, at trace time (shapes are static there): no cache for a guard to watch
            return choose_path(self.costs(x, backward))
        counted = self._choices.get((x.shape, x.dtype, backward), lambda: choose_path(self.costs(x, backward)))
        if not timed.timing():  # the common case: no timing key built
            return counted
        return timed.choose(*self._path_decision(x, backward), x.device, counted,
                            lambda: self._path_runs(x, backward))

    def _path_decision(self, x: torch.Tensor, backward: bool) -> tuple[str, timed.Key]:
        """The timed criterion's decision name and key for this layer's path at x's shape and dtype."""
        return f"{type(self).__name__}-path", (*x.shape, *self.weight_shape, self.r, str(x.dtype), backward)

    def _path_runs(self, x: torch.Tensor, backward: bool) -> dict[str, Any]:
        """For the timed criterion (:mod:`slimtune.core.timed`): each path's forward (and backward) on random
        operands of x's shape and copies of the parameters (the layer's own are not touched)."""
        gen = torch.Generator(device=x.device).manual_seed(0)
        xr = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        params = tuple(p.detach().clone().requires_grad_(backward) for p in self._params())
        dtype, context = compute_setting(x)

        def run(path: str) -> None:
            with torch.enable_grad(), context:
                y = self.run(xr.to(dtype), path, None, params)
                if backward:
                    y.backward(torch.ones_like(y))
            for param in params:
                param.grad = None

        return {path: (lambda path=path: run(path)) for path in PATHS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        self._check_input(x)
        if self.conv is not None and x.dim() == len(self.kernel) + 1:  # unbatched, as nn.Conv accepts it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        dtype, context = compute_setting(x)
        mask = None
        if self.training:
            # PEFT: the adapter runs when rand > module_dropout; rank dropout masks ΔW's output rows.
            traced = self.module_dropout > 0 and compiling()
            if self.module_dropout > 0 and not traced and torch.rand(1).item() <= self.module_dropout:
                return self.base_layer(x)
            mask_scale = self.scaling if self.mask_has_scaling else 1.0
            keep = torch.rand(1) > self.module_dropout if traced else None  # drawn where eager draws it
            if self.rank_dropout > 0:
                mask = rank_dropout_mask(self.out_features, self.rank_dropout, self.normalize_rank_dropout, x.device,
                                         dtype, mask_scale)
            if keep is not None:
                mask = module_dropout_mask(keep, mask, self.out_features, x.device, dtype, mask_scale)
        if x.dtype != dtype:
            x = x.to(dtype)
        params = self._params()
        backward = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        path = self._last_path[0] = self.choose(x, backward)
        with context:
            return self.run(x, path, mask, params)
