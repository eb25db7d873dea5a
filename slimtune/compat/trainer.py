"""What transformers' ``Trainer`` needs to write and resume adapter-only checkpoints of a :class:`~.model.PeftModel`.

Facts about ``Trainer`` (transformers 5) this module relies on, all through public behaviour:

* it saves a model (``save_steps``, ``save_model``) with ``model.save_pretrained(dir, state_dict=None, ...)`` when the
  model is a ``transformers.PreTrainedModel`` (or peft's own ``PeftModel``), and otherwise writes the whole
  ``state_dict()`` to ``model.safetensors`` — gigabytes, and a file ``from_pretrained`` half-reads;
* ``resume_from_checkpoint`` restores the weights of such a model from ``model.safetensors`` or from transformers'
  sharded index ``model.safetensors.index.json`` (``load_state_dict(shard, strict=False)`` per listed file), and
  warns about the model's keys the index does not list unless they are the model's ``_keys_to_ignore_on_save``;
* it keeps the dataset columns, and finds the label names, that the model class's ``forward`` signature names;
* it refuses to train a quantised model (``is_quantized``, e.g. bitsandbytes 4-bit) unless the model is peft's own
  class or says it has adapters attached (``_hf_peft_config_loaded``, the flag transformers' PEFT integration sets):
  the wrapper says so (:class:`TrainerCheckpoints`; ``tests/compat/test_trainer_qlora.py`` fails if that changes).

So for a transformers model :func:`wrapper_class` gives a subclass of ``PreTrainedModel`` (every attribute
``PreTrainedModel`` defines is answered by the wrapped model, as PEFT's wrapper answers unknown attributes, except
what the wrapper defines) whose ``forward`` carries the model's signature; its ``save_pretrained`` writes PEFT's two
files and, beside them, the index that lists the adapter file's tensors and a ``model.safetensors`` link to the
adapter file (what ``load_best_model_at_end`` reads; a copy where links are refused). The index names the tensors
as the wrapper's ``state_dict()`` does, because :func:`name_tensors_as_peft` gives adapter tensors PEFT's names in the
state dict (``...q_proj.lora_A.weight``, ``...score.weight``) and reads them back under those names.
"""
from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..core.checkpoint import WEIGHTS_NAME, peft_state_dict
from ..core.inject import AdapterSet

INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME
SAFE_WEIGHTS_NAME = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME


# -- adapter tensors under PEFT's names in state dicts ------------------------------------------------------------
def _renamer(names: dict[str, str]) -> tuple[Callable[..., None], Callable[..., None]]:
    """A state-dict post-hook writing each ``own`` key as ``names[own]``, and a load pre-hook reading it back."""

    def save_hook(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        for own, peft in names.items():
            if prefix + own in state:
                state[prefix + peft] = state.pop(prefix + own)

    def load_hook(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        for own, peft in names.items():
            if prefix + peft in state:
                state[prefix + own] = state.pop(prefix + peft)

    return save_hook, load_hook


def name_tensors_as_peft(adapter_set: AdapterSet) -> None:
    """Name the adapter set's tensors in ``state_dict()`` / ``load_state_dict()`` as PEFT's checkpoint keys do: an
    adapter's parameters by their PEFT suffix (``lora_A`` -> ``lora_A.weight``), a module to save's trained copy by
    the module's own names (``trained_module.weight`` -> ``weight``)."""
    for _, adapter in adapter_set.adapters:
        own = dict(adapter.named_parameters())
        names = {next(k for k, p in own.items() if p is param): suffix
                 for suffix, param in adapter.peft_parameters().items()}
        _register(adapter, {own_name: peft for own_name, peft in names.items() if own_name != peft})
    for _, held in adapter_set.copies:
        _register(held, {f"trained_module.{key}": key for key in held.peft_tensors()})


def _register(module: nn.Module, names: dict[str, str]) -> None:
    if names:
        save_hook, load_hook = _renamer(names)
        module.register_state_dict_post_hook(save_hook)
        module.register_load_state_dict_pre_hook(load_hook)


# -- the transformers variant ----------------------------------------------------------------------------------
class TrainerCheckpoints:
    """The part of the transformers variant of :class:`~.model.PeftModel` that Trainer's checkpoints use."""

    #: transformers' mark of a model with adapters attached (its own PEFT integration sets it on the model). Trainer
    #: reads it to tell a quantised model that carries trainable adapters from a bare one, which it refuses to train
    #: (``validate_quantization_for_training``); this wrapper's model has its adapters attached, so it says so.
    _hf_peft_config_loaded = True

    @property
    def _keys_to_ignore_on_save(self) -> set[str]:
        """The state-dict keys ``save_pretrained`` does not write: all but the active adapter's."""
        return set(self.state_dict()) - set(peft_state_dict(self.get_base_model()))

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        saved = kwargs.get("selected_adapters") or self.peft_config
        if kwargs.get("is_main_process", True) and self.active_adapter in saved:
            adapter_dir = self.adapter_directory(self.active_adapter)
            write_index(Path(save_directory), self.get_base_model(), adapter_dir)
            link_weights(Path(save_directory), adapter_dir)


def write_index(directory: Path, model: nn.Module, adapter_dir: str) -> Path:
    """transformers' sharded-checkpoint index in ``directory``, listing the active adapter's tensors (named as the
    wrapper's state dict and the adapter file name them) in its ``adapter_model.safetensors``."""
    tensors = peft_state_dict(model)
    shard = f"{adapter_dir}/{WEIGHTS_NAME}" if adapter_dir else WEIGHTS_NAME
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {key: shard for key in sorted(tensors)}}
    path = directory / INDEX_NAME
    path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return path


def link_weights(directory: Path, adapter_dir: str) -> Path:
    """``model.safetensors`` in ``directory`` as a relative symbolic link to the active adapter's file (no bytes
    copied), or as a copy of that file where the file system has no links (an adapter's size). Trainer's
    ``load_best_model_at_end`` reads only that name (or ``pytorch_model.bin``) for a model that is not peft's own
    class, then loads it with ``strict=False``, as resuming does from the index."""
    link = directory / SAFE_WEIGHTS_NAME
    target = Path(adapter_dir) / WEIGHTS_NAME if adapter_dir else Path(WEIGHTS_NAME)
    link.unlink(missing_ok=True)
    try:
        link.symlink_to(target)
    except OSError:  # no symbolic links on this file system (some Windows and network mounts)
        shutil.copyfile(directory / target, link)
    return link


def _forward_like(model_class: type) -> Callable[..., Any]:
    """The wrapper's ``forward`` with ``model_class.forward``'s signature (what Trainer reads columns and labels
    from)."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model()(*args, **kwargs)

    forward.__signature__ = inspect.signature(model_class.forward)  # type: ignore[attr-defined]
    forward.__doc__ = f"{model_class.__name__}.forward, through the adapters."
    return forward


def _delegated(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.get_base_model(), name)

    def put(self: Any, value: Any) -> None:
        setattr(self.get_base_model(), name, value)

    return property(get, put, doc=f"The wrapped model's ``{name}``.")


def _defined_by(klass: type) -> set[str]:
    """The attribute names ``klass`` and its bases define, nn.Module's and object's not counted."""
    return {name for k in klass.__mro__ if k not in (nn.Module, object) for name in vars(k)}


_VARIANTS: dict[type, type] = {}  # keyed by the model class itself (held, so never reused)


def wrapper_class(base_class: type, model: nn.Module) -> type:
    """``base_class`` (:class:`~.model.PeftModel`) for a plain module; for a transformers model, its variant for
    ``type(model)`` (made once per model class)."""
    modeling = sys.modules.get("transformers.modeling_utils")  # loaded whenever a transformers model exists
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is None or not isinstance(model, pretrained):
        return base_class
    key = type(model)
    if key not in _VARIANTS:
        ours = _defined_by(base_class) | _defined_by(TrainerCheckpoints)
        namespace: dict[str, Any] = {}
        for name in sorted(_defined_by(pretrained) - ours):
            if name.startswith("__"):
                continue
            # nn.Module's own behaviour (to, train, ...) for the wrapper itself; everything else from the model
            namespace[name] = vars(nn.Module)[name] if name in vars(nn.Module) else _delegated(name)
        namespace.update(forward=_forward_like(key), __module__=__name__,
                         __doc__=f"{base_class.__name__} of a {key.__name__}, a transformers PreTrainedModel.")
        _VARIANTS[key] = type(f"{base_class.__name__}For{key.__name__}", (TrainerCheckpoints, base_class, pretrained),
                              namespace)
    return _VARIANTS[key]
