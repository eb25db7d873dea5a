"""Calibration data for ``slimtune allocate``, read exactly as ``slimtune train`` reads its data: the same JSONL
records (``{"text"}``, ``{"prompt", "completion"}``, ``{"text", "label"}`` with integer or string labels), the same
tokenizers (the model directory's own, or :class:`~slimtune.train.data.ByteTokenizer` for a preset), the same rows
and batches (:mod:`slimtune.train.tasks`), so a file that trains also calibrates, and every error names its line.

A model directory whose architecture is not a causal LM, on a file whose lines all carry a label, is measured as a
sequence classifier (its head, which a fine-tune trains whole, is not a target by default); anything else as a
causal LM (the loss on every labelled token). Texts longer than ``max_length`` tokens are cut.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.config import ALL_LINEAR, CLASSIFIER_HEADS
from ..errors import ConfigError
from ..models.jsonl import read_jsonl
from ..models.presets import CAUSAL_LM_SUFFIXES, get_preset
from .build import build_base, check_model_task, read_model_config
from .config import TrainConfig
from .tasks import make_task


@dataclasses.dataclass
class Calibration:
    """A model to measure, its calibration batches, and the targets it is adapted at by default."""

    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    default_targets: str | list[str]
    task: str  # "causal-lm" or "classification"


def calibration_task(data: str, model_dir: str | None) -> str:
    """``"classification"`` for a model directory that is not a causal LM and a file whose lines all carry a label,
    else ``"causal-lm"``."""
    if model_dir is None:
        return "causal-lm"
    architectures = read_model_config(model_dir).get("architectures") or []
    if any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        return "causal-lm"
    records = read_jsonl(data)
    return "classification" if records and all("label" in r for _, r in records) else "causal-lm"


def _default_targets(model: nn.Module, cfg: TrainConfig) -> str | list[str]:
    if cfg.task == "classification":  # every Linear layer's name but the head's
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        return sorted(names - set(CLASSIFIER_HEADS))
    if cfg.preset is not None:
        return list(get_preset(cfg.preset).targets)
    return ALL_LINEAR


def load_calibration(data: str, model_dir: str | None = None, preset: str | None = None, batch_size: int = 4,
                     count: int = 8, max_length: int = 256, seed: int = 0) -> Calibration:
    """The model (float32, on the CPU; a preset's random weights drawn with ``seed``) and up to ``count`` batches
    of ``batch_size`` rows of ``data``, each a mapping the model's own loss takes (``labels`` included)."""
    for option, value in (("--batch-size", batch_size), ("--batches", count), ("--max-length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} must be a positive integer, got {value!r}")
    cfg = TrainConfig(out="", data=data, model_dir=model_dir, preset=preset, task=calibration_task(data, model_dir),
                      seq=max_length, truncate=True, pack=False, batch=batch_size, dtype="float32", seed=seed,
                      device="cpu").resolved(cuda=False)
    check_model_task(cfg)
    task = make_task(cfg)
    task.load(max_length)
    rows = min(len(task.rows or []), batch_size * count)
    cpu = torch.device("cpu")
    batches = [task.batch(list(range(start, min(start + batch_size, rows))), cpu)
               for start in range(0, rows, batch_size)]
    model = build_base(cfg, cpu, task.num_labels)
    return Calibration(model, batches, _default_targets(model, cfg), cfg.task)
