"""Profile a few training steps of a preset model: parameters, memory after creation, peak memory, step time.

The loop follows the PEFT baseline protocol (``shared/bench/peft_baseline.py``): the model is built on the
device and cast, the adapter applied to the seven Llama projections, AdamW(lr=1e-4) on the trainable
parameters, random token ids as inputs and labels, then per step forward with labels, backward,
``opt.step()``, ``opt.zero_grad(set_to_none=True)`` and a synchronize. The step time is the median of the
steps after the first three (of all but the first when there are fewer).

Memory on CUDA is the caching allocator's own statistics (``memory_allocated`` after creation and after
the first step, ``max_memory_allocated`` over the first step and over all steps after
``reset_peak_memory_stats``). The CPU keeps no such statistic, so there the figures are accounted
(``memory_kind = "cpu accounted"``): after creation the bytes of parameters and buffers; the peak the
largest per-step sum of parameters + buffers + gradients + optimizer state + tensors saved for backward
(see :mod:`slimtune.memory.accounting`).

On both devices the first steps (up to ``WARMUP_STEPS``, so the timed steps run without hooks) are also
accounted part by part (``ProfileResult.breakdown``): base weights, adapter weights, gradients, optimizer
state, activations saved for backward (split by module kind in ``activations_by_module``) and, on CUDA
only, the temporary rest of the allocator's peak.

Models: the Llama/OPT presets and local Hugging Face causal-LM directories (``model_dir``) are built
here; other preset families (diffusion UNets, DiTs) through :mod:`slimtune.models.workload`.
``quant="nf4"`` stores the base weights in 4 bits before the adapter is applied: ``slimtune.quantize``
for the slimtune backend, bitsandbytes ``Linear4bit`` (what PEFT's QLoRA uses) for the PEFT backends.

Run one configuration per process, for clean peaks: :mod:`.subproc` starts ``python -m slimtune profile-child``
processes, each printing exactly one JSON line with the result. Options live in :mod:`.options`, the result in
:mod:`.result`.
"""
from __future__ import annotations

import contextlib
import glob
import os
import time
from types import ModuleType
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.inject import adapt
from ..errors import ConfigError, MissingDependencyError
from ..models import workload
from ..models.deps import require_transformers
from ..models.diffusion import training_attention
from ..models.layers import compile_layers
from ..models.presets import build_model, dtype_name, get_preset, resolve_dtype
from ..quant import quantize
from ..version import __version__
from .chunked_loss import model_causal_lm_loss, plain_head
from .accounting import SavedTensorMeter, gradient_bytes, module_state_bytes, optimizer_state_bytes, storage_bytes
from .options import BACKENDS, METHODS, QUANTS, ProfileOptions, check_dependencies
from .setting import apply_memory_setting, memory_setting
from .result import (CPU_MEMORY, CUDA_MEMORY, WARMUP_STEPS, ProfileResult, device_memory, device_name, is_out_of_memory,
                     median_step_time)

__all__ = ["BACKENDS", "CPU_MEMORY", "CUDA_MEMORY", "METHODS", "QUANTS", "WARMUP_STEPS", "ProfileOptions",
           "ProfileResult", "TrainingSession", "apply_adapter", "bnb_quantize_linears", "build_base_model",
           "check_dependencies", "device_name", "enable_gradient_checkpointing", "is_out_of_memory",
           "median_step_time", "profile_options", "profile_training", "quantize_base"]

TOKEN_HIGH = 128000  # the protocol draws ids from [0, 128000); smaller vocabularies use their own size
LR = 1e-4
LLM_FAMILIES = ("llama", "opt")  # language-model preset families (the others are diffusion models)

StepCallback = Callable[[int, float], None]


def _versions(backend: str) -> dict[str, str | None]:

    versions: dict[str, str | None] = {"slimtune_version": __version__, "peft_version": None,
                                       "transformers_version": None}
    with contextlib.suppress(ImportError):
        import transformers
        versions["transformers_version"] = transformers.__version__
    if backend.startswith("peft"):
        import peft
        versions["peft_version"] = peft.__version__
    return versions


# -- the model: presets (slimtune.models.workload) and local directories ----------------------------
def model_family(options: ProfileOptions) -> str:
    """``"hf-dir"`` for a model directory, else the preset's family (``"llama"``, ``"opt"``, ``"unet"``, ``"dit"``)."""
    if options.model_dir is not None:
        return "hf-dir"
    return getattr(get_preset(options.preset), "family", "llama")


