"""One profile configuration: its options, their defaults and checks, and its command-line arguments."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

import torch

from ..errors import ConfigError, MissingDependencyError
from ..models.presets import ModelPreset, dtype_name, get_preset, resolve_dtype
from ..models.workload import METHODS  # one list for the profiler and the estimator
from .setting import check_for_diffusion, check_plain_layers_with, memory_setting

BACKENDS = ("slimtune", "peft", "peft-bf16")
QUANTS = ("none", "nf4")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field} must be a positive integer, got {value!r}")
    return value


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``torch.device`` for ``device`` (default: cuda when available), checking that it can be used."""
    if device is None:
        device = default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"invalid device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available "
                              f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


@dataclasses.dataclass
class ProfileOptions:
    """One profiling configuration. ``None`` fields take device-dependent defaults in :meth:`resolved`."""

    preset: str = "tiny-llama"
    method: str = "lora"
    rank: int = 16
    alpha: float | None = None
    batch: int | None = None
    seq: int = 128
    steps: int = 4
    device: str | None = None
    dtype: str | None = None
    backend: str = "slimtune"
    grad_checkpointing: bool = False
    seed: int = 0
    release_outputs: bool = False
    quant: str = "none"  # "none" | "nf4" (4-bit base weights: slimtune.quantize, or bitsandbytes for PEFT)
    model_dir: str | None = None  # a local Hugging Face model directory; replaces ``preset`` when set
    memory: str = "fast"  # "fast" | "balanced" | "max-fit" (slimtune.memory.setting; the slimtune backend)
    plain_layers: int = 0  # with balanced / max-fit: the last layers left un-checkpointed
    compile: bool = False  # each transformer layer through torch.compile (either backend)

    @property
    def model_name(self) -> str:
        """The model directory when one is given, else the preset name."""
        return self.model_dir if self.model_dir is not None else self.preset

    def resolved(self) -> "ProfileOptions":
        """A validated copy with every default filled in; :class:`ConfigError` names a bad value."""
        model_dir = self.model_dir
        if model_dir is None:
            get_preset(self.preset)
        else:
            model_dir = check_model_dir(model_dir)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.quant not in QUANTS:
            raise ConfigError(f"unknown quant {self.quant!r}; choose from {', '.join(QUANTS)}")
        if self.quant != "none" and self.method == "none":
            raise ConfigError("4-bit weights cannot be trained: --quant nf4 needs an adapter method "
                              "(e.g. --method lora)")
        setting = memory_setting(self.memory)
        if setting.checkpoint and (self.backend != "slimtune" or self.grad_checkpointing):
            raise ConfigError(f"memory={self.memory!r} is slimtune's own checkpointing: use it with the slimtune "
                              "backend and without grad_checkpointing")
        check_plain_layers_with(setting, self.plain_layers)
        diffusion = self.model_dir is None and not isinstance(get_preset(self.preset), ModelPreset)
        if self.compile and diffusion:
            raise ConfigError(f"compile applies to language models (their transformer layers), not the diffusion "
                              f"preset {self.preset!r}")
        if diffusion:
            check_for_diffusion(setting, self.plain_layers)
        _positive_int("rank", self.rank)
        alpha = self.rank if self.alpha is None else self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
        device = resolve_device(self.device)
        batch = self.batch if self.batch is not None else (4 if device.type == "cuda" else 2)
        _positive_int("batch", batch)
        _positive_int("seq", self.seq)
        _positive_int("steps", self.steps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        dtype = self.dtype if self.dtype is not None else ("bfloat16" if device.type == "cuda" else "float32")
        return dataclasses.replace(self, alpha=alpha, batch=batch, device=str(device),
                                   dtype=dtype_name(resolve_dtype(dtype)), model_dir=model_dir)

    def to_argv(self) -> list[str]:
        """``slimtune profile`` arguments that reproduce these options (the child processes get them)."""
        argv = ["--preset", self.preset, "--method", self.method, "--rank", str(self.rank),
                "--seq", str(self.seq), "--steps", str(self.steps), "--backend", self.backend,
                "--seed", str(self.seed)]
        for flag, value in (("--alpha", self.alpha), ("--batch", self.batch), ("--device", self.device),
                            ("--dtype", self.dtype)):
            if value is not None:
                argv += [flag, str(value)]
        if self.grad_checkpointing:
            argv.append("--grad-checkpointing")
        if self.release_outputs:
            argv.append("--release-outputs")
        if self.quant != "none":
            argv += ["--quant", self.quant]
        if self.model_dir is not None:
            argv += ["--model-dir", self.model_dir]
        if self.memory != "fast":
            argv += ["--memory", self.memory]
        if self.plain_layers:
            argv += ["--plain-layers", str(self.plain_layers)]
        if self.compile:
            argv.append("--compile")
        return argv


def check_model_dir(path: str) -> str:
    """``path`` as an absolute path when it is a directory holding ``config.json``; else :class:`ConfigError`."""
    import os

    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(full):
        raise ConfigError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(full, "config.json")):
        raise ConfigError(f"model directory {path!r} has no config.json (a Hugging Face model directory is needed)")
    return full


def check_dependencies(backend: str, quant: str = "none", extra: tuple[str, ...] = ()) -> None:
    """Raise :class:`MissingDependencyError` when a package the backend (and quant, model) needs is missing.

    ``extra``: further import names the model needs (``diffusers`` for a UNet preset).
    """
    peft = backend.startswith("peft")
    needed = ["transformers"] + (["peft"] if peft else []) + (["bitsandbytes"] if peft and quant != "none" else [])
    needed += [name for name in extra if name not in needed]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        hint = "pip install " + " ".join(n for n in missing if n not in ("transformers", "peft"))
        hint = "pip install 'slimtune[hf]'" if set(missing) <= {"transformers", "peft"} else hint
        raise MissingDependencyError(f"{' and '.join(missing)} not installed; install with: {hint}")
