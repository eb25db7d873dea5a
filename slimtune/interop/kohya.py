"""kohya / LyCORIS state dicts <-> PEFT adapters (config + tensors), in memory and without loss.

:func:`kohya_to_peft` reads a kohya state dict (``<kohya module>.<suffix>`` tensors) into a :class:`PeftAdapter`:
the slimtune config PEFT's format writes (:func:`slimtune.interop.infer.config_for`), the tensors under PEFT's
suffixes per module path, and a :data:`RECORD_KEY` record of what PEFT's format has no place for — the prefix, the
file's own metadata, and every stored ``alpha`` that the config does not give back bit for bit (missing, zero, in
another dtype than the module's weights, or ignored by LyCORIS). :func:`peft_to_kohya` writes the kohya state dict
back, using the record when there is one, so kohya -> PEFT -> kohya gives the same tensors, bit for bit.

PEFT -> kohya on adapters trained here writes ``alpha`` in the dtype of each module's weights (as kohya trainers
save it). Two cases change tensors: a LoKr layer whose two factors are full matrices has its PEFT scale folded into
``lokr_w1`` (LyCORIS scales such layers by 1), and a rsLoRA layer stores ``alpha·√r`` (kohya knows only
``alpha / r``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

import torch

from ..core.config import AdapterConfig
from ..errors import CheckpointError, SlimtuneError
from .infer import KohyaModule, config_for, kohya_alpha, layout_for
from .layout import ALPHA, DORA_SCALE, LOKR, LORA, MAGNITUDE, check_suffixes, layout_of, magnitude_to_kohya, \
    magnitude_to_peft
from .names import DEFAULT_PREFIX, decode_path, is_text_encoder, kohya_name, module_index, split_prefix

#: The safetensors metadata key of a PEFT file converted from kohya: JSON ``{"prefix", "metadata", "alpha"}``.
RECORD_KEY = "slimtune.kohya"

Tensors = dict[str, dict[str, torch.Tensor]]  # module path -> suffix -> tensor


@dataclasses.dataclass
class PeftAdapter:
    """An adapter in PEFT's terms: ``config`` (slimtune's, which PEFT's fields describe), ``tensors`` per module
    path under PEFT's suffixes (``lora_A.weight``, ``hada_w1_a`` ...), and ``record`` (:data:`RECORD_KEY`)."""

    config: AdapterConfig
    tensors: Tensors
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


def group_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{kohya module name: {suffix: tensor}}`` (keys split at their first ``.``)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, dot, suffix = key.partition(".")
        if not dot:
            raise CheckpointError(f"key {key!r} is not <kohya module>.<tensor> (not a kohya / LyCORIS file?)")
        grouped.setdefault(module, {})[suffix] = tensor
    return grouped


def read_modules(state: dict[str, torch.Tensor], paths: Iterable[str] | None = None,
                 skip_text_encoder: bool = False) -> tuple[list[KohyaModule], str]:
    """The file's denoiser modules and their prefix. ``paths``: the module paths of the model the file is for
    (exact decoding); without them the diffusers vocabulary decodes (:func:`slimtune.interop.names.decode_path`)."""
    index = module_index(paths) if paths is not None else None
    modules: list[KohyaModule] = []
    prefixes: set[str] = set()
    skipped: list[str] = []
    for name, tensors in group_modules(state).items():
        prefix, rest = split_prefix(name)
        if is_text_encoder(prefix):
            skipped.append(name)
            continue
        prefixes.add(prefix)
        layout = layout_of(name, set(tensors))
        check_suffixes(name, layout, set(tensors))
        alpha = tensors.pop(ALPHA, None)
        modules.append(KohyaModule(name, decode_path(rest, index), layout, tensors, alpha))
    if skipped and not skip_text_encoder:
        raise CheckpointError(f"{len(skipped)} text-encoder module(s) ({skipped[0]} ...): slimtune reads the "
                              "denoiser's modules only; pass skip_text_encoder=True (--skip-text-encoder) to drop them")
    if not modules:
        raise CheckpointError("no denoiser module (lora_unet_*, lora_transformer_*, lycoris_*) in the file")
    if len(prefixes) > 1:
        raise CheckpointError(f"the denoiser's modules use several prefixes ({', '.join(sorted(prefixes))})")
    paths_seen: dict[str, str] = {}
    for module in modules:
        if module.path in paths_seen:
            raise CheckpointError(f"{paths_seen[module.path]} and {module.name} both name {module.path}")
        paths_seen[module.path] = module.name
    return modules, prefixes.pop()