def is_language_model(options: ProfileOptions) -> bool:
    """Whether the model is a causal LM trained on token ids with ``model(input_ids, labels)``."""
    return model_family(options) in ("hf-dir", *LLM_FAMILIES)


def workload_module() -> ModuleType:
    """:mod:`slimtune.models.workload`: inputs, loss, targets and checkpointing of every preset."""
    return workload


def model_dependencies(options: ProfileOptions) -> tuple[str, ...]:
    """Import names the model needs beyond transformers (``diffusers`` for the diffusion presets)."""
    return () if is_language_model(options) else ("diffusers",)


def has_weights(path: str) -> bool:
    """Whether a model directory holds weight files (safetensors or PyTorch .bin)."""
    return any(glob.glob(os.path.join(path, pattern))
               for pattern in ("*.safetensors", "pytorch_model*.bin", "model*.bin"))


def build_from_dir(path: str, device: str | torch.device, dtype: str | torch.dtype, seed: int = 0) -> nn.Module:
    """The causal LM of a local Hugging Face directory on ``device`` in ``dtype``: its weights when the
    directory has them (``*.safetensors`` / ``pytorch_model*.bin``), else a random init from ``config.json``
    (seeded with ``torch.manual_seed(seed)``, built on the device, then cast, as the presets are)."""
    transformers = require_transformers()
    torch_dtype = resolve_dtype(dtype)
    torch.manual_seed(seed)
    if has_weights(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        return model.to(device=device, dtype=torch_dtype)
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(torch_dtype)


def build_base_model(options: ProfileOptions) -> nn.Module:
    """The unadapted model of ``options`` (resolved) on its device, in its dtype, seeded."""
    if options.model_dir is not None:
        return build_from_dir(options.model_dir, options.device, options.dtype, options.seed)
    return build_model(options.preset, options.device, options.dtype, seed=options.seed)


def adapter_targets(options: ProfileOptions) -> list[str] | str:
    """What the adapter targets: ``"all-linear"`` for a model directory, else the workload's default for the
    preset and method (an LLM's projections — ``locon`` the same, LLMs have no convolutions; a UNet's
    attention Linears, plus its convolutions for LoCon/LoHa/LoKr)."""
    if options.model_dir is not None:
        return "all-linear"
    method = "dora" if options.method == "dora-recompute-unshared" else options.method  # same targets as dora
    return workload_module().default_targets(options.preset, method)


def trained_module(model: nn.Module, options: ProfileOptions) -> nn.Module:
    """The part of the model that is adapted and quantised: a diffusion model's denoiser, else the model."""
    if is_language_model(options):
        return model
    return getattr(model, "denoiser", model)


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def bnb_quantize_linears(model: nn.Module, compute_dtype: torch.dtype, skip: Sequence[nn.Module] = ()) -> int:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip``) by bitsandbytes' ``Linear4bit``: NF4 with double
    quantisation (``compress_statistics``), compute in ``compute_dtype`` — the layers transformers'
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
    makes, so PEFT's QLoRA sees them. Each layer is quantised on its weight's device as it is replaced
    (bitsandbytes quantises on ``.to(device)``). Returns the number of layers replaced.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MissingDependencyError(f"PEFT's QLoRA baseline needs bitsandbytes ({exc}); "
                                     "install it with: pip install bitsandbytes") from None
    skipped = {id(m) for m in skip}
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and id(m) not in skipped]
    for name in names:
        linear = model.get_submodule(name)
        device = linear.weight.device
        quant = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        quant.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=quant)
        if linear.bias is not None:
            quant.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        quant = quant.to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quant)
        del linear
    return len(names)


def quantize_base(model: nn.Module, options: ProfileOptions) -> nn.Module:
    """``options.quant == "nf4"``: the base weights in 4 bits, before the adapter goes in.

    slimtune: ``slimtune.quantize(part, "nf4", compute_dtype=dtype)``; PEFT backends: bitsandbytes
    ``Linear4bit`` (:func:`bnb_quantize_linears`, output embeddings kept dense as transformers does).
    ``part`` is :func:`trained_module` (an LLM, or a diffusion model's UNet).
    """
    if options.quant == "none":
        return model
    dtype = resolve_dtype(options.dtype)
    part = trained_module(model, options)
    if options.backend == "slimtune":
        quantize(part, "nf4", compute_dtype=dtype)
    else:
        out = _output_embeddings(part)
        bnb_quantize_linears(part, dtype, skip=[out] if out is not None else [])
    if options.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


