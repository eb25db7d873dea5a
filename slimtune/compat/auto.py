"""PEFT's loaders that start from the adapter directory alone: ``PeftConfig.from_pretrained`` and the
``AutoPeftModel*`` classes, over local directories (slimtune downloads nothing).

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads ``adapter_config.json``, builds the base model its
``base_model_name_or_path`` names with transformers' matching auto class (``task_type`` picks the class:
``CAUSAL_LM`` -> ``AutoModelForCausalLM`` ...; without one, :class:`AutoPeftModel` takes the class the file's
``auto_mapping`` records, from transformers or diffusers only), resizes its token embeddings when the adapter
directory carries a tokenizer of another size (as PEFT does), and loads the adapter onto it
(:meth:`PeftModel.from_pretrained`). Keyword arguments go to the base model's ``from_pretrained``
(``torch_dtype``, ``device_map`` ...).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, ClassVar

from ..core.checkpoint import CONFIG_NAME, config_from_peft_fields, read_adapter_config
from ..core.config import AdapterConfig
from ..errors import CheckpointError, ConfigError, MissingDependencyError
from .model import DEFAULT, PeftModel

#: PEFT's task types: the transformers auto class each one loads, and the loader's name (AutoPeftModelFor...)
TASKS = {"CAUSAL_LM": ("AutoModelForCausalLM", "CausalLM"),
         "SEQ_CLS": ("AutoModelForSequenceClassification", "SequenceClassification"),
         "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "Seq2SeqLM"),
         "TOKEN_CLS": ("AutoModelForTokenClassification", "TokenClassification"),
         "QUESTION_ANS": ("AutoModelForQuestionAnswering", "QuestionAnswering"),
         "FEATURE_EXTRACTION": ("AutoModel", "FeatureExtraction")}
#: the libraries an ``auto_mapping`` may name (the module is imported to find the class)
AUTO_MAPPING_LIBRARIES = ("transformers", "diffusers")
TOKENIZER_CONFIG = "tokenizer_config.json"


def require_transformers() -> Any:
    """``transformers`` (the base models' library), or a :class:`~slimtune.errors.MissingDependencyError`."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise MissingDependencyError(f"the AutoPeftModel loaders build transformers models ({exc}); install it with: "
                                     "pip install 'slimtune[hf]'") from None


def _adapter_dir(path: str | os.PathLike, subfolder: str | None = None) -> Path:
    directory = Path(path).expanduser() / (subfolder or "")
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory} holds no {CONFIG_NAME}: slimtune loads local adapter directories (it "
                              "downloads nothing from the Hub: download the adapter first)")
    return directory


class PeftConfig:
    """PEFT's ``PeftConfig``, for its loader: ``PeftConfig.from_pretrained(dir)`` is the adapter's config, a
    slimtune config object (``slimtune.LoraConfig`` ...) with PEFT's attributes (``base_model_name_or_path``,
    ``task_type``, ``r`` ...)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any) -> AdapterConfig:
        directory = _adapter_dir(pretrained_model_name_or_path, subfolder)
        return config_from_peft_fields(read_adapter_config(directory), str(directory / CONFIG_NAME))


class AutoPeftModel:
    """PEFT's ``AutoPeftModel``: the base model class from the adapter's ``auto_mapping`` (adapters saved without a
    ``task_type``); the task classes below pick it by ``task_type``."""

    task_type: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated: use {type(self).__name__}.from_pretrained(dir)")

    @classmethod
    def _base_class(cls, raw: dict[str, Any], where: str) -> Any:
        task = raw.get("task_type")
        if cls.task_type is not None:
            if task is not None and task != cls.task_type:
                raise ConfigError(f"{where}: the adapter's task_type is {task}, not {cls.task_type}: load it with "
                                  f"{_class_for_task(task)}")
            return getattr(require_transformers(), TASKS[cls.task_type][0])
        if task is not None:
            raise ConfigError(f"{where}: the adapter has task_type {task}: load it with {_class_for_task(task)}")
        mapping = raw.get("auto_mapping") or {}
        library, name = mapping.get("parent_library"), mapping.get("base_model_class")
        if not isinstance(library, str) or not isinstance(name, str):
            raise ConfigError(f"{where} records neither a task_type nor the base model's class (auto_mapping): load "
                              "the base model yourself and use PeftModel.from_pretrained(base_model, dir)")
        if library.split(".")[0] not in AUTO_MAPPING_LIBRARIES:
            raise ConfigError(f"{where}: the base model's class comes from {library!r}; slimtune imports classes from "
                              f"{' and '.join(AUTO_MAPPING_LIBRARIES)} only")
        try:
            return getattr(importlib.import_module(library), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{where}: cannot find the base model's class {library}.{name} ({exc})") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = DEFAULT,
                        is_trainable: bool = False, config: Any = None, revision: str | None = None,
                        **kwargs: Any) -> PeftModel:
        """The base model ``adapter_config.json`` names, with the adapter of ``pretrained_model_name_or_path`` on
        it (frozen unless ``is_trainable``); ``kwargs`` go to the base model's ``from_pretrained``. ``config`` and
        ``revision`` (PEFT's: another config, the adapter's Hub revision) are refused: the directory's own config
        is read, and nothing is downloaded."""
        if config is not None or revision is not None:
            raise ConfigError("config= and revision= are not supported: slimtune reads the adapter directory's own "
                              "adapter_config.json, locally")
        directory = _adapter_dir(pretrained_model_name_or_path)
        where = str(directory / CONFIG_NAME)
        raw = read_adapter_config(directory)
        base_path = raw.get("base_model_name_or_path")
        if not base_path:
            raise ConfigError(f"{where} names no base_model_name_or_path: load the base model yourself and use "
                              "PeftModel.from_pretrained(base_model, dir)")
        base_class = cls._base_class(raw, where)
        base_revision = raw.get("revision")
        if base_revision is not None:
            kwargs.setdefault("revision", base_revision)
        base_model = base_class.from_pretrained(base_path, **kwargs)
        if (directory / TOKENIZER_CONFIG).is_file() and hasattr(base_model, "get_input_embeddings"):
            tokenizer = require_transformers().AutoTokenizer.from_pretrained(str(directory))
            if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
                base_model.resize_token_embeddings(len(tokenizer))  # tokens added during training, as PEFT does
        return PeftModel.from_pretrained(base_model, directory, adapter_name=adapter_name, is_trainable=is_trainable)


def _class_for_task(task: str) -> str:
    return f"AutoPeftModelFor{TASKS[task][1]}" if task in TASKS else "the loader of its task"


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = "SEQ_CLS"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = "FEATURE_EXTRACTION"
