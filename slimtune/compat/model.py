"""``slimtune.get_peft_model`` and ``slimtune.PeftModel``: PEFT's model API over slimtune's adapters.

``get_peft_model(model, config)`` adapts ``model`` (:func:`slimtune.adapt`) and returns a :class:`PeftModel` around
it, laid out as PEFT's (``peft_model.base_model.model`` is ``model``; ``state_dict()`` keys start with
``base_model.model.``) and answering what PEFT's answers: ``print_trainable_parameters``, ``save_pretrained``
(adapter only, PEFT's files), ``from_pretrained``, ``merge_and_unload``, ``unload``, ``disable_adapter``, and named
adapters (``add_adapter``, ``load_adapter``, ``set_adapter``, ``delete_adapter``). Other attributes come from the
wrapped model. For a transformers model the wrapper is also a ``PreTrainedModel``, so that ``Trainer`` writes
adapter-only checkpoints and resumes from them (:mod:`.trainer`).

Named adapters: slimtune puts one adapter on a layer, so one named adapter is in the model at a time (the active
one); the others wait beside it as :class:`~slimtune.core.inject.AdapterSet` s, holding the same frozen base layers,
and ``set_adapter`` swaps them. PEFT saves the adapter ``"default"`` in the directory itself and any other in a
sub-directory of its name; so does :meth:`PeftModel.save_pretrained`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..core.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, config_from_peft_fields, load_adapter_state, peft_state_dict,
                               read_adapter_files, save_adapter)
from ..core.config import AdapterConfig
from ..core.frozen import quantized_handle
from ..core.module import AdapterModule
from ..core.siblings import relearn
from ..core.inject import (CONFIG_ATTR, AdapterSet, adapt, adapter_modules, attach, detach, disable_adapters, merge,
                           summary, trained_copies, unload, unmerge)
from ..errors import ConfigError, MergeError, SlimtuneError
from ..quant import dequantize as dequantize_model
from .configs import as_slimtune_config
from .trainer import name_tensors_as_peft, wrapper_class

DEFAULT = "default"


class AdaptedModel(nn.Module):
    """PEFT's tuner level: holds the adapted model as ``.model`` (so state-dict keys read
    ``base_model.model.<path>``) and answers for it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A slimtune-adapted model with PEFT's ``PeftModel`` API. Made by :func:`get_peft_model` or
    :meth:`from_pretrained`; ``peft_config`` maps adapter names to their configs, ``active_adapter`` is the one in the
    model."""

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> PeftModel:
        """``PeftModel(model, ...)`` of a transformers model is its transformers variant (see :mod:`.trainer`)."""
        return super().__new__(wrapper_class(PeftModel, model) if cls is PeftModel and model is not None else cls)

    def __init__(self, model: nn.Module, peft_config: Any = None, adapter_name: str = DEFAULT,
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        """Adapt ``model`` with ``peft_config`` (see :func:`get_peft_model`) and wrap it, its adapter named
        ``adapter_name``; without a config, wrap ``model`` as it is adapted (:func:`slimtune.adapt`,
        :func:`slimtune.load_adapter`). ``low_cpu_mem_usage`` is PEFT's and changes nothing here (the adapters
        are small and made where the model is); another keyword is a ``TypeError``, as in PEFT."""
        nn.Module.__init__(self)  # only nn.Module's: the transformers variant must not run PreTrainedModel's
        if peft_config is not None:
            adapt(model, _adapter_dtype(as_slimtune_config(peft_config), model, autocast_adapter_dtype))
        config = getattr(model, CONFIG_ATTR, None)
        if config is None:
            raise SlimtuneError(f"{type(model).__name__} has no slimtune adapters: give a config, or use "
                                "slimtune.get_peft_model")
        self.base_model = AdaptedModel(model)
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self.waiting: dict[str, AdapterSet] = {}  # the other named adapters, out of the model
        name_tensors_as_peft(AdapterSet(config, adapter_modules(model), trained_copies(model)))

    @property
    def base_model(self) -> AdaptedModel:  # a property: PreTrainedModel defines one for the transformers variant
        return self._modules["base_model"]

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if "base_model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["base_model"].model, name)

    # -- the model ------------------------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The wrapped model (adapters inside), as PEFT's ``get_base_model``."""
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().generate(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts of the model with its active adapter."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        print(summary(self))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The base model alone inside the block (modules to save: their originals)."""
        with disable_adapters(self.get_base_model()):
            yield

    def disable_adapter_layers(self) -> None:
        """PEFT's: every adapter layer (and module to save) runs its base until :meth:`enable_adapter_layers`; merged
        adapters are unmerged first, and the adapter parameters stop requiring grad."""
        model = self.get_base_model()
        for _, adapter in adapter_modules(model):
            if adapter.merged:
                adapter.unmerge()
        for _, module in adapter_modules(model) + trained_copies(model):
            module.disabled = True
        self._set_trainable(self.active_adapter, False, record=False)

    def enable_adapter_layers(self) -> None:
        """PEFT's: the adapters run again, trainable unless loaded for inference."""
        model = self.get_base_model()
        for _, module in adapter_modules(model) + trained_copies(model):
            module.disabled = False
        self._set_trainable(self.active_adapter, not self.peft_config[self.active_adapter].inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """PEFT's: the named adapters' parameters (modules to save included) require grad or not."""
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            self._require(name)
            self._set_trainable(name, requires_grad, record=False)

    @property
    def active_peft_config(self) -> AdapterConfig:
        """The active adapter's config."""
        return self.peft_config[self.active_adapter]

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise SlimtuneError("add_weighted_adapter (PEFT's combination of LoRA adapters) is not supported: slimtune "
                            "holds one adapter per layer")

    def merge_adapter(self) -> None:
        merge(self.get_base_model())

    def unmerge_adapter(self) -> None:
        unmerge(self.get_base_model())

    # -- export ---------------------------------------------------------------------------------------------
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, dequantize: bool = False) -> nn.Module:
        """The plain model with the active adapter folded into its weights: its own module classes and parameter
        names, the modules to save as trained. A 4-bit base is refused unless ``dequantize=True`` (dense weights
        in the compute dtype). Other named adapters are dropped. ``safe_merge=True`` (PEFT's) checks every merged
        weight for NaN / inf first and, if one has any, raises with the model left as it was."""
        if adapter_names is not None and list(adapter_names) != [self.active_adapter]:
            raise ConfigError(f"adapter_names={adapter_names!r}: slimtune merges the active adapter only "
                              f"({self.active_adapter!r}); set_adapter first")
        model = self.get_base_model()
        quantized = [name for name, adapter in adapter_modules(model) if quantized_handle(adapter.base_layer)]
        if quantized and not dequantize:
            raise SlimtuneError(f"{quantized[0]} (and {len(quantized) - 1} more) is 4-bit: merging needs dense "
                                "weights; merge_and_unload(dequantize=True) writes them in the compute dtype")
        if quantized:
            dequantize_model(model)
        if safe_merge:
            self._merge_checked(model)
        self.waiting.clear()
        return unload(model, merge=True)

    def _merge_checked(self, model: nn.Module) -> None:
        """Merge every adapter of ``model``; where a merged weight is not finite, unmerge what this merged (the base
        weights come back bit for bit) and raise, naming the layer."""
        fresh = [adapter for _, adapter in adapter_modules(model) if not adapter.merged]
        for adapter in fresh:
            adapter.merge()
        broken = [name for name, adapter in adapter_modules(model) if not torch.isfinite(adapter.base_weight).all()]
        if broken:
            for adapter in fresh:
                adapter.unmerge()
            more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
            raise MergeError(f"safe_merge: the merged weight of {broken[0]}{more} has NaN or inf values; the "
                             f"adapter {self.active_adapter!r} seems broken. The model is left as it was")

    def unload(self) -> nn.Module:
        """The plain model without the adapters (its own weights, bit for bit); modules to save as trained."""
        self.waiting.clear()
        return unload(self.get_base_model())

    # -- checkpoints ----------------------------------------------------------------------------------------
    def adapter_directory(self, adapter_name: str) -> str:
        """Where an adapter goes below the save directory, as PEFT puts it: ``""`` for ``"default"``."""
        return "" if adapter_name == DEFAULT else adapter_name

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Write each adapter (all, or ``selected_adapters``) as PEFT does: ``adapter_config.json`` and
        ``adapter_model.safetensors``, ``"default"`` in ``save_directory``, others in sub-directories. Never the
        frozen weights. ``state_dict`` (from Trainer or accelerate) must hold the model's own adapter tensors.
        PEFT's options that would write something else — PiSSA / OLoRA's ``path_initial_model_for_weight_conversion``,
        ``push_to_hub`` — are refused by name; others (``save_embedding_layers``, ``max_shard_size`` ...) change
        nothing for an adapter's files."""
        if not safe_serialization:
            raise ConfigError("safe_serialization=False: slimtune writes safetensors only (it never pickles)")
        refused = sorted(key for key in ("path_initial_model_for_weight_conversion", "push_to_hub") if kwargs.get(key))
        if refused:
            raise ConfigError(f"save_pretrained: {', '.join(refused)} not supported (slimtune writes the adapter as "
                              "it is, to a local directory)")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ConfigError(f"selected_adapters: no adapter named {unknown[0]!r}; adapters: {list(self.peft_config)}")
        if state_dict is not None:
            self._check_given_state(state_dict)
        relearn(self.get_base_model())  # on every process: a run resumed from here relearns (core.siblings)
        if not is_main_process:
            return
        for name in names:
            with self._in_model(name):
                save_adapter(self.get_base_model(), Path(save_directory) / self.adapter_directory(name))

    def _check_given_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        own = peft_state_dict(self.get_base_model())
        for key, tensor in own.items():
            given = state_dict.get(key)
            if given is None or not torch.equal(given.to(tensor.device, tensor.dtype), tensor):
                raise SlimtuneError(f"save_pretrained(state_dict=...): {key} is missing or differs from the model's "
                                    "(sharded training is not supported: save the model itself)")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = DEFAULT,
                        is_trainable: bool = False, config: Any = None, autocast_adapter_dtype: bool = True,
                        **kwargs: Any) -> PeftModel:
        """Load the adapter directory ``model_id`` (PEFT's or slimtune's files; ``subfolder=`` below it) onto
        ``model``; frozen unless ``is_trainable``, as PEFT loads it. ``config``: a config to use instead of the
        file's; ``autocast_adapter_dtype`` (PEFT's default True): float32 adapters on a float16 / bfloat16 model.
        Hub-only options that cannot change a local load (``token``, ``cache_dir`` ...) are accepted; any other is
        refused by name."""
        load_local_adapter(model, model_id, config, autocast_adapter_dtype, kwargs)
        wrapped = PeftModel(model, adapter_name=adapter_name)
        wrapped._set_trainable(adapter_name, is_trainable)
        return wrapped

    # -- named adapters ---------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False) -> None:
        """A new adapter ``adapter_name`` from ``peft_config`` (a slimtune or a peft config); not made active."""
        config = as_slimtune_config(peft_config)
        self._park_new(adapter_name, lambda model: adapt(model, config))

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool = True, **kwargs: Any) -> None:
        """Load the adapter directory ``model_id`` as adapter ``adapter_name`` (not made active); options as
        :meth:`from_pretrained`'s."""
        self._park_new(adapter_name, lambda model: load_local_adapter(model, model_id, kwargs.pop("config", None),
                                                                      autocast_adapter_dtype, kwargs))
        self._set_trainable(adapter_name, is_trainable)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter in the model (trainable unless loaded for inference)."""
        self._require(adapter_name)
        if adapter_name != self.active_adapter:
            model = self.get_base_model()
            self.waiting[self.active_adapter] = detach(model)  # refused while merged
            self._attach(self.waiting.pop(adapter_name))
            self.active_adapter = adapter_name
        self._set_trainable(adapter_name, not self.peft_config[adapter_name].inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``; when it is the active one, the next one becomes active."""
        self._require(adapter_name)
        if len(self.peft_config) == 1:
            raise SlimtuneError(f"{adapter_name!r} is the only adapter: unload() gives the model back without it")
        if adapter_name == self.active_adapter:
            self.set_adapter(next(name for name in self.peft_config if name != adapter_name))
        del self.waiting[adapter_name]
        del self.peft_config[adapter_name]

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")

    def _park_new(self, adapter_name: str, build: Any) -> None:
        """Build a named adapter in the model (``build(model)``, on the model without the active adapter), then
        set it aside; the model is left as it was if building fails."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} exists already; delete_adapter it first")
        model = self.get_base_model()
        active = detach(model)  # refused while merged
        try:
            build(model)
            new = detach(model)
        finally:
            self._attach(active)
        name_tensors_as_peft(new)
        self.waiting[adapter_name] = new
        self.peft_config[adapter_name] = new.config

    def _attach(self, adapter_set: AdapterSet) -> None:
        """Put a waiting adapter set into the model, on the device its base layers are on now (the model may have
        moved while it waited)."""
        for _, module in adapter_set.adapters + adapter_set.copies:
            base = module.base_layer if isinstance(module, AdapterModule) else module.original_module
            device = next((t.device for t in (*base.parameters(), *base.buffers())), None)
            if device is not None:
                module.to(device)
        attach(self.get_base_model(), adapter_set)

    def _set_trainable(self, adapter_name: str, trainable: bool, record: bool = True) -> None:
        """Train the adapter (its parameters require grad) or not; ``record``: as its ``inference_mode`` too (as PEFT
        records it; not for a disabled adapter)."""
        config = self.peft_config[adapter_name]
        if record:
            config = dataclasses.replace(config, inference_mode=not trainable)
            self.peft_config[adapter_name] = config
        waiting = self.waiting.get(adapter_name)
        if waiting is not None:
            waiting.config = config
            params = list(waiting.parameters())
        else:
            model = self.get_base_model()
            setattr(model, CONFIG_ATTR, config)
            params = [p for _, m in adapter_modules(model) + trained_copies(model) for p in _own_parameters(m)]
        for param in params:
            param.requires_grad_(trainable)

    @contextlib.contextmanager
    def _in_model(self, adapter_name: str) -> Iterator[None]:
        """Adapter ``adapter_name`` in the model inside the block (swapped in and out again if it is waiting)."""
        self._require(adapter_name)
        active = self.active_adapter
        if adapter_name == active:
            yield
            return
        self.set_adapter(adapter_name)
        try:
            yield
        finally:
            self.set_adapter(active)


#: PEFT loader options that only concern downloading from the Hub (or memory use while loading): a local load is
#: the same with or without them
HUB_ONLY_OPTIONS = ("token", "use_auth_token", "cache_dir", "local_files_only", "force_download", "proxies",
                    "low_cpu_mem_usage", "ephemeral_gpu_offload", "torch_device", "use_safetensors")


def load_local_adapter(model: nn.Module, model_id: str | os.PathLike, config: Any, autocast: bool,
                       options: dict[str, Any]) -> nn.Module:
    """PEFT's loading of an adapter directory onto ``model`` (``subfolder`` below it, ``config`` instead of its own,
    float32 adapters on a 16-bit model when ``autocast``); options PEFT would act on and slimtune does not (a Hub
    ``revision``, a ``key_mapping`` ...) are refused by name, never ignored."""
    options = dict(options)
    directory = Path(model_id) / (options.pop("subfolder", None) or "")
    unknown = sorted(k for k, v in options.items() if k not in HUB_ONLY_OPTIONS and v is not None)
    if unknown:
        raise ConfigError(f"loading an adapter: option(s) {', '.join(unknown)} not supported (slimtune reads local "
                          "directories, as they are)")
    raw, tensors = read_adapter_files(directory)
    where = str(directory / CONFIG_NAME)
    chosen = as_slimtune_config(config) if config is not None else config_from_peft_fields(raw, where)
    chosen = _adapter_dtype(chosen, model, autocast)
    return load_adapter_state(model, chosen, tensors, where, str(directory / WEIGHTS_NAME))


def _own_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable part of an adapter or a module to save (not its frozen base)."""
    for name, param in module.named_parameters():
        if not name.startswith(("base_layer.", "original_module.")):
            yield param