# -- the training session ---------------------------------------------------------------------------
def slimtune_config(method: str, rank: int, alpha: float, targets: list[str] | str):
    """slimtune's config for ``method`` with rank ``rank`` (alpha where the method has one); the estimator's
    :func:`slimtune.models.workload.make_adapter_config`. ``locon`` is LoRA whose targets include convolutions."""
    return workload.make_adapter_config(method, rank, alpha, targets)


def peft_config(peft: Any, method: str, rank: int, alpha: float, targets: list[str] | str):
    """PEFT's config for the same adapter (``lora_dropout=0``; ``locon``: LoRA, conv targets included)."""
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    if method in ("lora", "locon", "dora", "dora-recompute", "dora-recompute-unshared"):
        return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                               use_dora=method.startswith("dora"))
    if method == "hra":
        return peft.HRAConfig(r=rank, target_modules=targets)
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    raise ConfigError(f"unknown method {method!r}")


def apply_adapter(model: nn.Module, options: ProfileOptions, part: nn.Module | None = None) -> nn.Module:
    """The model with the configured adapter (``method="none"``: unchanged, every parameter trained).

    ``part``: the submodule to adapt (default: the whole model); PEFT injects its layers into it in place,
    and its wrapper is returned only when ``part`` is the model.
    """
    if options.method == "none":
        return model
    part = model if part is None else part
    targets = adapter_targets(options)
    if options.backend == "slimtune":
        adapted = adapt(part, slimtune_config(options.method, options.rank, options.alpha, targets))
        return adapted if part is model else model
    try:
        import peft
    except ImportError as exc:
        raise MissingDependencyError(f"the {options.backend} backend needs peft ({exc}); "
                                     "install it with: pip install 'slimtune[hf]'") from None
    config = peft_config(peft, options.method, options.rank, options.alpha, targets)
    wrapped = peft.get_peft_model(part, config, autocast_adapter_dtype=options.backend == "peft")
    return wrapped if part is model else model


