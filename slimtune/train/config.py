"""One training run's settings (:class:`TrainConfig`): defaults, checks, and what a resumed run must keep.

Every value is checked by :meth:`TrainConfig.resolved` before any work, with an error that names the setting.
Batches are counted in samples (rows after packing): ``batch`` is the *global* batch of one optimizer step, the
same whatever the number of processes; ``micro_batch`` is what one process puts through the model at once, so
gradient accumulation is ``batch / (micro_batch x processes)`` micro-steps per optimizer step.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..core.config import check_number
from ..core.timed import CRITERIA
from ..errors import ConfigError
from ..memory.options import check_model_dir
from ..memory.recompute import check_plain_layers
from ..memory.setting import check_for_diffusion, memory_setting
from ..models.diffusion import denoiser_directory
from ..models.presets import PRESETS, dtype_name, get_preset, resolve_dtype
from ..models.workload import METHODS
from ..ranks import parse_budget

TASKS = ("causal-lm", "classification", "diffusion")
QUANTS = ("none", "nf4")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
#: adapter methods ``slimtune train`` trains (the workload's methods less ``none``, the full fine-tune)
TRAIN_METHODS = tuple(m for m in METHODS if m != "none")
#: settings a resumed run may change: how it runs, not what it computes (the data, eval data and rank files are
#: compared by content instead of by path: see :mod:`.rundir`)
RESUMABLE_CHANGES = ("out", "data", "eval_data", "ranks", "micro_batch", "distributed", "save_every", "keep",
                     "log_every", "eval_every", "resume", "device", "grad_checkpointing", "memory", "plain_layers",
                     "compile")


def _positive_int(field: str, value: Any, zero: bool = False) -> int:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if zero else "a positive"
        raise ConfigError(f"{field} must be {kind} integer, got {value!r}")
    return value


def _existing_file(field: str, path: str | None) -> str | None:
    if path is None:
        return None
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise ConfigError(f"{field} {path}: no such file")
    if not os.path.isfile(full):
        raise ConfigError(f"{field} {path} is not a file")
    return full


@dataclasses.dataclass
class TrainConfig:
    """The settings of ``slimtune train`` (see ``slimtune train --help`` for each)."""

    out: str
    data: str | None = None
    model_dir: str | None = None
    preset: str | None = None
    task: str = "causal-lm"
    method: str = "lora"
    rank: int = 16
    alpha: float | None = None
    targets: list[str] | None = None  # module-name suffixes; None: the preset's / "all-linear" for a directory
    ranks: str | None = None  # a JSON rank_pattern file, or "auto"
    rank_budget: str | None = None  # with ranks="auto": adapter parameters ("12M") or bytes ("48MB")
    quant: str = "none"
    adapter_dtype: str | None = None  # None: the base weights' dtype; "float32": fp32 master weights
    seq: int | None = None  # tokens per row (packing block); None: min(model context, 1024)
    truncate: bool = False
    pack: bool | None = None  # None: on for causal-lm
    eval_data: str | None = None
    eval_fraction: float = 0.0
    batch: int = 8
    micro_batch: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    grad_checkpointing: bool = False
    memory: str = "fast"  # "fast" | "balanced" | "max-fit" (slimtune.memory.setting)
    plain_layers: int | str = 0  # with balanced / max-fit: the last layers left un-checkpointed; "auto": what fits
    compile: bool = False  # torch.compile each transformer layer (regional compilation)
    capture: bool = False  # each optimizer step replayed as one CUDA graph (slimtune.capture_step)
    variant_criterion: str = "flops"  # how the layers' forward/backward variants are chosen (slimtune.core.timed)
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    eval_every: int = 0
    save_every: int = 100
    keep: int = 2
    log_every: int = 1
    resume: bool = False
    distributed: str = "auto"

    # -- checks -------------------------------------------------------------------------------------
    def resolved(self, cuda: bool) -> "TrainConfig":
        """A checked copy with defaults filled in (``cuda``: whether training runs on a GPU); nothing is read
        but the paths' existence."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if (self.model_dir is None) == (self.preset is None):
            raise ConfigError("give exactly one of --model DIR (a Hugging Face model directory) and --preset NAME")
        model_dir = self.model_dir
        if model_dir is not None and self.task == "diffusion":
            model_dir = denoiser_directory(str(model_dir))  # a pipeline directory: its unet/ or transformer/
        model_dir = check_model_dir(model_dir) if model_dir is not None else None
        if self.preset is not None:
            get_preset(self.preset)
            if self.task == "classification":
                raise ConfigError("--task classification needs a pretrained encoder: give --model DIR "
                                  f"(presets {', '.join(PRESETS)} have no classification head)")
        diffusion = self.task == "diffusion"
        if diffusion and self.data is not None and os.path.isdir(os.path.expanduser(self.data)):
            data = os.path.abspath(os.path.expanduser(self.data))  # a folder of latents files (encode --shard-rows)
        else:
            data = _existing_file("--data", self.data)
        if data is None and not diffusion:
            raise ConfigError(f"--data FILE.jsonl is required for --task {self.task}")
        if data is not None and diffusion and not (os.path.isdir(data) or data.endswith(".safetensors")):
            raise ConfigError(f"--task diffusion reads precomputed latents and text embeddings from a .safetensors "
                              f"file or a folder of them (see slimtune.train.latents), got --data {data}")
        if self.method not in TRAIN_METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(TRAIN_METHODS)}")
        _positive_int("--rank", self.rank)
        alpha = float(self.rank if self.alpha is None else check_number("--alpha", self.alpha, 0.0, low_open=True))
        ranks = self.ranks if self.ranks in (None, "auto") else _existing_file("--ranks", self.ranks)
        if self.rank_budget is not None:
            if ranks != "auto":
                raise ConfigError("--rank-budget goes with --ranks auto")
            parse_budget(self.rank_budget)
        if self.quant not in QUANTS:
            raise ConfigError(f"unknown quant {self.quant!r}; choose from {', '.join(QUANTS)}")
        if self.targets is not None and not [t for t in self.targets if t]:
            raise ConfigError("--targets is empty")
        dtype = dtype_name(resolve_dtype(self.dtype if self.dtype is not None else
                                         ("bfloat16" if cuda else "float32")))
        adapter_dtype = None if self.adapter_dtype is None else dtype_name(resolve_dtype(self.adapter_dtype))
        if self.seq is not None:
            _positive_int("--seq", self.seq)
        eval_data = _existing_file("--eval-data", self.eval_data)
        fraction = check_number("--eval-fraction", self.eval_fraction, 0.0, 0.5)
        if eval_data is not None and fraction:
            raise ConfigError("give either --eval-data or --eval-fraction, not both")
        if self.eval_every and eval_data is None and not fraction:
            raise ConfigError("--eval-every needs held-out data: give --eval-data or --eval-fraction")
        if self.task == "diffusion" and (eval_data is not None or fraction):
            raise ConfigError("--task diffusion has no held-out evaluation (its samples are an endless stream with "
                              "fresh noise): drop --eval-data / --eval-fraction")
        _positive_int("--batch", self.batch)
        if self.micro_batch is not None:
            _positive_int("--micro-batch", self.micro_batch)
        check_number("--lr", self.lr, 0.0, low_open=True)
        check_number("--weight-decay", self.weight_decay, 0.0)
        _positive_int("--warmup-steps", self.warmup_steps, zero=True)
        check_number("--max-grad-norm", self.max_grad_norm, 0.0)
        check_number("--epochs", self.epochs, 0.0, low_open=True)
        if self.max_steps is not None:
            _positive_int("--max-steps", self.max_steps)
        elif diffusion:
            raise ConfigError("--task diffusion counts steps, not epochs (its samples are an endless stream): give "
                              "--max-steps")
        _positive_int("--seed", self.seed, zero=True)
        for field in ("eval_every", "save_every", "log_every"):
            _positive_int(f"--{field.replace('_', '-')}", getattr(self, field), zero=field != "log_every")
        _positive_int("--keep", self.keep)
        if self.distributed not in DISTRIBUTED:
            raise ConfigError(f"unknown --distributed {self.distributed!r}; choose from {', '.join(DISTRIBUTED)}")
        if self.plain_layers == "auto":
            if self.task != "causal-lm":
                raise ConfigError("--plain-layers auto fits a causal language model's layers to the GPU (use a "
                                  f"number for --task {self.task})")
        else:
            check_plain_layers(self.plain_layers)
        if self.compile and diffusion:
            raise ConfigError("--compile compiles a transformer's layers (causal-lm, classification), not a "
                              "diffusion model")
        if self.variant_criterion not in CRITERIA:
            raise ConfigError(f"unknown --variant-criterion {self.variant_criterion!r}; choose from "
                              f"{', '.join(CRITERIA)}")
        setting = memory_setting(self.memory, "--memory")
        if self.task == "diffusion":
            check_for_diffusion(setting, self.plain_layers, "--memory")
        if setting.checkpoint:
            if self.grad_checkpointing:
                raise ConfigError(f"--memory {self.memory} already checkpoints every layer: drop --grad-ckpt")
        elif self.plain_layers:
            raise ConfigError(f"--plain-layers {self.plain_layers} needs --memory balanced or max-fit (--memory "
                              f"{self.memory} checkpoints no layer)")
        pack = (self.task == "causal-lm") if self.pack is None else self.pack
        if pack and self.task != "causal-lm":
            raise ConfigError(f"--pack applies to --task causal-lm, not {self.task}")
        if self.capture:
            self._check_capture(pack, setting.checkpoint)
        return dataclasses.replace(self, out=str(Path(self.out).expanduser().absolute()), data=data,
                                   model_dir=model_dir, alpha=alpha, ranks=ranks, dtype=dtype,
                                   adapter_dtype=adapter_dtype, eval_data=eval_data, eval_fraction=fraction,
                                   pack=pack)

    def _check_capture(self, pack: bool, checkpointed: bool) -> None:
        """``--capture`` replays one CUDA graph with static shapes (:func:`slimtune.capture_step`): what it cannot
        hold is refused before any work (the device, the processes and the micro-batches:
        :func:`~slimtune.train.run.check_capture_run`)."""
        if self.task == "classification":
            raise ConfigError("--capture replays one step of fixed shapes; classification rows vary in length")
        if self.task == "causal-lm" and not pack:
            raise ConfigError("--capture replays one step of fixed shapes: --task causal-lm needs --pack (rows of "
                              "--seq tokens)")
        if self.compile:
            raise ConfigError("--capture and --compile: give one (a compiled step is not captured here)")
        if self.grad_checkpointing or checkpointed:
            raise ConfigError("--capture is for steps short enough to be host-bound: it runs --memory fast without "
                              "--grad-ckpt (recomputed layers are not captured)")
        if self.variant_criterion != "flops":
            raise ConfigError("--capture and --variant-criterion timed: the timed criterion measures eager steps")

    @property
    def model_name(self) -> str:
        return self.model_dir if self.model_dir is not None else str(self.preset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changes_from(self, recorded: dict[str, Any]) -> list[str]:
        """``"field: recorded -> now"`` for every setting that differs from a recorded run's and that a resumed
        run must keep (everything but :data:`RESUMABLE_CHANGES`)."""
        now = self.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        # a setting added since the run was recorded: it had that setting's default
        return [f"{key}: {recorded.get(key, defaults.get(key))!r} -> {value!r}" for key, value in now.items()
                if key not in RESUMABLE_CHANGES and recorded.get(key, defaults.get(key)) != value]