def _adapter_dtype(config: AdapterConfig, model: nn.Module, autocast: bool) -> AdapterConfig:
    """PEFT's ``autocast_adapter_dtype``: float32 adapters on a float16 / bfloat16 model unless the config sets
    ``adapter_dtype``."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if autocast and dtype in (torch.float16, torch.bfloat16) and getattr(config, "adapter_dtype", False) is None:
        return dataclasses.replace(config, adapter_dtype=torch.float32)
    return config


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = DEFAULT, mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """PEFT's ``get_peft_model``: adapt ``model`` in place with ``peft_config`` (a slimtune config, or a peft config
    object, translated) and return it wrapped in a :class:`PeftModel`.

    ``autocast_adapter_dtype`` (PEFT's default True): on a float16 / bfloat16 model the adapters are float32, as
    PEFT makes them, unless the config sets ``adapter_dtype``; False keeps them in the model's dtype (leaner: what
    :func:`slimtune.adapt` does). ``revision`` (the base model's revision) is recorded in the config, and so in
    ``adapter_config.json``, as PEFT records it. ``low_cpu_mem_usage`` changes nothing here (see :class:`PeftModel`).
    """
    if mixed:
        raise ConfigError("mixed=True (PEFT's mixed adapter types) is not supported")
    config = as_slimtune_config(peft_config)
    if revision is not None:
        config = dataclasses.replace(config, revision=revision)
    return PeftModel(model, config, adapter_name, autocast_adapter_dtype)
