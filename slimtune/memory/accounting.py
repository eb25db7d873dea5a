"""Counting the bytes a training step holds: the breakdown on every device, the peak where no allocator
statistics exist (the CPU).

Every figure counts unique storages, so tied weights, views and a tensor saved by several operations
count once. The accounted peak of a step is

    parameters + buffers + gradients + optimizer state + tensors saved for backward (parameters excluded)

which leaves out short-lived temporaries (the CUDA allocator's peak includes them).

Tensors saved for backward are also split by the kind of module whose code saved them (the innermost
module running at the time, tracked with forward pre/post hooks): see :data:`ACTIVATION_KINDS`.
A storage saved by several modules counts once, for the first.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..core.autograd_state import mark_transparent


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(data pointer, bytes)`` of the tensor's storage, or ``None`` for tensors without one."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    loose = 0
    for tensor in tensors:
        key = _storage_key(tensor)
        if key is None:
            loose += _tensor_bytes(tensor)
        elif key[1]:
            seen[key[0]] = key[1]
    return sum(seen.values()) + loose


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors of bitsandbytes 4-bit quantisation states (``Params4bit.quant_state``: absmax, code,
    the nested state), which are neither parameters nor buffers."""
    found: list[torch.Tensor] = []

    def collect(state: Any, depth: int) -> None:
        if state is None or depth > 2:
            return
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif hasattr(value, "absmax"):  # the nested (double-quantisation) state
                collect(value, depth + 1)

    for param in model.parameters():
        collect(getattr(param, "quant_state", None), 0)
    return found


def module_state_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (and bitsandbytes 4-bit quantisation states)."""
    return storage_bytes([*model.parameters(), *model.buffers(), *quant_state_tensors(model)])


def gradient_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the ``.grad`` tensors of ``params`` that have one."""
    return storage_bytes(p.grad for p in params if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors in an optimizer's state (Adam's moments, step counters)."""
    if optimizer is None:
        return 0
    return storage_bytes(v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor))


#: Kinds of module the tensors saved for backward are attributed to (keys of ``SavedTensorMeter.by_kind``).
ACTIVATION_KINDS: tuple[str, ...] = (
    "linear",      # nn.Linear (dense or 4-bit) and the adapters over them: layer inputs, low-rank intermediates
    "conv",        # nn.Conv1d/2d/3d and the adapters over them (LoCon, conv LoHa/LoKr)
    "attention",   # attention modules' own code: rotary products, q/k/v/output of the attention kernel
    "norm",        # LayerNorm, RMSNorm, GroupNorm
    "activation",  # activation functions and the gating products of MLPs (SiLU(gate) * up, GEGLU)
    "embedding",   # token / position embeddings
    "loss",        # the top-level model's own code (logits upcast, cross-entropy) and code outside the model
    "checkpoint",  # inputs of gradient-checkpointed regions (what checkpointing keeps)
    "other",       # everything else (decoder/UNet blocks' own code, residual scaling, resampling)
)

_ACTIVATION_TYPES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Softplus,
                     nn.Hardswish, nn.GLU)


def module_kind(module: nn.Module) -> str:
    """The :data:`ACTIVATION_KINDS` entry for tensors saved by ``module``'s own code (not its children's)."""
    base = getattr(module, "base_layer", None)  # slimtune and PEFT adapters keep the adapted layer here
    if isinstance(base, nn.Module) and base is not module:
        return "conv" if isinstance(base, nn.modules.conv._ConvNd) else "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    name = type(module).__name__
    if isinstance(module, nn.Linear) or name.endswith("Linear") or name in ("Linear4bit", "Conv1D"):
        return "linear"
    if isinstance(module, nn.Embedding) or name.endswith("Embedding"):
        return "embedding"
    if "Norm" in name:
        return "norm"
    if "Attention" in name or "Attn" in name:
        return "attention"
    if (isinstance(module, _ACTIVATION_TYPES) or name.endswith("Activation")
            or any(key in name for key in ("GELU", "GLU", "MLP", "FeedForward", "SiLU"))):
        return "activation"
    return "other"


def _has_output_head(module: nn.Module) -> bool:
    get = getattr(module, "get_output_embeddings", None)
    try:
        return callable(get) and isinstance(get(), nn.Module)
    except (AttributeError, NotImplementedError, TypeError):
        return False


def top_chain(model: nn.Module) -> set[int]:
    """``id`` of the model and of its single-child wrappers (PEFT's PeftModel and LoraModel, a diffusion
    model holding only its denoiser), down to the first module with several children, which is included
    when it carries an output head (the ``...ForCausalLM`` whose own code takes the loss on the logits).
    Saves in their own code count as ``"loss"``; a UNet's or DiT's own code does not."""
    ids = {id(model)}
    module = model
    while True:
        children = list(module.children())
        if len(children) != 1:
            return ids
        module = children[0]
        if len(list(module.children())) != 1 and not _has_output_head(module):
            return ids
        ids.add(id(module))


def _storage_identity(tensor: torch.Tensor) -> int | None:
    """The identity of the tensor's storage object (shared by views; also valid on the meta device, where every
    data pointer is 0), or ``None`` for tensors without one."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None


