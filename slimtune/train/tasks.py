"""The three tasks ``slimtune train`` trains: what a row is, how rows become a batch, and the objective.

Every objective is an ``nn.Module`` around the model (so that DDP and FSDP wrap it whole) whose forward returns
``(loss_sum, correct)``: the float32 *sum* of the per-target losses of the batch (the loop divides by the global
batch's target count, so that accumulation and data parallelism give the mean over the whole batch), and the
number of correct predictions (classification; 0 otherwise).

* ``causal-lm``: next-token cross entropy over the tokens with a label (the completion of a prompt/completion
  record), through :func:`~slimtune.train.loss.fused_causal_lm_loss` (no full logits) for the model families
  whose logits are their output head's plain product, else from the model's logits.
* ``classification``: cross entropy of a sequence-classification model's logits; the head is trained whole.
* ``diffusion``: noise-prediction MSE. Latents, timesteps and text conditioning are random, of the shapes the
  real pipeline feeds the denoiser (:func:`slimtune.models.workload.make_inputs`), one seeded sample per row
  index; a UNet predicts the DDPM noise ε of ``√ᾱ x₀ + √(1−ᾱ) ε`` (Stable Diffusion's scaled-linear schedule), a
  DiT the flow-matching velocity ``ε − x₀`` of ``(1−σ) x₀ + σ ε``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..memory.chunked_loss import model_causal_lm_loss, plain_head
from ..models.deps import require_diffusers
from ..models.diffusion import DiffusionModel, DiffusionPreset
from ..models.jsonl import read_jsonl
from ..models.presets import get_preset, resolve_dtype
from ..models.workload import make_inputs, sample_tokens
from .build import diffusion_spec
from .config import TrainConfig
from .data import (IGNORE, ByteTokenizer, DataError, HFTokenizer, Row, Tokenizer, causal_lm_rows,
                   classification_rows, held_out, label_names, pack)
from .latents import LatentData
from .loss import logits_causal_lm_loss

#: a DiT's inputs that are not batched (positions)
UNBATCHED = ("img_ids", "txt_ids")


# -- objectives -------------------------------------------------------------------------------------
def fused_loss_supported(model: nn.Module) -> bool:
    """Whether ``model``'s loss can skip its logits (:func:`slimtune.memory.chunked_loss.plain_head`)."""
    return plain_head(model)


