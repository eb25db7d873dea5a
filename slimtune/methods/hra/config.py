"""HRA's config (PEFT's ``HRAConfig`` fields), and the builder and finalizer the registry calls."""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import torch
from torch import nn

from ...core.config import AdapterConfig, check_bool, check_number, resolve_adapter_dtype
from ...core.frozen import is_quantized_layer
from ...core.targeting import is_hf_conv1d
from ...errors import TargetError
from .factors import attach_factor_cache
from .module import HraLayer


@dataclasses.dataclass
class HraConfig(AdapterConfig):
    """HRA settings (PEFT's ``HRAConfig``: r, apply_GS, init_weights).

    ``orth_reg_weight``: weight of the orthogonality regulariser; add :func:`orthogonality_loss` of the
    model to the training loss. ``alpha`` and ``alpha_pattern`` are unused by HRA.
    """

    apply_GS: bool = False
    init_weights: bool = True
    orth_reg_weight: float = 0.0
    adapter_dtype: torch.dtype | None = None

    method: ClassVar[str] = "hra"
    peft_type: ClassVar[str] = "HRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.orth_reg_weight = check_number("orth_reg_weight", self.orth_reg_weight, 0.0)
        check_bool("apply_GS", self.apply_GS)
        check_bool("init_weights", self.init_weights)
        self.adapter_dtype = resolve_adapter_dtype(self.adapter_dtype)


def build_hra(config: HraConfig, name: str, base: nn.Module) -> HraLayer:
    """The HRA adapter for ``base`` (nn.Linear, also 4-bit, or an nn.Conv2d with groups 1)."""
    r = config.rank_for(name)
    config.check_rank(f"rank for {name}", r)
    linear = isinstance(base, nn.Linear) or is_quantized_layer(base)
    if is_hf_conv1d(base) or not (linear or isinstance(base, nn.Conv2d)):
        raise TargetError(f"HRA adapts nn.Linear (also 4-bit) and nn.Conv2d; {name!r} is a {type(base).__name__}")
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise TargetError(f"HRA cannot adapt {name!r}: a Conv2d with groups={base.groups} (needs groups=1)")
    return HraLayer(base, r, apply_GS=config.apply_GS, init_weights=config.init_weights,
                    orth_reg_weight=config.orth_reg_weight, adapter_dtype=config.adapter_dtype)


def finalize_hra(config: HraConfig, model: nn.Module, adapters: list) -> Callable[[], None]:
    """All HRA layers of the model compute their WY factors together, once per forward pass; returns the remover of
    the model's hook."""
    return attach_factor_cache(model, adapters)
