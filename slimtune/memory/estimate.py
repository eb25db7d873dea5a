"""Predicting what a training configuration costs in memory, from its configuration alone.

The model is built on PyTorch's ``meta`` device (shapes and dtypes, no storage), quantised and adapted with
slimtune exactly as :mod:`slimtune.memory.profile` does it on the real device, and then **a training step is
simulated on meta tensors**: the same inputs, forward, loss, backward, ``AdamW.step()`` and
``zero_grad(set_to_none=True)``. The later steps' peak follows from the first step's phases (they also hold the
optimizer state, and the forward the previous step's outputs unless the loop releases them; a two-step
simulation gives the same figures, see the tests). The simulation runs with

* a saved-tensor hook that counts the distinct storages autograd keeps for backward (parameters and buffers
  excluded) — what :class:`~slimtune.memory.accounting.SavedTensorMeter` measures, split by module kind the
  same way (:data:`~slimtune.memory.accounting.ACTIVATION_KINDS`);
* a ``TorchDispatchMode`` that follows every storage the step allocates and frees (weak references), i.e. a
  model of the CUDA caching allocator's ``memory_allocated`` (sizes rounded up to 512 bytes on CUDA), whose
  maximum is the predicted ``max_memory_allocated``.

What the meta device cannot know is modelled where it differs from the GPU — inside the simulation's own
``with`` block (:func:`meta_environment`: a torch function mode and a context variable), never by replacing a
function of torch or of slimtune, so nothing leaks into the process or into other threads:

* attention: ``scaled_dot_product_attention`` without a mask runs the flash kernel on the GPU (and on the CPU),
  which keeps ``q, k, v, out`` and a float32 log-sum-exp ``[B, H, S]`` for backward (never the ``[S, S]``
  scores); its backward allocates ``dq, dk, dv`` (k/v expanded to every query head under GQA, then reduced)
  and a float32 ``dq`` accumulator (:class:`_MetaKernels`). A masked call keeps PyTorch's math path;
* NF4 weights: built directly in NF4's stored layout (no quantisation runs on meta), and a dequantisation
  allocates just its dense output, as the fused Triton kernel does on CUDA (:func:`slimtune.quant.nf4.dequantize_nf4`
  does so itself for meta tensors and reports its traffic to :mod:`slimtune.core.simulation`);
* AdamW runs with ``foreach=True`` for CUDA (PyTorch's default there), for its temporaries; its ``step`` counters
  live on the CPU. For the CPU's accounting (no temporaries) the state is counted without running the step:
  two moments like each parameter plus a 4-byte ``step`` per parameter, as the CPU profile counts them;
* RMSNorm through ``F.rms_norm`` (``torch.nn.RMSNorm``: a DiT's q/k norms) as CUDA's fused kernel keeps it — the
  input and a float32 ``rstd`` — when mirroring CUDA; the meta device's decomposition would keep two float32 copies;
* ``.item()`` / ``bool()`` of a meta tensor (a data-dependent branch) takes the simulated inputs' way — they have no
  padding and no packed sequences: a branch on ``all()`` reads True, anything else 0 / False;
* cuBLAS workspaces: a constant :data:`CUDA_WORKSPACE_BYTES`, calibrated on H100 runs.

Not modelled: the CUDA context (outside ``memory_allocated``), allocator fragmentation (``reserved`` minus
``allocated``), cuDNN convolution workspaces and other kernel-internal scratch space. The planner (:mod:`.plan`)
keeps a margin for these.

The breakdown uses the measured profile's names (:data:`slimtune.memory.result.BREAKDOWN_KEYS`):
``base_weights`` (frozen parameters and buffers), ``adapter_weights`` (trainable parameters; 0 for a full
fine-tune, whose weights are all in ``base_weights``), ``gradients``, ``optimizer_state``, ``activations``
(saved for backward, at the peak step) and ``temporary`` (the peak minus all of those).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..core import registry, simulation
from ..core.autograd_state import fused_rms_norm_on_cuda
from ..core.inject import adapt
from ..core.targeting import find_targets, output_head
from ..errors import ConfigError
from ..models import workload
from ..models.diffusion import DiffusionPreset
from ..models.presets import ModelPreset, Preset, dtype_name, get_preset, resolve_dtype
from ..quant.linear import NF4Linear
from ..quant.nf4 import BLOCKSIZE, DQ_BLOCKSIZE, NF4Tensors
from .accounting import SavedTensorMeter
from .chunked_loss import model_causal_lm_loss, plain_head
from .setting import apply_memory_setting, check_for_diffusion, memory_setting

__all__ = ["BREAKDOWN_KEYS", "CUDA_ROUNDING", "CUDA_WORKSPACE_BYTES", "MemoryEstimate", "StepSim", "adapter_bytes",
           "build_meta_model", "estimate_from_sim", "estimate_memory", "meta_environment", "parameter_bytes",
           "simulate_points"]

#: The parts of a peak, in stacking order (the same keys as :data:`slimtune.memory.result.BREAKDOWN_KEYS`).
BREAKDOWN_KEYS: tuple[str, ...] = ("base_weights", "adapter_weights", "gradients", "optimizer_state", "activations",
                                   "temporary")
#: The CUDA caching allocator rounds every allocation up to a multiple of this many bytes.
CUDA_ROUNDING = 512
#: cuBLAS / cuBLASLt workspaces PyTorch allocates through the caching allocator at the first GEMMs (counted in
#: ``memory_allocated``): calibrated on H100 runs of the Llama-3.2-3B protocol (every configuration measured
#: 0.06-0.07 GiB above the simulation without it).
CUDA_WORKSPACE_BYTES = 64 * 2**20
QUANTS = ("none", "nf4")


# -- the result -------------------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryEstimate:
    """A predicted training step. Bytes throughout; ``device_kind`` says whose semantics are predicted.

    ``peak_bytes``: the predicted allocator peak over the steps (``torch.cuda.max_memory_allocated`` on
    ``"cuda"``; on ``"cpu"`` the accounted peak, weights + gradients + optimizer state + activations, as the
    CPU profile reports it). ``mem_created_bytes``: parameters and buffers after building, quantising and
    adapting. ``breakdown``: :data:`BREAKDOWN_KEYS` at the peak step (they sum to ``peak_bytes``).
    ``activations_by_module``: the activations split by :data:`~slimtune.memory.accounting.ACTIVATION_KINDS`.
    ``phase_peaks``: the simulated peak of each phase (``forward``, ``backward``, ``optimizer``) of the last
    step, for the curious. ``flops``: one step's GEMM, convolution and attention FLOPs (forward, backward and
    any recomputation); ``dequant_bytes``: its NF4 dequantisation traffic. ``tokens``: positions through the
    model per step (batch x seq for an LM, batch x latent pixels for a UNet, batch x (image + text tokens) for
    a DiT).
    """

    preset: str
    method: str
    rank: int | None
    quant: str
    batch: int
    seq: int
    resolution: int | None
    dtype: str
    grad_checkpointing: bool
    release_outputs: bool
    device_kind: str
    params_total: int
    params_trainable: int
    tokens: int
    mem_created_bytes: int
    peak_bytes: int
    breakdown: dict[str, int]
    activations_by_module: dict[str, int]
    phase_peaks: dict[str, int]
    held_after_forward_bytes: int
    flops: float = 0.0
    dequant_bytes: float = 0.0
    memory: str = "fast"  # the memory setting (slimtune.memory.setting)

    def step_seconds(self, tflops: float = 400.0, bandwidth_gbs: float = 2000.0) -> float:
        """A rough step time: the step's FLOPs at ``tflops`` effective TFLOP/s plus the NF4 dequantisation
        traffic at ``bandwidth_gbs`` GB/s (elementwise and launch costs ignored)."""
        return self.flops / (tflops * 1e12) + self.dequant_bytes / (bandwidth_gbs * 1e9)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cpu_breakdown(self) -> dict[str, int]:
        """The parts under the names of :attr:`ProfileResult.cpu_breakdown` (``params_buffers``, ...)."""
        b = self.breakdown
        return dict(params_buffers=b["base_weights"] + b["adapter_weights"], gradients=b["gradients"],
                    optimizer_state=b["optimizer_state"], saved_activations=b["activations"])

    @property
    def label(self) -> str:
        quant = f"+{self.quant}" if self.quant != "none" else ""
        method = "full FT" if self.method == "none" else f"{self.method}{quant}"
        rank = f" r{self.rank}" if self.rank is not None else ""
        memory = f" memory={self.memory}" if self.memory != "fast" else ""
        return f"{self.preset} {method}{rank}{' +GC' if self.grad_checkpointing else ''}{memory}"


# -- the meta environment ---------------------------------------------------------------------------
class _FlashAttention(torch.autograd.Function):
    """What the flash kernel keeps and allocates, on meta tensors. q ``[B, H, S, d]``, k/v ``[B, Hkv, T, d]``.

    A memory model, not arithmetic: forward allocates the output and the fp32 log-sum-exp and saves q, k, v, out,
    lse as the kernel does; backward allocates what the kernel's backward allocates (an fp32 dq accumulator, dq,
    and under GQA dk/dv per query head before the group sum) and returns tensors of the right shapes."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        # QKᵀ and PV: 4·B·H·S·T·d FLOPs (half of it under a causal mask); backward ≈ 2.5x (FlashAttention-2)
        flops = 4 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1] * (0.5 if causal else 1.0)
        ctx.flops = flops
        simulation.count(attention_flops=flops)
        # the kernel writes [B, S, H, d] and returns it transposed, so the caller's transpose back is free
        out = q.new_empty((*q.shape[:-3], q.shape[-2], q.shape[-3], v.shape[-1])).transpose(-2, -3)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, _out, _lse = ctx.saved_tensors
        simulation.count(attention_flops=2.5 * ctx.flops)
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # float32 dq accumulation
        dq = torch.empty_like(q)
        del accumulator
        groups = q.shape[-3] // k.shape[-3]
        if groups > 1:  # GQA: gradients per query head, summed over each group
            dk = torch.empty((*k.shape[:-3], q.shape[-3], *k.shape[-2:]), dtype=k.dtype, device=k.device)
            dv = torch.empty((*v.shape[:-3], q.shape[-3], *v.shape[-2:]), dtype=v.dtype, device=v.device)
            dk = dk.unflatten(-3, (k.shape[-3], groups)).sum(-3)
            dv = dv.unflatten(-3, (v.shape[-3], groups)).sum(-3)
        else:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
        return dq, dk, dv, None


