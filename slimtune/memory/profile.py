"""Profile a few training steps of a preset model: parameters, memory after creation, peak memory, step time.

The loop follows the PEFT baseline protocol (``shared/bench/peft_baseline.py``): the model is built on the
device and cast, the adapter applied to the seven Llama projections, AdamW(lr=1e-4) on the trainable
parameters, random token ids as inputs and labels, then per step forward with labels, backward,
``opt.step()``, ``opt.zero_grad(set_to_none=True)`` and a synchronize. The step time is the median of the
steps after the first three (of all but the first when there are fewer).

Memory on CUDA is the caching allocator's own statistics (``memory_allocated`` after creation,
``max_memory_allocated`` over the steps after ``reset_peak_memory_stats``). The CPU keeps no such
statistic, so there the figures are accounted (``memory_kind = "cpu accounted"``): after creation the
bytes of parameters and buffers; the peak the largest per-step sum of parameters + buffers + gradients +
optimizer state + tensors saved for backward (see :mod:`slimtune.memory.accounting`).

Run one configuration per process, for clean peaks: ``python -m slimtune.memory.profile --json ...``
prints exactly one JSON line with the result. Options live in :mod:`.options`, the result in :mod:`.result`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, SlimtuneError
from ..models.presets import MissingDependencyError, build_model, dtype_name, get_preset
from .options import (BACKENDS, METHODS, ProfileOptions, add_profile_arguments, check_dependencies,
                      options_from_args)
from .result import (CPU_MEMORY, CUDA_MEMORY, WARMUP_STEPS, ProfileResult, device_name, is_out_of_memory,
                     median_step_time)

__all__ = ["BACKENDS", "CPU_MEMORY", "CUDA_MEMORY", "METHODS", "WARMUP_STEPS", "ProfileOptions", "ProfileResult",
           "TrainingSession", "add_profile_arguments", "apply_adapter", "check_dependencies", "device_name",
           "enable_gradient_checkpointing", "is_out_of_memory", "main", "median_step_time", "options_from_args",
           "profile_options", "profile_training"]

TOKEN_HIGH = 128000  # the protocol draws ids from [0, 128000); smaller vocabularies use their own size
LR = 1e-4

StepCallback = Callable[[int, float], None]


def _versions(backend: str) -> dict[str, str | None]:
    from .. import __version__

    versions: dict[str, str | None] = {"slimtune_version": __version__, "peft_version": None,
                                       "transformers_version": None}
    with contextlib.suppress(ImportError):
        import transformers
        versions["transformers_version"] = transformers.__version__
    if backend.startswith("peft"):
        import peft
        versions["peft_version"] = peft.__version__
    return versions


# -- the training session ---------------------------------------------------------------------------
def slimtune_config(method: str, rank: int, alpha: float, targets: list[str]):
    """slimtune's config for ``method`` with rank ``rank`` (alpha where the method has one)."""
    from .. import adapters

    if method in ("lora", "dora", "dora-recompute"):
        extra = {"use_dora": True, "dora_recompute": method == "dora-recompute"} if method != "lora" else {}
        return adapters.LoraConfig(r=rank, alpha=alpha, target_modules=targets, **extra)
    if method == "hra":
        return adapters.HraConfig(r=rank, target_modules=targets)
    if method in ("loha", "lokr"):
        config_class = getattr(adapters, "LohaConfig" if method == "loha" else "LokrConfig")
        return config_class(r=rank, alpha=alpha, target_modules=targets)
    raise ConfigError(f"unknown method {method!r}")


def peft_config(peft: Any, method: str, rank: int, alpha: float, targets: list[str]):
    """PEFT's config for the same adapter (``lora_dropout=0``)."""
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    if method in ("lora", "dora", "dora-recompute"):
        return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                               use_dora=method != "lora")
    if method == "hra":
        return peft.HRAConfig(r=rank, target_modules=targets)
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    raise ConfigError(f"unknown method {method!r}")


def apply_adapter(model: nn.Module, options: ProfileOptions) -> nn.Module:
    """The model with the configured adapter (``method="none"``: unchanged, every parameter trained)."""
    if options.method == "none":
        return model
    targets = list(get_preset(options.preset).targets)
    if options.backend == "slimtune":
        from ..inject import adapt

        return adapt(model, slimtune_config(options.method, options.rank, options.alpha, targets))
    try:
        import peft
    except ImportError as exc:
        raise MissingDependencyError(f"the {options.backend} backend needs peft ({exc}); "
                                     "install it with: pip install 'slimtune[hf]'") from None
    config = peft_config(peft, options.method, options.rank, options.alpha, targets)
    return peft.get_peft_model(model, config, autocast_adapter_dtype=options.backend == "peft")


