"""LoRA (rsLoRA, DoRA) <-> PEFT ``LoraConfig`` fields (DoRA: ``use_dora``, ``lora_magnitude_vector`` tensors)."""
from __future__ import annotations

import math
from typing import Any

from ...core.config import AdapterConfig
from ...core.module import AdapterModule
from ...core.peft_format import PeftFormat, number, refuse_unsupported, require_bools, require_targets, targets_to_peft
from ...errors import CheckpointError
from .config import LoraConfig
from .linear import LoraMixin
from .math import lora_scaling

_LORA_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "astra_config": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "target_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

# PEFT LoRA features slimtune does not implement: loading a checkpoint that uses one would give wrong outputs
# or leave tensors unloaded, so it is refused. (``velora_config`` only changes PEFT's backward: accepted.)
_LORA_UNSUPPORTED = {
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "megatron_config": "Megatron parallel layers",
    "monteclora_config": "MonteCLoRA",
    "target_parameters": "target_parameters (LoRA on bare parameters)",
    "trainable_token_indices": "trainable tokens",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QA-LoRA",
}

# PEFT init_lora_weights values whose adapters are plain LoRA on an unchanged base weight (NoRA: A's columns
# normalised at initialisation only). Others (PiSSA, OLoRA, CorDA, ASTRA, LoftQ, LoRA-GA, MiCA) change the base
# weights or the forward, which slimtune does not redo.
_LORA_INITS_IN = {True: "default", False: "random", "gaussian": "gaussian", "orthogonal": "orthogonal",
                  "eva": "default", "nora": "nora"}
_LORA_INITS_OUT = {"default": True, "gaussian": "gaussian", "random": False, "nora": "nora",
                   "orthogonal": "orthogonal"}


def lora_to_peft(config: AdapterConfig, adapters: list[tuple[str, AdapterModule]]) -> dict[str, Any]:
    """slimtune :class:`LoraConfig` -> PEFT ``LoraConfig`` fields."""
    assert isinstance(config, LoraConfig)
    # PEFT has one fan_in_fan_out flag and sets it from each Linear / Conv1D it adapts in turn, so the file
    # holds the last one's; the tensor layout is the same either way.
    fan_in_fan_out = False
    for _, adapter in adapters:
        if hasattr(adapter, "fan_in_fan_out"):
            fan_in_fan_out = bool(adapter.fan_in_fan_out)
    return {
        "r": config.r,
        "lora_alpha": number(config.alpha),
        "lora_dropout": float(config.dropout),
        "use_rslora": bool(config.rslora),
        "init_lora_weights": _LORA_INITS_OUT[config.init],
        "target_modules": targets_to_peft(config.target_modules),
        "exclude_modules": targets_to_peft(config.exclude_modules),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": {key: number(value) for key, value in config.alpha_pattern.items()},
        "fan_in_fan_out": fan_in_fan_out,
        "use_dora": bool(config.use_dora),
        "bias": "none",
    }


def lora_from_peft(fields: dict[str, Any]) -> LoraConfig:
    """PEFT ``LoraConfig`` fields -> slimtune :class:`LoraConfig` (``CheckpointError`` if not representable)."""
    if fields.get("bias", "none") != "none":
        raise CheckpointError(f"bias={fields['bias']!r}: training base-layer biases is not supported "
                              "(only bias='none')")
    refuse_unsupported(fields, _LORA_UNSUPPORTED)
    init = fields.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in _LORA_INITS_IN:
        raise CheckpointError(
            f"init_lora_weights={init!r} is not supported: it changes the base weights or the forward; "
            f"supported: {', '.join(repr(k) for k in _LORA_INITS_IN)} (convert PiSSA/OLoRA/CorDA adapters to "
            "plain LoRA with PEFT's path_initial_model_for_weight_conversion)")
    require_targets(fields)
    require_bools(fields, "use_rslora", "fan_in_fan_out", "use_dora")
    return LoraConfig(
        target_modules=fields["target_modules"],
        exclude_modules=fields.get("exclude_modules"),
        r=fields["r"],
        alpha=fields["lora_alpha"],
        rank_pattern=fields.get("rank_pattern") or {},
        alpha_pattern=fields.get("alpha_pattern") or {},
        dropout=fields["lora_dropout"],
        rslora=fields["use_rslora"],
        init=_LORA_INITS_IN[init],
        use_dora=fields["use_dora"],
    )


def lora_check_adapter(config: AdapterConfig, name: str, adapter: AdapterModule) -> str | None:
    if not isinstance(adapter, LoraMixin):
        return f"{name} holds a {type(adapter).__name__}, not a LoRA adapter"
    assert isinstance(config, LoraConfig)
    r, alpha = config.rank_for(name), config.alpha_for(name)
    want = lora_scaling(alpha, r, config.rslora)
    if adapter.r != r or not math.isclose(adapter.scaling, want, rel_tol=1e-9, abs_tol=0.0):
        return (f"{name} has r={adapter.r}, alpha={adapter.alpha}, rslora={adapter.rslora} (scaling "
                f"{adapter.scaling:.6g}), but the checkpoint's config gives r={r}, alpha={alpha}, "
                f"rslora={config.rslora} (scaling {want:.6g})")
    dora = getattr(adapter, "use_dora", False)
    if dora != config.use_dora:
        return f"{name} has use_dora={dora}, but the checkpoint's config gives use_dora={config.use_dora}"
    return None


LORA_FORMAT = PeftFormat(LoraConfig, _LORA_FIELDS, lora_to_peft, lora_from_peft, lora_check_adapter)