class _FusedRmsNorm(torch.autograd.Function):
    """What CUDA's fused RMSNorm kernel (``aten._fused_rms_norm``, behind ``F.rms_norm`` there) keeps and allocates,
    on meta tensors: the output in the input's dtype and a float32 ``rstd`` per row; it saves the input and
    ``rstd``. On the meta device (and the CPU) ``F.rms_norm`` decomposes and keeps two float32 copies of the input
    instead — measured on an H200, the fused kernel's is what the GPU holds (RESULTS.md, run 43)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, dims: int) -> torch.Tensor:
        out = torch.empty_like(x)
        rstd = torch.empty((*x.shape[:x.dim() - dims], *([1] * dims)), dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, _rstd, weight = ctx.saved_tensors
        grad_weight = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        return torch.empty_like(x), grad_weight, None


#: whether CUDA runs ``F.rms_norm`` as one fused kernel
FUSED_RMS_NORM_ON_CUDA = fused_rms_norm_on_cuda()
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_RMS_NORM_ARGS = ("input", "normalized_shape", "weight", "eps")


class _MetaKernels(TorchFunctionMode):
    """Inside the block, on meta tensors: an unmasked ``F.scaled_dot_product_attention`` allocates and saves what the
    flash kernel does on the GPU (:class:`_FlashAttention`), and, when mirroring CUDA, ``F.rms_norm`` what CUDA's
    fused kernel does (:class:`_FusedRmsNorm`); any other call runs as it is. A torch function mode: scoped to the
    ``with`` block and the thread, nothing of torch is replaced."""

    def __init__(self, cuda: bool) -> None:
        super().__init__()
        self.cuda = cuda

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_ARGS, args), **kwargs)
            query = bound["query"]
            if bound.get("attn_mask") is None and query.device.type == "meta":
                return _FlashAttention.apply(query, bound["key"], bound["value"], bool(bound.get("is_causal", False)))
        elif func is F.rms_norm and self.cuda and FUSED_RMS_NORM_ON_CUDA:
            bound = dict(zip(_RMS_NORM_ARGS, args), **kwargs)
            x = bound["input"]
            if x.device.type == "meta":
                return _FusedRmsNorm.apply(x, bound.get("weight"), len(bound["normalized_shape"]))
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_environment(cuda: bool = True) -> Iterator[simulation.Work]:
    """The block in which a training step is simulated on meta tensors: unmasked attention follows the flash
    kernel's memory, and with ``cuda`` RMSNorm CUDA's fused kernel's (:class:`_MetaKernels`); the work the meta
    device cannot show is counted (:mod:`slimtune.core.simulation`: attention FLOPs, NF4 dequantisation traffic —
    :func:`slimtune.quant.nf4.dequantize_nf4` allocates only its output on meta). Nothing is patched: outside the
    block, and in other threads, everything runs as before."""
    with simulation.counting(simulation.Work(cuda=cuda)) as work, _MetaKernels(cuda):
        yield work


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: the forward runs as it is, and the recomputation — which runs
    where autograd's engine runs it, possibly another thread, outside this thread's function modes and context
    variables — in the same simulation (same kernels, same counters) as the forward that called this."""
    return contextlib.nullcontext(), _continued_simulation(simulation.current())