class SavedTensorMeter:
    """Counts the distinct storages autograd saves for backward inside :meth:`record`.

    Storages in ``exclude`` (the model's parameters and buffers) are not counted. Storages are told apart by
    identity, so the meter works on the meta device too (the estimator's simulation). It holds a
    reference to each counted storage while recording so that a freed storage cannot be
    reused and miscounted; :meth:`record` drops them on exit. Tensors saved inside a region that
    installs its own hooks (non-reentrant gradient checkpointing) are not seen, but the inputs such a
    region keeps are.

    With ``model``, :attr:`by_kind` splits :attr:`bytes` by :func:`module_kind` of the innermost module
    running when each storage was first saved (``"loss"`` outside every module and in the model's
    :func:`top_chain`; ``"checkpoint"`` for the inputs a checkpointed region keeps).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), model: nn.Module | None = None) -> None:
        self._exclude = {key for key in map(_storage_identity, exclude) if key is not None}
        self._held: dict[int, torch.UntypedStorage] = {}
        self._model = model
        self._stack: list[str] = []
        self.bytes = 0
        self.count = 0
        self.by_kind: dict[str, int] = {}

    def _add(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.count += 1
        kind = self._stack[-1] if self._stack else "loss"
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    @mark_transparent  # it only looks: DoRA's dora_recompute="auto" measures through it
    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_identity(tensor)
        if key is None:
            self._add(_tensor_bytes(tensor))
            return tensor
        storage = tensor.untyped_storage()
        if key not in self._exclude and key not in self._held and storage.nbytes():
            self._held[key] = storage
            self._add(storage.nbytes())
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _checkpointed(self, func: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self._stack.append("checkpoint")
            try:
                return func(*args, **kwargs)
            finally:
                self._stack.pop()
        return run

    @contextlib.contextmanager
    def _track_modules(self) -> Iterator[None]:
        """Keep :attr:`_stack` (the kinds of the running modules) with forward pre/post hooks."""
        model = self._model
        if model is None:
            yield
            return
        top = top_chain(model)
        handles = []
        patched: list[tuple[nn.Module, Any]] = []
        stack = self._stack

        def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
            if stack:
                stack.pop()

        for module in model.modules():
            kind = "loss" if id(module) in top else module_kind(module)

            def enter(_module: nn.Module, _args: Any, kind: str = kind) -> None:
                stack.append(kind)

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
            func = vars(module).get("_gradient_checkpointing_func")
            if callable(func):
                patched.append((module, func))
                module._gradient_checkpointing_func = self._checkpointed(func)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, func in patched:
                module._gradient_checkpointing_func = func
            self._stack.clear()

    @contextlib.contextmanager
    def record(self) -> Iterator["SavedTensorMeter"]:
        """Count (from zero) what is saved for backward inside the block."""
        self.bytes, self.count = 0, 0
        self.by_kind = {}
        self._held.clear()
        self._stack.clear()
        try:
            with self._track_modules(), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._held.clear()
