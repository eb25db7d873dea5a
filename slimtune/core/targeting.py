"""Which modules of a model an adapter config selects, with errors that name the problem."""
from __future__ import annotations

import sys

from torch import nn

from ..errors import TargetError
from .config import ALL_LINEAR, CLASSIFIER_HEADS, AdapterConfig, name_matches
from .frozen import is_quantized_layer
from .module import AdapterModule
from .trained_copy import TrainedCopy


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style): a linear layer whose weight is stored ``[d_in, d_out]``."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or broken transformers
        return False
    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or a 4-bit Linear (slimtune's NF4Linear, bitsandbytes' Linear4bit)."""
    return isinstance(module, nn.Linear) or is_quantized_layer(module) or is_hf_conv1d(module)


def is_adaptable(module: nn.Module) -> bool:
    """A layer some adapter method can wrap: Linear-like (:func:`is_linear_like`), nn.Conv1d or nn.Conv2d."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) or is_linear_like(module)


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _inside(name: str, roots: list[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def find_saved_modules(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every module ``modules_to_save`` names (matched as a list of
    ``target_modules`` is), outermost only. Raises :class:`TargetError` for an entry that matches no module (the heads
    ``task_type="SEQ_CLS"`` adds may be absent, as in PEFT)."""
    entries = config.saved_modules()
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and name_matches(entries, name) and not _inside(name, [n for n, _ in found]):
            found.append((name, module))
    matched = {entry for entry in entries for name, _ in found if name_matches([entry], name)}
    missing = [e for e in entries if e not in matched and not (config.task_type == "SEQ_CLS" and e in CLASSIFIER_HEADS)]
    if missing:
        raise TargetError(f"modules_to_save entries {missing!r} match no module of {type(model).__name__}")
    return found


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every module the config targets, in ``named_modules`` order (never one in
    ``modules_to_save`` or inside it; only the layers ``layers_to_transform`` keeps).

    Raises :class:`TargetError` when nothing matches or when a matched module cannot carry an adapter.
    """
    adapted = [name for name, m in model.named_modules() if isinstance(m, (AdapterModule, TrainedCopy))]
    if adapted:
        raise TargetError(
            f"model is already adapted ({len(adapted)} adapter modules, first {adapted[0]!r}); "
            "adapting twice is not supported: slimtune.unload(model) first, or rebuild the model"
        )
    spec = config.target_modules
    head = output_head(model)
    saved = [name for name, _ in find_saved_modules(model, config)]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or _inside(name, saved) or not config.selects_layer(name):
            continue
        if spec == ALL_LINEAR:
            selected = is_linear_like(module) and module is not head
        else:
            selected = name_matches(spec, name)
        if not selected:
            continue
        if config.exclude_modules is not None and name_matches(config.exclude_modules, name):
            continue
        if not is_adaptable(module):
            raise TargetError(
                f"target module {name!r} is a {type(module).__name__}, which {config.method_name()} cannot adapt; "
                "supported: nn.Linear (also 4-bit NF4), nn.Conv1d, nn.Conv2d, transformers Conv1D"
            )
        found.append((name, module))
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_adaptable(m)})
        hint = "" if not isinstance(spec, str) or spec == ALL_LINEAR else (
            " (a string is a regex over the full module name; pass a list for name suffixes)")
        if config.layers_to_transform is not None:
            hint += f" within layers_to_transform={config.layers_to_transform!r}"
        raise TargetError(
            f"target_modules={spec!r} matched no module in {type(model).__name__}{hint}; "
            f"adaptable module names: {', '.join(leaves[:30]) or 'none'}"
        )
    return found
