"""What a profile run measured, and the rules that turn raw measurements into it."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
from typing import Any, Sequence

import torch

from .options import ProfileOptions

CUDA_MEMORY = "cuda allocator"
CPU_MEMORY = "cpu accounted"
WARMUP_STEPS = 3

#: Keys of :attr:`ProfileResult.breakdown`, bytes, in stacking order. ``temporary`` is the CUDA allocator's
#: peak minus the other parts (short-lived buffers: casts, dequantised weights, kernel workspaces, the
#: backward's transient gradients, the optimizer's scratch; also anything unaccounted, such as the previous
#: step's outputs the protocol keeps); the CPU keeps no peak statistic, so there it is ``None``.
BREAKDOWN_KEYS: tuple[str, ...] = ("base_weights", "adapter_weights", "gradients", "optimizer_state", "activations",
                                   "temporary")


# -- result -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ProfileResult:
    """What a profile run measured. Memory in bytes, times in seconds; ``None`` where not measured."""

    backend: str
    method: str
    preset: str
    rank: int | None
    alpha: float | None
    batch: int
    seq: int
    steps: int
    dtype: str
    device: str
    grad_checkpointing: bool
    release_outputs: bool
    status: str = "ok"  # "ok" | "OOM" | "error" | "timeout"
    error: str | None = None
    device_name: str = ""
    memory_kind: str = ""
    params_total: int | None = None
    params_trainable: int | None = None
    mem_created_bytes: int | None = None
    peak_bytes: int | None = None
    step_time_s: float | None = None
    step_times_s: list[float] = dataclasses.field(default_factory=list)
    final_loss: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    cpu_breakdown: dict[str, int] | None = None
    torch_version: str = torch.__version__
    transformers_version: str | None = None
    peft_version: str | None = None
    slimtune_version: str | None = None
    # -- added with the memory breakdown (issue 7); every field above keeps its meaning --------------
    quant: str = "none"
    model_dir: str | None = None
    device_memory_bytes: int | None = None  # total memory of the device (CUDA: the GPU's; CPU: physical RAM)
    mem_after_step_bytes: int | None = None  # held after the first step (CUDA: allocated; CPU: accounted)
    peak_first_step_bytes: int | None = None  # peak during the first step (what a GPU monitor shows after it)
    reserved_peak_bytes: int | None = None  # CUDA caching allocator's reserved peak (nvidia-smi, less context)
    breakdown: dict[str, int | None] | None = None  # BREAKDOWN_KEYS at the peak step; sums to peak_bytes on CUDA
    activations_by_module: dict[str, int] | None = None  # accounting.ACTIVATION_KINDS -> bytes saved for backward
    setup_time_s: float | None = None  # building, quantising and adapting the model
    memory: str = "fast"  # the memory setting (slimtune.memory.setting)
    plain_layers: int = 0  # with balanced / max-fit: the last layers left un-checkpointed
    compile: bool = False  # the transformer layers through torch.compile

    @classmethod
    def for_options(cls, options: ProfileOptions, **fields: Any) -> "ProfileResult":
        """A result carrying ``options``' identifying fields (and ``fields``)."""
        adapted = options.method != "none"
        return cls(backend=options.backend, method=options.method, preset=options.model_name,
                   rank=options.rank if adapted else None, alpha=options.alpha if adapted else None,
                   batch=options.batch or 0, seq=options.seq, steps=options.steps, dtype=options.dtype or "",
                   device=options.device or "", grad_checkpointing=options.grad_checkpointing,
                   release_outputs=options.release_outputs, quant=getattr(options, "quant", "none"),
                   model_dir=getattr(options, "model_dir", None), memory=getattr(options, "memory", "fast"),
                   plain_layers=getattr(options, "plain_layers", 0), compile=getattr(options, "compile", False),
                   **fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProfileResult":
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def label(self) -> str:
        """``"llama-7b lora+nf4 r16 · peft"``: model, method, quant, rank and backend in a few words."""
        quant = f"+{self.quant}" if self.quant != "none" else ""
        method = "full FT" if self.method == "none" else f"{self.method}{quant}"
        rank = f" r{self.rank}" if self.rank is not None else ""
        gc = " +GC" if self.grad_checkpointing else ""
        gc += f" memory={self.memory}" if self.memory != "fast" else ""
        gc += f" plain={self.plain_layers}" if self.plain_layers else ""
        gc += " compiled" if self.compile else ""
        name = self.preset.rstrip("/").rsplit("/", 1)[-1]
        return f"{name} {method}{rank}{gc} · {self.backend}"


def median_step_time(times: Sequence[float], warmup: int = WARMUP_STEPS) -> float | None:
    """Median of the steps after the first ``warmup`` (of all but the first when there are fewer)."""
    if not times:
        return None
    if len(times) > warmup:
        return statistics.median(times[warmup:])
    return statistics.median(times[1:] if len(times) > 1 else times)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's OutOfMemoryError or the CPU allocator's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def device_memory(device: torch.device) -> int | None:
    """Total bytes of memory of ``device``: the GPU's, or the machine's physical RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` on CUDA; the CPU model and thread count on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    model = model or "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"