class CausalLMObjective(nn.Module):
    """Summed next-token cross entropy of a causal LM; ``fused``: through the head without the logits."""

    def __init__(self, model: nn.Module, fused: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.fused = fused_loss_supported(model) if fused is None else fused

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            loss = model_causal_lm_loss(self.model, input_ids, labels)
        else:
            loss = logits_causal_lm_loss(self.model(input_ids=input_ids, use_cache=False).logits, labels)
        return loss, torch.zeros((), dtype=torch.long, device=loss.device)


class ClassificationObjective(nn.Module):
    """Summed cross entropy of a sequence classifier and its count of correct predictions (label -100: none)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
        return loss, ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()


class DiffusionObjective(nn.Module):
    """Summed per-sample MSE (float32) between the denoiser's prediction and ``target``, weighted by ``weight``."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, target: torch.Tensor, weight: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.model(**inputs)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        loss = (per_sample * weight).sum()
        return loss, torch.zeros((), dtype=torch.long, device=loss.device)


# -- tasks ------------------------------------------------------------------------------------------
class Task:
    """What one task needs from the loop: rows, batches, the objective. ``rows`` is ``None`` for an endless
    stream of generated samples (diffusion)."""

    name = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rows: list[Row] | None = []
        self.eval_rows: list[Row] = []
        self.num_labels: int | None = None
        self.labels: list[str] | None = None

    def load(self, seq: int) -> None:
        """Read, check and tokenise the data (every data error is raised here, before any model is built)."""

    def objective(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def targets(self, index: int) -> int:
        """Positions with loss in training row ``index``."""
        return self.rows[index].targets  # type: ignore[index]

    def tokens(self, index: int) -> int:
        """Tokens row ``index`` puts through the model (for tokens/s)."""
        return self.rows[index].tokens  # type: ignore[index]

    def batch(self, indices: list[int], device: torch.device, rows: list[Row] | None = None,
              real: list[bool] | None = None) -> dict[str, Any]:
        """The objective's keyword arguments for rows ``indices``; ``real[i] = False`` gives row i no loss (the
        padding a process's share of an evaluation batch may need)."""
        raise NotImplementedError


def _tokenizer(cfg: TrainConfig) -> Tokenizer:
    if cfg.model_dir is not None:
        return HFTokenizer(cfg.model_dir)
    tokenizer = ByteTokenizer()
    vocab = getattr(get_preset(str(cfg.preset)), "vocab_size", 0)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"preset {cfg.preset}: vocabulary {vocab} is smaller than the byte tokenizer's 258")
    return tokenizer


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``; to a GPU from pinned memory without waiting for the queued work."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _pad(seqs: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


class CausalLMTask(Task):
    name = "causal-lm"

    def load(self, seq: int) -> None:
        cfg = self.cfg
        self.tokenizer = _tokenizer(cfg)
        self.seq = seq
        rows = causal_lm_rows(read_jsonl(str(cfg.data)), str(cfg.data), self.tokenizer, seq, cfg.truncate)
        if cfg.eval_data is not None:
            eval_rows = causal_lm_rows(read_jsonl(cfg.eval_data, "--eval-data"), cfg.eval_data, self.tokenizer, seq,
                                       cfg.truncate)
        elif cfg.eval_fraction:
            rows, eval_rows = held_out(rows, cfg.eval_fraction, cfg.seed)
        else:
            eval_rows = []
        self.rows, self.eval_rows = (pack(rows, seq), pack(eval_rows, seq)) if cfg.pack else (rows, eval_rows)

    def objective(self, model: nn.Module) -> nn.Module:
        return CausalLMObjective(model)

    def batch(self, indices, device, rows=None, real=None):
        rows = self.rows if rows is None else rows
        chosen = [rows[i] for i in indices]
        length = self.seq if self.cfg.pack else max(r.tokens for r in chosen)
        labels = [r.labels if real is None or real[k] else [IGNORE] * r.tokens for k, r in enumerate(chosen)]
        return {"input_ids": _to(_pad([r.input_ids for r in chosen], length, self.tokenizer.pad_id), device),
                "labels": _to(_pad(labels, length, IGNORE), device)}  # type: ignore[arg-type]


class ClassificationTask(Task):
    name = "classification"

    def load(self, seq: int) -> None:
        cfg = self.cfg
        self.tokenizer = _tokenizer(cfg)
        records = read_jsonl(str(cfg.data))
        self.labels = label_names(records, str(cfg.data))
        self.num_labels = len(self.labels) if self.labels is not None else 1 + max(r["label"] for _, r in records)
        if self.num_labels < 2:
            raise DataError(f"--data {cfg.data}: classification needs at least two classes, found {self.num_labels}")
        rows = classification_rows(records, str(cfg.data), self.tokenizer, seq, cfg.truncate, self.labels,
                                   self.num_labels)
        if cfg.eval_data is not None:
            eval_records = read_jsonl(cfg.eval_data, "--eval-data")
            label_names(eval_records, cfg.eval_data)
            eval_rows = classification_rows(eval_records, cfg.eval_data, self.tokenizer, seq, cfg.truncate,
                                            self.labels, self.num_labels)
        elif cfg.eval_fraction:
            rows, eval_rows = held_out(rows, cfg.eval_fraction, cfg.seed)
        else:
            eval_rows = []
        self.rows, self.eval_rows = rows, eval_rows

    def objective(self, model: nn.Module) -> nn.Module:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = self.tokenizer.pad_id  # decoder classifiers find each row's last token by it
        return ClassificationObjective(model)

    def batch(self, indices, device, rows=None, real=None):
        rows = self.rows if rows is None else rows
        chosen = [rows[i] for i in indices]
        length = max(r.tokens for r in chosen)
        labels = [r.labels if real is None or real[k] else IGNORE for k, r in enumerate(chosen)]
        return {"input_ids": _to(_pad([r.input_ids for r in chosen], length, self.tokenizer.pad_id), device),
                "attention_mask": _to(_pad([[1] * r.tokens for r in chosen], length, 0), device),
                "labels": _to(torch.tensor(labels, dtype=torch.long), device)}


class DiffusionTask(Task):
    """An endless stream of samples by position (no rows; ``seq`` is unused): seeded random latents and text
    embeddings, or with ``--data`` a precomputed-latents file's rows (:class:`~.latents.LatentData`), each with its
    own seeded noise and timestep."""

    name = "diffusion"

    def load(self, seq: int) -> None:
        self.rows = None
        cfg = self.cfg
        spec = get_preset(cfg.preset) if cfg.preset is not None else diffusion_spec(str(cfg.model_dir))
        assert isinstance(spec, DiffusionPreset)
        self.spec = spec
        self.dtype = resolve_dtype(str(cfg.dtype))
        self.data = LatentData(cfg.data, spec, self.dtype, cfg.seed) if cfg.data is not None else None
        if spec.family == "unet":
            self.scheduler = require_diffusers().DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                               beta_end=0.012)

    def objective(self, model: nn.Module) -> nn.Module:
        return DiffusionObjective(model)  # type: ignore[arg-type]

    def targets(self, index: int) -> int:
        return 1

    def tokens(self, index: int) -> int:
        return sample_tokens(self.spec, 0, self.data.resolution if self.data is not None else None)

    def sample(self, index: int) -> dict[str, Any]:
        """Sample ``index``'s inputs and target (CPU), drawn from a generator seeded with the run's seed and
        ``index`` (its latents and text embeddings from ``--data`` when given)."""
        gen = torch.Generator().manual_seed((self.cfg.seed << 32) + index)
        if self.data is not None:
            inputs = self.data.inputs(index, gen)
        else:
            inputs = make_inputs(self.spec, None, 1, 0, "cpu", self.dtype, gen)
        key = "sample" if self.spec.family == "unet" else "hidden_states"
        x0 = inputs[key]
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        if self.spec.family == "unet":
            inputs[key] = self.scheduler.add_noise(x0, noise, inputs["timestep"])
            inputs["target"] = noise
        else:
            sigma = inputs["timestep"].reshape(-1, *([1] * (x0.dim() - 1)))
            inputs[key] = (1 - sigma) * x0 + sigma * noise
            inputs["target"] = noise - x0
        return inputs

    def batch(self, indices, device, rows=None, real=None):
        samples = [self.sample(i) for i in indices]
        out: dict[str, Any] = {}
        for key, value in samples[0].items():
            if key in UNBATCHED:
                out[key] = _to(value, device)
            elif isinstance(value, dict):
                out[key] = {k: _to(torch.cat([s[key][k] for s in samples]), device) for k in value}
            else:
                out[key] = _to(torch.cat([s[key] for s in samples]), device)
        out["weight"] = torch.tensor([1.0 if real is None or r else 0.0 for r in (real or indices)], device=device)
        return out


TASKS: dict[str, type[Task]] = {t.name: t for t in (CausalLMTask, ClassificationTask, DiffusionTask)}


def make_task(cfg: TrainConfig) -> Task:
    return TASKS[cfg.task](cfg)