def enable_gradient_checkpointing(model: nn.Module, adapted: bool) -> None:
    """transformers' non-reentrant checkpointing, as the protocol's ``GC=1`` (newer name when present);
    diffusers' ``enable_gradient_checkpointing`` for its models."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers (non-reentrant by default)
        model.enable_gradient_checkpointing()
    else:
        raise ConfigError(f"{type(model).__name__} has no gradient checkpointing switch")
    if adapted and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


class TrainingSession:
    """A built, adapted model with its optimizer and inputs, ready to :meth:`run` the profiled steps.

    Use :meth:`prepare` to build; splitting setup from the measured loop lets a runner set up several
    processes at once and then run their loops one after another.
    """

    def __init__(self, options: ProfileOptions, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 trainable: list[nn.Parameter], inputs: dict[str, Any], mem_created: int,
                 setup_time_s: float | None = None) -> None:
        self.options = options
        self.model = model
        self.optimizer = optimizer
        self.trainable = trainable
        self.inputs = inputs  # an LM's {"input_ids", "labels"} (one tensor); a denoiser's inputs and target
        self.mem_created = mem_created
        self.setup_time_s = setup_time_s
        self.device = torch.device(options.device)
        self.attention = training_attention(model, self.device)  # the step's SDPA backends (a DiT's on CUDA)

    @property
    def input_ids(self) -> torch.Tensor | None:
        """A language model's token ids (``None`` for a diffusion model)."""
        return self.inputs.get("input_ids")

    @classmethod
    def prepare(cls, options: ProfileOptions) -> "TrainingSession":
        """Build the model on the device, quantise and adapt it, make the optimizer and the inputs."""
        t0 = time.perf_counter()
        options = options.resolved()
        check_dependencies(options.backend, options.quant, model_dependencies(options))
        device = torch.device(options.device)
        model = build_base_model(options)
        part = trained_module(model, options)
        if part is not model:  # only the trained part learns (a diffusion model's text encoder stays frozen)
            inside = {id(p) for p in part.parameters()}
            for param in model.parameters():
                if id(param) not in inside:
                    param.requires_grad_(False)
        model = quantize_base(model, options)
        part = trained_module(model, options)
        model = apply_adapter(model, options, part)
        if options.grad_checkpointing:
            if options.model_dir is not None:
                enable_gradient_checkpointing(model, adapted=options.method != "none")
            else:
                workload_module().enable_gradient_checkpointing(options.preset, model, adapted=options.method != "none")
        if options.compile:
            compile_layers(model)
        apply_memory_setting(model, options.memory, plain_layers=options.plain_layers)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LR) if trainable else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            mem_created = torch.cuda.memory_allocated(device)
        else:
            mem_created = module_state_bytes(model)
        generator = torch.Generator(device=device).manual_seed(options.seed + 1)
        if options.model_dir is not None:
            vocab = model.get_input_embeddings().num_embeddings
            ids = torch.randint(0, min(vocab, TOKEN_HIGH), (options.batch, options.seq), device=device,
                                generator=generator)
            inputs: dict[str, Any] = {"input_ids": ids, "labels": ids}
        else:
            inputs = workload_module().make_inputs(options.preset, model, options.batch, options.seq, device,
                                                   options.dtype, generator)
        return cls(options, model, optimizer, trainable, inputs, mem_created,
                   setup_time_s=round(time.perf_counter() - t0, 3))

    def _base_result(self) -> ProfileResult:
        model = self.model
        return ProfileResult.for_options(
            self.options, device_name=device_name(self.device),
            memory_kind=CUDA_MEMORY if self.device.type == "cuda" else CPU_MEMORY,
            params_total=sum(p.numel() for p in model.parameters()),
            params_trainable=sum(p.numel() for p in self.trainable), mem_created_bytes=self.mem_created,
            device_memory_bytes=device_memory(self.device), setup_time_s=self.setup_time_s,
            **_versions(self.options.backend))

    def _forward(self) -> tuple[torch.Tensor, Any]:
        """The loss of one forward pass, and the outputs the protocol keeps alive until the next step (none with
        ``memory``'s chunked loss: there are no logits)."""
        if memory_setting(self.options.memory).chunked_loss and plain_head(self.model):
            return model_causal_lm_loss(self.model, self.inputs["input_ids"], self.inputs["labels"], "mean"), None
        if self.options.model_dir is not None:
            out = self.model(**self.inputs)
            return out.loss, out
        return workload_module().forward_loss(self.options.preset, self.model, self.inputs)

    def train_step(self) -> torch.Tensor:
        """One unmetered training step (forward, backward, optimizer step, ``zero_grad(set_to_none=True)``), the
        outputs dropped before backward; the detached loss. For timing several sessions against each other in one
        process (``benchmarks/paired_steps.py``); :meth:`run` is the protocol."""
        with self.attention():
            loss, out = self._forward()
            del out
            loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, on_step: StepCallback | None = None) -> ProfileResult:
        """Run the profiled steps; an out-of-memory error gives ``status="OOM"`` rather than raising.

        The first ``WARMUP_STEPS`` steps (all when there are no more) are accounted part by part; the
        later ones, the timed ones, run without the meter's hooks.
        """
        result = self._base_result()
        model, opt, cuda = self.model, self.optimizer, self.device.type == "cuda"
        meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()], model=model)
        metered = self.options.steps if self.options.steps <= WARMUP_STEPS else WARMUP_STEPS
        static = module_state_bytes(model)
        adapter = storage_bytes(self.trainable) if self.options.method != "none" else 0
        best: dict[str, int] = {}
        by_kind: dict[str, int] = {}
        accounted_peak = 0
        times: list[float] = []
        losses: list[torch.Tensor] = []
        out: Any = None
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for step in range(self.options.steps):
                t0 = time.perf_counter()
                with self.attention():
                    with meter.record() if step < metered else contextlib.nullcontext():
                        loss, out = self._forward()  # `out` lives on into the next step, as in the protocol
                    if self.options.release_outputs:  # drop the logits before backward, as a lean loop does
                        out = None
                    loss.backward()
                grads = gradient_bytes(self.trainable) if step < metered else 0
                opt_state = 0
                if opt is not None:
                    opt.step()
                    opt_state = optimizer_state_bytes(opt) if step < metered else 0
                    opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
                losses.append(loss.detach())
                del loss
                if step < metered:
                    total = static + grads + opt_state + meter.bytes
                    if step == 0:
                        result.peak_first_step_bytes = (torch.cuda.max_memory_allocated(self.device) if cuda
                                                        else total)
                        result.mem_after_step_bytes = (torch.cuda.memory_allocated(self.device) if cuda
                                                       else static + opt_state)
                    if total > accounted_peak:
                        accounted_peak = total
                        best = dict(params_buffers=static, gradients=grads, optimizer_state=opt_state,
                                    saved_activations=meter.bytes)
                        by_kind = dict(meter.by_kind)
                if on_step is not None:
                    on_step(step + 1, times[-1])
        except Exception as exc:  # noqa: BLE001 - only allocation failures are turned into a status
            if not is_out_of_memory(exc):
                raise
            result.status, result.error = "OOM", str(exc).splitlines()[0][:300]
            if cuda and result.peak_first_step_bytes is None:
                result.peak_first_step_bytes = torch.cuda.max_memory_allocated(self.device)
        del out
        result.step_times_s = [round(t, 6) for t in times]
        median = median_step_time(times)
        result.step_time_s = round(median, 6) if median is not None and result.ok else None
        result.losses = [round(float(v), 6) for v in losses]
        result.final_loss = result.losses[-1] if result.losses else None
        if cuda:
            result.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            result.reserved_peak_bytes = torch.cuda.max_memory_reserved(self.device)
        else:
            result.peak_bytes = max(accounted_peak, static)
            result.cpu_breakdown = best or None
        if best:
            result.breakdown = dict(
                base_weights=static - adapter, adapter_weights=adapter, gradients=best["gradients"],
                optimizer_state=best["optimizer_state"], activations=best["saved_activations"],
                temporary=max(0, result.peak_bytes - accounted_peak) if cuda else None)
            result.activations_by_module = {k: v for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
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
        return oom_before_steps(options, exc)
    if on_prepared is not None:
        on_prepared(session)
    return session.run(on_step)


def oom_before_steps(options: ProfileOptions, exc: BaseException) -> ProfileResult:
    device = torch.device(options.device)
    result = ProfileResult.for_options(options, status="OOM", error=str(exc).splitlines()[0][:300],
                                       device_name=device_name(device), device_memory_bytes=device_memory(device),
                                       memory_kind=CUDA_MEMORY if device.type == "cuda" else CPU_MEMORY)
    if device.type == "cuda":
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
    return result


def profile_training(preset: str = "tiny-llama", method: str = "lora", rank: int = 16, alpha: float | None = None,
                     batch: int | None = None, seq: int = 128, steps: int = 4, device: str | None = None,
                     dtype: str | torch.dtype | None = None, backend: str = "slimtune",
                     grad_checkpointing: bool = False, seed: int = 0, quant: str = "none",
                     model_dir: str | None = None, on_step: StepCallback | None = None,
                     memory: str = "fast") -> ProfileResult:
    """Train ``steps`` steps of a preset model and measure it (see the module docstring).

    ``method``: one of ``METHODS`` (``"none"``: full fine-tune). ``quant``: ``"none"`` or ``"nf4"``
    (4-bit base weights). ``model_dir``: a local Hugging Face model directory instead of ``preset``.
    ``memory``: ``"fast"``, ``"balanced"`` or ``"max-fit"`` (:mod:`slimtune.memory.setting`).
    ``backend``: ``"slimtune"``, ``"peft"`` (PEFT as users get it: adapter weights upcast to float32) or
    ``"peft-bf16"`` (``autocast_adapter_dtype=False``).
    ``alpha`` defaults to ``rank``; ``batch``, ``device`` and ``dtype`` default to 4 / cuda / bfloat16 when
    CUDA is available, else 2 / cpu / float32. ``on_step(step, seconds)`` is called after every step.
    """
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    options = ProfileOptions(preset=preset, method=method, rank=rank, alpha=alpha, batch=batch, seq=seq,
                             steps=steps, device=device, dtype=dtype, backend=backend,
                             grad_checkpointing=grad_checkpointing, seed=seed, quant=quant, model_dir=model_dir,
                             memory=memory)
    return profile_options(options, on_step)