@contextlib.contextmanager
def _continued_simulation(work: simulation.Work | None) -> Iterator[None]:
    with simulation.counting(work) as running, _MetaKernels(running.cuda):
        yield


# -- building on meta -------------------------------------------------------------------------------
def _trained_part(model: nn.Module) -> nn.Module:
    """The part that is quantised and adapted: a diffusion model's denoiser, else the model."""
    return getattr(model, "denoiser", model)


def _meta_nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, code: torch.Tensor | None = None) -> nn.Module:
    """An :class:`~slimtune.quant.NF4Linear` with meta tensors in the layout ``quantize_nf4`` produces
    (``code``: a shared float32 ``[256]`` double-quantisation table, else one of its own)."""
    n = linear.weight.numel()
    blocks = math.ceil(n / BLOCKSIZE)
    meta = dict(device="meta")
    tensors = NF4Tensors(packed=torch.empty(math.ceil(n / 2), dtype=torch.uint8, **meta),
                         absmax=torch.empty(blocks, dtype=torch.uint8, **meta), shape=linear.weight.shape,
                         blocksize=BLOCKSIZE, nested_absmax=torch.empty(math.ceil(blocks / DQ_BLOCKSIZE), **meta),
                         nested_code=torch.empty(256, **meta) if code is None else code, offset=torch.empty((), **meta),
                         dq_blocksize=DQ_BLOCKSIZE)
    return NF4Linear(tensors, linear.bias, compute_dtype)