def enable_gradient_checkpointing(model: nn.Module, adapted: bool) -> None:
    """transformers' non-reentrant checkpointing, as the protocol's ``GC=1`` (newer name when present)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if adapted:
        model.enable_input_require_grads()


class TrainingSession:
    """A built, adapted model with its optimizer and inputs, ready to :meth:`run` the profiled steps.

    Use :meth:`prepare` to build; splitting setup from the measured loop lets a runner set up several
    processes at once and then run their loops one after another.
    """

    def __init__(self, options: ProfileOptions, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 trainable: list[nn.Parameter], input_ids: torch.Tensor, mem_created: int) -> None:
        self.options = options
        self.model = model
        self.optimizer = optimizer
        self.trainable = trainable
        self.input_ids = input_ids
        self.mem_created = mem_created
        self.device = torch.device(options.device)

    @classmethod
    def prepare(cls, options: ProfileOptions) -> "TrainingSession":
        """Build the model on the device, adapt it, make the optimizer and the token ids."""
        options = options.resolved()
        check_dependencies(options.backend)
        device = torch.device(options.device)
        model = build_model(options.preset, device, options.dtype, seed=options.seed)
        model = apply_adapter(model, options)
        if options.grad_checkpointing:
            enable_gradient_checkpointing(model, adapted=options.method != "none")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LR) if trainable else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            mem_created = torch.cuda.memory_allocated(device)
        else:
            from .accounting import module_state_bytes
            mem_created = module_state_bytes(model)
        vocab = get_preset(options.preset).vocab_size
        generator = torch.Generator(device=device).manual_seed(options.seed + 1)
        input_ids = torch.randint(0, min(vocab, TOKEN_HIGH), (options.batch, options.seq), device=device,
                                  generator=generator)
        return cls(options, model, optimizer, trainable, input_ids, mem_created)

    def _base_result(self) -> ProfileResult:
        model = self.model
        return ProfileResult.for_options(
            self.options, device_name=device_name(self.device),
            memory_kind=CUDA_MEMORY if self.device.type == "cuda" else CPU_MEMORY,
            params_total=sum(p.numel() for p in model.parameters()),
            params_trainable=sum(p.numel() for p in self.trainable), mem_created_bytes=self.mem_created,
            **_versions(self.options.backend))

    def run(self, on_step: StepCallback | None = None) -> ProfileResult:
        """Run the profiled steps; an out-of-memory error gives ``status="OOM"`` rather than raising."""
        from .accounting import SavedTensorMeter, gradient_bytes, module_state_bytes, optimizer_state_bytes

        result = self._base_result()
        model, opt, ids, cuda = self.model, self.optimizer, self.input_ids, self.device.type == "cuda"
        meter = None if cuda else SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()])
        static = 0 if cuda else module_state_bytes(model)
        breakdown: dict[str, int] = {}
        accounted_peak = 0
        times: list[float] = []
        losses: list[torch.Tensor] = []
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for step in range(self.options.steps):
                t0 = time.perf_counter()
                with meter.record() if meter is not None else contextlib.nullcontext():
                    out = model(input_ids=ids, labels=ids)  # `out` lives on into the next step, as in the protocol
                loss = out.loss
                if self.options.release_outputs:  # drop the logits before backward, as a lean training loop does
                    del out
                loss.backward()
                grads = 0 if cuda else gradient_bytes(self.trainable)
                if opt is not None:
                    opt.step()
                    opt_state = 0 if cuda else optimizer_state_bytes(opt)
                    opt.zero_grad(set_to_none=True)
                else:
                    opt_state = 0
                if cuda:
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
                losses.append(loss.detach())
                del loss
                if meter is not None:
                    total = static + grads + opt_state + meter.bytes
                    if total > accounted_peak:
                        accounted_peak = total
                        breakdown = dict(params_buffers=static, gradients=grads, optimizer_state=opt_state,
                                         saved_activations=meter.bytes)
                if on_step is not None:
                    on_step(step + 1, times[-1])
        except Exception as exc:  # noqa: BLE001 - only allocation failures are turned into a status
            if not is_out_of_memory(exc):
                raise
            result.status, result.error = "OOM", str(exc).splitlines()[0][:300]
        result.step_times_s = [round(t, 6) for t in times]
        median = median_step_time(times)
        result.step_time_s = round(median, 6) if median is not None and result.ok else None
        result.losses = [round(float(v), 6) for v in losses]
        result.final_loss = result.losses[-1] if result.losses else None
        if cuda:
            result.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            result.peak_bytes = max(accounted_peak, static)
            result.cpu_breakdown = breakdown or None
        return result


def profile_options(options: ProfileOptions, on_step: StepCallback | None = None,
                    on_prepared: Callable[[TrainingSession], None] | None = None) -> ProfileResult:
    """Profile one configuration in this process (an OOM while building gives ``status="OOM"`` too).

    ``on_prepared(session)`` is called once the model is built, before the measured steps.
    """
    options = options.resolved()
    try:
        session = TrainingSession.prepare(options)
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        return _oom_before_steps(options, exc)
    if on_prepared is not None:
        on_prepared(session)
    return session.run(on_step)


def _oom_before_steps(options: ProfileOptions, exc: BaseException) -> ProfileResult:
    device = torch.device(options.device)
    result = ProfileResult.for_options(options, status="OOM", error=str(exc).splitlines()[0][:300],
                                       device_name=device_name(device),
                                       memory_kind=CUDA_MEMORY if device.type == "cuda" else CPU_MEMORY)
    if device.type == "cuda":
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
    return result


def profile_training(preset: str = "tiny-llama", method: str = "lora", rank: int = 16, alpha: float | None = None,
                     batch: int | None = None, seq: int = 128, steps: int = 4, device: str | None = None,
                     dtype: str | torch.dtype | None = None, backend: str = "slimtune",
                     grad_checkpointing: bool = False, seed: int = 0,
                     on_step: StepCallback | None = None) -> ProfileResult:
    """Train ``steps`` steps of a preset model and measure it (see the module docstring).

    ``method``: ``"lora"`` or ``"none"`` (full fine-tune). ``backend``: ``"slimtune"``, ``"peft"`` (PEFT as
    users get it: adapter weights upcast to float32) or ``"peft-bf16"`` (``autocast_adapter_dtype=False``).
    ``alpha`` defaults to ``rank``; ``batch``, ``device`` and ``dtype`` default to 4 / cuda / bfloat16 when
    CUDA is available, else 2 / cpu / float32. ``on_step(step, seconds)`` is called after every step.
    """
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    options = ProfileOptions(preset=preset, method=method, rank=rank, alpha=alpha, batch=batch, seq=seq,
                             steps=steps, device=device, dtype=dtype, backend=backend,
                             grad_checkpointing=grad_checkpointing, seed=seed)
    return profile_options(options, on_step)


def format_plain(result: ProfileResult) -> str:
    """``key: value`` lines (the runner's output without ``--json``)."""
    return "\n".join(f"{key}: {value}" for key, value in result.to_dict().items())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slimtune.memory.profile [--json] OPTIONS``: profile one configuration in this process.

    With ``--json`` stdout holds exactly one JSON line (everything else the run prints goes to stderr).
    Exit status: 0 ok, 1 OOM or failure, 2 bad options. ``--wait`` (used by
    :mod:`slimtune.memory.subproc`) prints ``ready`` after the setup and runs the steps only once a
    ``go`` line arrives on stdin.
    """
    parser = argparse.ArgumentParser(prog="python -m slimtune.memory.profile",
                                     description="Profile training steps of one configuration.")
    add_profile_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = sys.stdout
    options = options_from_args(args)

    def emit(result: ProfileResult) -> None:
        text = json.dumps(result.to_dict()) if args.json else format_plain(result)
        print(text, file=out, flush=True)

    def wait_for_go() -> bool:
        if not args.wait:
            return True
        print("ready", file=out, flush=True)
        return sys.stdin.readline().strip() == "go"

    with contextlib.redirect_stdout(sys.stderr):
        try:
            options = options.resolved()
            check_dependencies(options.backend)
        except SlimtuneError as exc:
            if not wait_for_go():
                return 3
            emit(ProfileResult.for_options(options, status="error", error=str(exc)))
            return 2
        try:
            session: TrainingSession | None = TrainingSession.prepare(options)
            result = None
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            session, result = None, _oom_before_steps(options, exc)
        if not wait_for_go():
            return 3
        if session is not None:
            result = session.run()
    emit(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