def _peft_tensors(module: KohyaModule) -> dict[str, torch.Tensor]:
    out = {module.layout.keys[k]: t for k, t in module.tensors.items()}
    if DORA_SCALE in module.tensors:
        out[MAGNITUDE] = magnitude_to_peft(module.tensors[DORA_SCALE], module.tensors["lora_down.weight"],
                                           module.name)
    return out


def _alpha_entry(alpha: torch.Tensor | None) -> list[Any] | None:
    if alpha is None:
        return None
    return [float(alpha.float().reshape(-1)[0]), str(alpha.dtype).removeprefix("torch."), list(alpha.shape)]


def _alpha_tensor(entry: list[Any]) -> torch.Tensor:
    value, dtype, shape = entry
    return torch.tensor(value, dtype=getattr(torch, dtype)).reshape(shape)


def kohya_to_peft(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  paths: Iterable[str] | None = None, skip_text_encoder: bool = False) -> PeftAdapter:
    """A kohya / LyCORIS state dict as a :class:`PeftAdapter` (see the module docstring)."""
    modules, prefix = read_modules(state, paths, skip_text_encoder)
    try:
        config = config_for(modules)
    except SlimtuneError as exc:
        raise CheckpointError(f"the kohya modules make no valid PEFT config: {exc}") from exc
    tensors = {m.path: _peft_tensors(m) for m in modules}
    adapter = PeftAdapter(config, tensors)
    written = {m.path: module_state(config, m.path, tensors[m.path])[1] for m in modules}
    alphas = {m.path: _alpha_entry(m.alpha) for m in modules
              if m.alpha is None or not (written[m.path].dtype == m.alpha.dtype and torch.equal(written[m.path],
                                                                                             m.alpha))}
    adapter.record = {"prefix": prefix, "metadata": dict(metadata or {}), "alpha": alphas}
    return adapter


def module_state(config: AdapterConfig, path: str, tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One module's kohya tensors (suffix -> tensor, ``alpha`` apart) and the alpha it gets from ``config``."""
    layout = layout_for(config)
    kohya = layout.peft_keys
    out = {kohya[k]: t for k, t in tensors.items() if k != MAGNITUDE}
    if MAGNITUDE in tensors:
        out[DORA_SCALE] = magnitude_to_kohya(tensors[MAGNITUDE], tensors["lora_A.weight"])
    alpha = kohya_alpha(config, path)
    if layout is LOKR and "lokr_w1" in out and "lokr_w2" in out:  # LyCORIS scales full x full by 1
        scale = alpha / config.rank_for(path)
        if scale != 1.0:
            out["lokr_w1"] = (out["lokr_w1"].float() * scale).to(out["lokr_w1"].dtype)
        alpha = 1.0
    dtype = next(out[k] for k in layout.keys if k in out).dtype
    return out, torch.tensor(alpha, dtype=dtype)


def peft_to_kohya(adapter: PeftAdapter, prefix: str | None = None, root: str = ""
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya state dict and safetensors metadata of a :class:`PeftAdapter`. ``prefix`` defaults to the
    record's (the file it came from), else ``lora_unet``; ``root`` (e.g. ``"unet."``) is left out of the names."""
    record = adapter.record or {}
    prefix = prefix or record.get("prefix") or DEFAULT_PREFIX
    alphas = record.get("alpha", {})
    state: dict[str, torch.Tensor] = {}
    for path, tensors in adapter.tensors.items():
        name = kohya_name(path.removeprefix(root), prefix)
        module, alpha = module_state(adapter.config, path, tensors)
        state.update({f"{name}.{suffix}": t.contiguous() for suffix, t in module.items()})
        if path in alphas:
            alpha = None if alphas[path] is None else _alpha_tensor(alphas[path])
        if alpha is not None:
            state[f"{name}.{ALPHA}"] = alpha
    metadata = dict(record["metadata"]) if "metadata" in record else network_metadata(adapter.config)
    return state, metadata


def network_metadata(config: AdapterConfig) -> dict[str, str]:
    """kohya's ``ss_network_*`` metadata for a file written here (what LyCORIS-trained files carry)."""
    layout = layout_for(config)
    algo = {"lora": "locon", "loha": "loha", "lokr": "lokr"}[layout.method]
    args: dict[str, str] = {"algo": algo}
    if layout is LORA and getattr(config, "use_dora", False):
        args["dora_wd"] = "True"
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(config.r),
            "ss_network_alpha": str(config.alpha), "ss_network_args": json.dumps(args)}