def _quantize_meta(part: nn.Module, compute_dtype: torch.dtype, device: str) -> None:
    """``slimtune.quantize(part, "nf4", compute_dtype=...)`` on meta: every ``nn.Linear`` but the output head.

    On the CPU every layer's double-quantisation table is the same tensor (``dynamic_map``'s cached CPU copy);
    on CUDA each layer holds its own copy."""
    code = torch.empty(256, device="meta") if device == "cpu" else None
    head = output_head(part)
    names = [name for name, m in part.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = part.get_submodule(parent_name) if parent_name else part
        setattr(parent, child, _meta_nf4_linear(getattr(parent, child), compute_dtype, code))


def _with_depth(spec: Preset, depth: dict[str, int] | None) -> Preset:
    """``spec`` with some layer counts replaced (``num_hidden_layers``; a DiT's ``num_layers`` /
    ``num_single_layers``)."""
    if not depth:
        return spec
    if isinstance(spec, ModelPreset):
        return dataclasses.replace(spec, **depth)
    config = {**spec.config, **depth}
    return dataclasses.replace(spec, denoiser=tuple(config.items()))


def build_meta_model(preset: str | Preset, method: str = "lora", rank: int = 16, alpha: float | None = None,
                     quant: str = "none", dtype: str | torch.dtype = torch.bfloat16,
                     grad_checkpointing: bool = False, targets: list[str] | None = None,
                     adapter_dtype: torch.dtype | None = None, device: str = "cuda",
                     memory: str = "fast", plain_layers: int = 0) -> tuple[nn.Module, Preset]:
    """The configured model on the meta device: built, frozen text encoders, quantised (``nf4``) and adapted
    as :class:`slimtune.memory.profile.TrainingSession` does it; returns ``(model, preset)``. ``device``: the
    device whose storage layout to mirror (``"cuda"`` or ``"cpu"``). ``memory``: a setting of
    :mod:`~slimtune.memory.setting` (language models; ``max-fit`` offloads from CUDA only, so on ``"cpu"`` it
    models ``balanced``). ``plain_layers``: the last layers left un-checkpointed
    (:func:`~slimtune.memory.setting.apply_memory_setting`)."""
    spec = get_preset(preset)
    torch_dtype = resolve_dtype(dtype)
    setting = memory_setting(memory)
    if not isinstance(spec, ModelPreset):
        check_for_diffusion(setting, plain_layers)
    if setting.checkpoint and grad_checkpointing:
        raise ConfigError(f"memory={memory!r} checkpoints every layer itself: drop grad_checkpointing")
    if quant not in QUANTS:
        raise ConfigError(f"unknown quant {quant!r}; choose from {', '.join(QUANTS)}")
    if quant != "none" and method == "none":
        raise ConfigError("4-bit weights cannot be trained: quant='nf4' needs an adapter method")
    with meta_environment():
        model = workload.build_model(spec, "meta", torch_dtype, seed=0)
        part = _trained_part(model)
        if part is not model:
            inside = {id(p) for p in part.parameters()}
            for param in model.parameters():
                if id(param) not in inside:
                    param.requires_grad_(False)
        if quant == "nf4":
            _quantize_meta(part, torch_dtype, device)
        if method != "none":
            targets = targets or workload.default_targets(spec, method)
            config = workload.make_adapter_config(method, rank, alpha, targets, adapter_dtype=adapter_dtype)
            adapt(part, config)
        if grad_checkpointing:
            workload.enable_gradient_checkpointing(spec, model, adapted=method != "none",
                                                    context_fn=checkpoint_contexts)
        apply_memory_setting(model, "balanced" if memory == "max-fit" and device == "cpu" else setting,
                             context_fn=checkpoint_contexts, plain_layers=plain_layers)
    return model, spec


def parameter_bytes(model: nn.Module) -> tuple[int, int, int, int]:
    """``(params+buffers bytes, trainable bytes, params total, params trainable)`` over distinct storages
    (meta storages are told apart by their C++ object)."""
    seen: dict[int, int] = {}
    trainable: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            trainable[storage._cdata] = storage.nbytes()
    params = list(model.parameters())
    return (sum(seen.values()), sum(trainable.values()), sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad))


