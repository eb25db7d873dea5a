"""What a rank costs: the exact trainable-parameter count of each layer's adapter at each candidate rank.

Counts come from the method's own builder (the registry), run on a stand-in of the layer on PyTorch's meta device
(same geometry, nothing allocated), so every method is counted as it is built:

* LoRA ``r·(d_in + d_out)``; LoCon ``r·c_in·∏kernel + c_out·r/groups``; DoRA adds the magnitude ``d_out``;
* LoHa ``2r·(d_in + d_out)`` (two Hadamard-multiplied pairs; its update can reach rank r²);
* LoKr: a Kronecker product ``w1 ⊗ (w2_a w2_b)`` whose second factor is low-rank only while r is below its size;
  past that the count stops growing, and the ranks past the first plateau are dropped as candidates;
* HRA ``r·d_in`` (r reflections); ranks its builder refuses (more reflections than dimensions) are dropped.

Candidate ranks: ``min_rank``, then the multiples of ``granule`` above it up to ``max_rank`` (default: the layer's
full rank ``min(d_out, d_in)``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.frozen import weight_dtype
from ..core.registry import build_adapter
from ..core.targeting import is_hf_conv1d
from ..errors import ConfigError, SlimtuneError
from .layers import LayerView

#: Methods whose rank is the rank of the update (any rank-r matrix is reachable): the spectrum of a layer's
#: sensitivity says directly what each further rank gains. The others are allocated by the scalar sensitivity.
SPECTRAL_METHODS = ("lora", "dora")


@dataclasses.dataclass
class LayerCosts:
    """The candidate ranks of one layer (ascending) and the adapter's parameter count at each."""

    name: str
    ranks: list[int]
    params: list[int]
    bytes_per_param: int

    def params_at(self, rank: int) -> int:
        return self.params[self.ranks.index(rank)]


def _stand_in(base: nn.Module, view: LayerView) -> nn.Module:
    """A module of the same kind and geometry as ``base`` on the meta device (4-bit layers: a dense Linear, whose
    adapters have the same parameters)."""
    with torch.device("meta"):
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            return type(base)(base.in_channels, base.out_channels, base.kernel_size, stride=base.stride,
                              padding=base.padding, dilation=base.dilation, groups=base.groups,
                              bias=base.bias is not None, padding_mode=base.padding_mode)
        if is_hf_conv1d(base):
            return type(base)(view.d_out, view.d_in)
        return nn.Linear(view.d_in, view.d_out, bias=getattr(base, "bias", None) is not None)


def _count(config: AdapterConfig, name: str, stand_in: nn.Module, rank: int) -> int | None:
    """Trainable parameters of the adapter at ``rank``; None where the method refuses that rank."""
    trial = dataclasses.replace(config, r=rank, rank_pattern={}, alpha_pattern={})
    try:
        adapter = build_adapter(trial, name, stand_in)
    except ConfigError:
        return None
    return sum(p.numel() for key, p in adapter.named_parameters() if not key.startswith("base_layer."))


def candidate_ranks(view: LayerView, min_rank: int, max_rank: int | None, granule: int) -> list[int]:
    """``min_rank`` and the multiples of ``granule`` above it, up to ``max_rank`` or the layer's full rank."""
    top = min(view.d_out, view.d_in) if max_rank is None else min(max_rank, min(view.d_out, view.d_in))
    first = (min_rank // granule + 1) * granule
    return [min_rank] + list(range(first, top + 1, granule))


def layer_costs(config: AdapterConfig, layers: list[LayerView], min_rank: int, max_rank: int | None,
                granule: int) -> list[LayerCosts]:
    """The cost table of every layer. Layers of one geometry are counted once; where the count is affine in the
    rank (checked at the first three candidates and the last) the rest is extrapolated exactly."""
    tables: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}
    out = []
    for view in layers:
        ranks = candidate_ranks(view, min_rank, max_rank, granule)
        base = view.base
        key = (type(base).__name__, view.weight_shape, tuple(ranks), getattr(base, "groups", 1),
               getattr(base, "bias", None) is not None)
        if key not in tables:
            tables[key] = _table(config, view, ranks)
        kept, params = tables[key]
        if not kept:
            raise ConfigError(f"{config.method_name()} cannot be built on {view.name} at rank {min_rank} (its "
                              f"smallest candidate rank); lower min_rank or leave the layer out")
        dtype = getattr(config, "adapter_dtype", None) or weight_dtype(base)
        out.append(LayerCosts(view.name, list(kept), list(params), torch.empty((), dtype=dtype).element_size()))
    return out


def _table(config: AdapterConfig, view: LayerView, ranks: list[int]) -> tuple[list[int], list[int]]:
    stand_in = _stand_in(view.base, view)
    try:
        probe = {r: _count(config, view.name, stand_in, r) for r in {*ranks[:3], ranks[-1]}}
    except SlimtuneError as exc:
        raise ConfigError(f"cannot count {config.method_name()} parameters on {view.name}: {exc}") from None
    affine = None not in probe.values() and len(ranks) >= 3
    if affine:
        slope = (probe[ranks[1]] - probe[ranks[0]]) / (ranks[1] - ranks[0])
        line = [round(probe[ranks[0]] + slope * (r - ranks[0])) for r in ranks]
        affine = slope > 0 and all(line[ranks.index(r)] == n for r, n in probe.items())
    counts = line if affine else [_count(config, view.name, stand_in, r) for r in ranks]
    kept, params = [], []
    for rank, count in zip(ranks, counts):
        if count is None or (params and count <= params[-1]):  # refused, or no more parameters: a plateau
            break
        kept.append(rank)
        params.append(count)
    return kept, params


def adapter_params(config: AdapterConfig, view: LayerView, rank: int) -> int:
    """Trainable parameters of ``config``'s adapter on ``view`` at ``rank`` (any rank the method accepts)."""
    count = _count(config, view.name, _stand_in(view.base, view), rank)
    if count is None:
        raise ConfigError(f"{config.method_name()} cannot be built on {view.name} at rank {rank}")
    return count