# -- the simulation ---------------------------------------------------------------------------------
def _flop_formulas() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry

    return dict(flop_registry)


_FLOP_FORMULAS = _flop_formulas()


def _storage_sum(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (CPU tensors by pointer, meta ones by C++ object)."""
    seen: dict[Any, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = storage._cdata if tensor.device.type == "meta" else ("ptr", storage.data_ptr(), storage.nbytes())
        seen[key] = storage.nbytes()
    return sum(seen.values())


#: reductions whose meta result reads as True in a data-dependent branch: "is every entry regular?" — the
#: simulated inputs are regular (no padding, no packed sequences, no ignored labels). Anything else reads as
#: False or 0 ("is any entry irregular?" — none is).
_ALL_OPS = (torch.ops.aten.all,)


def _common_value(tensor: torch.Tensor) -> bool | int:
    """The value a data-dependent branch takes on a meta scalar in the simulation: the regular inputs' way."""
    if tensor.dtype == torch.bool:
        return bool(getattr(tensor, "_simulated_value", False))
    return 0


class _Allocator(TorchDispatchMode):
    """Follows the bytes of every storage created by an operation while active, until its last tensor dies."""

    def __init__(self, rounding: int = 1, external: set[int] | None = None) -> None:
        super().__init__()
        self.rounding = rounding
        self.external = external or set()  # storages allocated before (weights): their views allocate nothing
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.tracked: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0
        self.phase = ""
        self.phase_peaks: dict[str, int] = {}
        self.flops = 0.0  # GEMMs and convolutions (torch.utils.flop_counter's formulas), forward and backward

    def _size(self, nbytes: int) -> int:
        return -(-nbytes // self.rounding) * self.rounding

    def start_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peaks[phase] = self.live

    def _free(self, key: int, obj_id: int) -> None:
        self.tracked.pop(obj_id, None)
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def _track(self, tensor: torch.Tensor) -> None:
        if id(tensor) in self.tracked or tensor.device.type != "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return
        key = storage._cdata
        if key in self.external:
            return
        if key in self.refs:
            self.refs[key] += 1
        else:
            self.refs[key] = 1
            size = self._size(storage.nbytes())
            self.sizes[key] = size
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
            if self.phase and self.live > self.phase_peaks.get(self.phase, 0):
                self.phase_peaks[self.phase] = self.live
        obj_id = id(tensor)
        self.tracked[obj_id] = weakref.ref(tensor, lambda _r, k=key, i=obj_id: self._free(k, i))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return _common_value(args[0])  # a data-dependent branch: take the common way
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in _ALL_OPS and isinstance(out, torch.Tensor):
            out._simulated_value = True  # read by _common_value
        counter = _FLOP_FORMULAS.get(func._overloadpacket)
        if counter is not None:
            self.flops += counter(*args, **(kwargs or {}), out_val=out)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


@dataclasses.dataclass
class StepSim:
    static: int  # params + buffers, exact
    static_rounded: int  # as the allocator holds them
    trainable: int
    params_total: int
    params_trainable: int
    gradients: int
    optimizer_state: int
    activations: int
    by_kind: dict[str, int]
    peak_live: int  # allocated inside the steps (inputs, activations, gradients, state, temporaries)
    phase_peaks: dict[str, int]
    held_after_forward: int
    flops: float = 0.0  # one step: GEMMs + convolutions
    attention_flops: float = 0.0  # one step: attention (quadratic in a sample's tokens)
    dequant_bytes: float = 0.0  # one step


def _simulate(model: nn.Module, spec: Preset, method: str, batch: int, seq: int, resolution: int | None,
              dtype: torch.dtype, release_outputs: bool, device_kind: str, steps: int = 1,
              memory: str = "fast") -> StepSim:
    """Simulate ``steps`` training steps of ``model`` (built by :func:`build_meta_model`) on meta tensors.

    With ``steps=1`` the later steps' peak is derived from the first step's phases: a later forward also holds
    the optimizer state S and the previous step's outputs R (unless released), a later backward holds S, the
    optimizer phase is the first one's: ``max(F1 + S + R, B1 + S, O1)``. ``steps=2`` simulates them (slower; the
    tests check that both agree). ``memory``: the setting the model was built with (its chunked loss here).
    """
    rounding = CUDA_ROUNDING if device_kind == "cuda" else 1
    static, trainable_bytes, total, trainable_count = parameter_bytes(model)
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    static_rounded = sum(-(-n // rounding) * rounding for n in storages.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    # CUDA: AdamW as PyTorch runs it there (foreach), for its temporaries. The CPU accounting has no
    # temporaries, so there the state is counted without running the (slow, per-tensor) step: AdamW keeps
    # exp_avg and exp_avg_sq like each parameter and a float32 ``step`` scalar per parameter.
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True) if trainable and device_kind == "cuda" else None
    counter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()], model=model)
    allocator = _Allocator(rounding, external=set(storages))
    gradients = optimizer_state = state_live = retained = held_after_forward = 0
    first: dict[str, int] = {}
    chunked = memory_setting(memory).chunked_loss and plain_head(model)
    with meta_environment(cuda=device_kind == "cuda") as work, allocator:
        inputs = workload.make_inputs(spec, model, batch, seq, "meta", dtype, None, resolution=resolution)
        out: Any = None
        for step in range(steps):
            allocator.start_phase("forward")
            before = allocator.live
            with counter.record():
                if chunked:
                    loss, out = model_causal_lm_loss(model, inputs["input_ids"], inputs["labels"], "mean"), None
                else:
                    loss, out = workload.forward_loss(spec, model, inputs)
            held_after_forward = allocator.live - before
            if release_outputs:
                out = None
            allocator.start_phase("backward")
            loss.backward()
            del loss
            gradients = _storage_sum(p.grad for p in trainable if p.grad is not None)
            if device_kind == "cpu":
                optimizer_state = 2 * trainable_bytes + 4 * len(trainable)
                for param in trainable:
                    param.grad = None
            allocator.start_phase("optimizer")
            if optimizer is not None:
                optimizer.step()
                states = [v for state in optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor)]
                optimizer_state = _storage_sum(v for v in states if device_kind == "cpu" or v.device.type == "meta")
                state_live = sum(-(-n // rounding) * rounding for n in
                                 {v.untyped_storage()._cdata: v.untyped_storage().nbytes()
                                  for v in states if v.device.type == "meta"}.values())
                optimizer.zero_grad(set_to_none=True)
            if step == 0:
                first = dict(allocator.phase_peaks)
                step_flops, step_work = allocator.flops, dataclasses.replace(work)
        if out is not None:
            live = allocator.live
            out = None
            retained = live - allocator.live
        del out, inputs
    phases = dict(allocator.phase_peaks)
    peak = allocator.peak
    if steps == 1:
        phases = {"forward": first.get("forward", 0) + state_live + retained,
                  "backward": first.get("backward", 0) + state_live, "optimizer": first.get("optimizer", 0)}
        peak = max(peak, *phases.values())
    return StepSim(static=static, static_rounded=static_rounded, trainable=trainable_bytes, params_total=total,
                    params_trainable=trainable_count, gradients=gradients, optimizer_state=optimizer_state,
                    activations=counter.bytes, by_kind=dict(counter.by_kind), peak_live=peak,
                    phase_peaks=phases, held_after_forward=held_after_forward,
                    flops=step_flops, attention_flops=step_work.attention_flops,
                    dequant_bytes=step_work.dequant_bytes)


def _combine(sims: list[tuple[dict[str, int], StepSim]], target: dict[str, int]) -> StepSim:
    """Extrapolate simulations at reduced depths linearly to ``target`` depths: ``sims[0]`` at the base depths,
    ``sims[1 + i]`` with knob ``i`` one higher."""
    base_depth, base = sims[0]
    knobs = list(base_depth)

    def value(get: Callable[[StepSim], float]) -> Any:
        result = get(base)
        for i, knob in enumerate(knobs):
            result += (get(sims[1 + i][1]) - get(base)) * (target[knob] - base_depth[knob])
        return int(result) if isinstance(result, int) else result

    kinds = {k for _, s in sims for k in s.by_kind}
    phases = {k for _, s in sims for k in s.phase_peaks}
    return StepSim(
        static=value(lambda s: s.static), static_rounded=value(lambda s: s.static_rounded),
        trainable=value(lambda s: s.trainable), params_total=value(lambda s: s.params_total),
        params_trainable=value(lambda s: s.params_trainable), gradients=value(lambda s: s.gradients),
        optimizer_state=value(lambda s: s.optimizer_state), activations=value(lambda s: s.activations),
        by_kind={k: value(lambda s, k=k: s.by_kind.get(k, 0)) for k in kinds},
        peak_live=value(lambda s: s.peak_live),
        phase_peaks={k: value(lambda s, k=k: s.phase_peaks.get(k, 0)) for k in phases},
        held_after_forward=value(lambda s: s.held_after_forward), flops=value(lambda s: s.flops),
        attention_flops=value(lambda s: s.attention_flops), dequant_bytes=value(lambda s: s.dequant_bytes))


#: reduced-depth simulations run at this many repeated layers and one more, then extrapolate linearly. Not 1: the
#: first layer is special (its input needs no gradient, and alone it is also the last, whose backward meets the
#: loss's buffers), so one layer's peak is not on the line the deeper models' peaks lie on.
REDUCED_BASE_DEPTH = 2


def depth_knobs(spec: Preset) -> dict[str, int]:
    """The repeated-layer counts a simulation can shrink and extrapolate linearly (``{}`` for UNets)."""
    if isinstance(spec, ModelPreset):
        return {"num_hidden_layers": spec.num_hidden_layers}
    if spec.family == "dit":
        config = spec.config
        return {"num_layers": int(config.get("num_layers", 19)),
                "num_single_layers": int(config.get("num_single_layers", 38))}
    return {}


def simulate_points(preset: str | Preset, points: list[tuple[int, int, int | None]], method: str = "lora",
                    rank: int = 16, alpha: float | None = None, quant: str = "none",
                    dtype: str | torch.dtype = "bfloat16", grad_checkpointing: bool = False,
                    release_outputs: bool = False, device: str = "cuda", reduced_depth: bool = False,
                    adapter_dtype: torch.dtype | None = None, memory: str = "fast",
                    plain_layers: int = 0) -> list["StepSim"]:
    """One simulated step per ``(batch, seq, resolution)`` point, the model(s) built once (at the real depth, or
    at reduced depths extrapolated linearly when ``reduced_depth``)."""
    spec = get_preset(preset)
    torch_dtype = resolve_dtype(dtype)
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    lengths = [("seq", p[1]) for p in points] if isinstance(spec, ModelPreset) else [
        ("resolution", p[2]) for p in points if p[2] is not None]
    for name, value in (("rank", rank), *(("batch", p[0]) for p in points), *lengths):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    knobs = depth_knobs(spec) if reduced_depth else {}
    # the plain (un-checkpointed) layers are the last ones: every reduced model keeps them all, and varies the
    # number of checkpointed layers before them
    base_depth = REDUCED_BASE_DEPTH + plain_layers
    if any(depth <= base_depth + 1 for depth in knobs.values()):
        knobs = {}  # shallow enough to simulate whole
    depths: list[dict[str, int] | None] = [None]
    if knobs:
        base = {k: base_depth for k in knobs}
        depths = [base, *({**base, knob: base_depth + 1} for knob in knobs)]
    per_depth: list[list[StepSim]] = []
    for depth in depths:
        model, shaped = build_meta_model(_with_depth(spec, depth), method, rank, alpha, quant, torch_dtype,
                                         grad_checkpointing, adapter_dtype=adapter_dtype, device=device,
                                         memory=memory, plain_layers=plain_layers)
        per_depth.append([_simulate(model, shaped, method, batch, seq, resolution, torch_dtype, release_outputs,
                                    device, memory=memory) for batch, seq, resolution in points])
        del model
    if not knobs:
        return per_depth[0]
    return [_combine([(depth, sims[i]) for depth, sims in zip(depths, per_depth)], knobs)  # type: ignore[misc]
            for i in range(len(points))]


def estimate_memory(preset: str | Preset, method: str = "lora", rank: int = 16, alpha: float | None = None,
                    batch: int = 4, seq: int = 512, resolution: int | None = None, quant: str = "none",
                    dtype: str | torch.dtype = "bfloat16", grad_checkpointing: bool = False,
                    release_outputs: bool = False, device: str = "cuda", reduced_depth: bool = False,
                    adapter_dtype: torch.dtype | None = None, memory: str = "fast",
                    plain_layers: int = 0) -> MemoryEstimate:
    """Predict one configuration's memory (see the module docstring); nothing is allocated.

    Arguments mirror :class:`slimtune.memory.options.ProfileOptions` (``seq`` is ignored by diffusion presets,
    whose latent side is ``resolution``, default the preset's ``sample_size``). ``device``: ``"cuda"`` predicts
    the CUDA allocator's peak; ``"cpu"`` the CPU profile's accounted figures. ``reduced_depth``: simulate a
    language model / DiT with two and three repeated layers and extrapolate linearly to the real depth (the
    layers are identical, so weights, gradients and optimizer state stay exact; much faster — the planner's
    mode). ``release_outputs``: the loop drops the step's outputs before backward (else they live into the next
    step, as in the PEFT baseline protocol).
    """
    spec = get_preset(preset)
    sim = simulate_points(spec, [(batch, seq, resolution)], method, rank, alpha, quant, dtype, grad_checkpointing,
                          release_outputs, device, reduced_depth, adapter_dtype, memory, plain_layers)[0]
    return estimate_from_sim(spec, sim, method, rank, quant, batch, seq, resolution, resolve_dtype(dtype),
                             grad_checkpointing, release_outputs, device, memory)


def estimate_from_sim(spec: Preset, sim: StepSim, method: str, rank: int, quant: str, batch: int, seq: int,
            resolution: int | None, dtype: torch.dtype, grad_checkpointing: bool, release_outputs: bool,
            device: str, memory: str = "fast") -> MemoryEstimate:
    """The :class:`MemoryEstimate` of a simulated step (:func:`simulate_points`)."""
    adapter = sim.trainable if method != "none" else 0
    parts = dict(base_weights=sim.static - adapter, adapter_weights=adapter, gradients=sim.gradients,
                 optimizer_state=sim.optimizer_state, activations=sim.activations)
    accounted = sum(parts.values())
    if device == "cuda":
        peak = sim.static_rounded + sim.peak_live + CUDA_WORKSPACE_BYTES
        parts["temporary"] = max(0, peak - accounted)
        peak = max(peak, accounted)
    else:
        peak = accounted
        parts["temporary"] = 0
    diffusion = isinstance(spec, DiffusionPreset)
    res = (resolution or spec.sample_size) if diffusion else None
    return MemoryEstimate(
        preset=spec.name, method=method, rank=rank if method != "none" else None, quant=quant, batch=batch,
        seq=0 if diffusion else seq, resolution=res, dtype=dtype_name(dtype), grad_checkpointing=grad_checkpointing,
        release_outputs=release_outputs, device_kind=device, params_total=sim.params_total,
        params_trainable=sim.params_trainable, tokens=batch * workload.sample_tokens(spec, seq, res),
        mem_created_bytes=sim.static, peak_bytes=peak, breakdown=parts,
        activations_by_module=dict(sorted(sim.by_kind.items(), key=lambda kv: -kv[1])),
        phase_peaks={k: sim.static_rounded + v for k, v in sim.phase_peaks.items()},
        held_after_forward_bytes=sim.held_after_forward, flops=sim.flops + sim.attention_flops,
        dequant_bytes=sim.dequant_bytes, memory=memory)


def adapter_bytes(base: nn.Module, preset: str | Preset, method: str, rank: int, alpha: float | None = None,
                  adapter_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """``(bytes, parameters)`` of the adapter ``method`` at ``rank`` would add to the unadapted (meta) ``base``
    (its trained part), counted by creating each adapter layer on meta without changing ``base``."""
    if method == "none":
        return 0, 0
    part = _trained_part(base)
    config = workload.make_adapter_config(method, rank, alpha, workload.default_targets(preset, method),
                                          adapter_dtype=adapter_dtype)
    total_bytes = total = 0
    with meta_environment():
        for name, module in find_targets(part, config):
            layer = registry.build_adapter(config, name, module)
            for param in layer.parameters():
                if param is not getattr(module, "weight", None) and param is not getattr(module, "bias", None):
                    total_bytes += param.numel() * param.element_size()
                    total += param.numel()
    return total_bytes, total
