"""A whole training step replayed as one CUDA graph: no Python and no per-kernel launch cost on the host.

At short sequences a fine-tuning step is host-bound (the GPU waits while Python queues hundreds of small kernels
per layer: ``benchmarks/anatomy.py``). :func:`capture_step` records forward, loss, backward, optional gradient
clipping and the optimizer step once with ``torch.cuda.graph`` and replays that graph for every batch, which is
copied into the captured input buffers first. It works on any model — PEFT's too, so a comparison can give both
sides the same capture.

Before capturing it runs ``warmup_steps`` ordinary steps on a side stream (cuBLAS workspaces, Triton compiles,
the optimizer's state, each adapter's first-step decisions must exist before a graph can hold them) and then puts
back, in place, everything those steps changed: trainable parameters, buffers, the optimizer's state (Adam's and
AdamW's lazily created state starts at zero) and the CPU and CUDA random generators. So the model and optimizer
leave :func:`capture_step` as they came, and replay ``i`` computes what eager step ``i`` would.

What a graph cannot hold is refused, each refusal naming what to change:

* tensors off CUDA; a batch whose tensors differ in shape, dtype or device from the example (the buffers are
  static), or whose other entries differ from the example's;
* an optimizer other than ``torch.optim.Adam`` / ``AdamW`` with ``capturable=True`` (its step counter on the
  device); a learning rate given as a Python float — a graph replays it as a constant, so a scheduler would silently
  change nothing: pass ``lr=torch.tensor(lr, device="cuda")`` (schedulers update it in place), or
  ``fixed_lr=True`` to keep it constant on purpose;
* adapter dropout (LoRA's ``lora_dropout``, LoHa/LoKr's rank and module dropout): slimtune draws those masks from
  host-side seeds, which a graph would replay unchanged. The base model's ``nn.Dropout`` is fine: PyTorch's
  generator advances on every replay.

Nothing in the step may read a value back to the host (``.item()``, data-dependent shapes); torch raises during
capture if something does. Mixed precision: bf16 models need no gradient scaler; ``GradScaler`` is not supported.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from .inject import adapter_modules

_DROPOUT_FIELDS = ("dropout_p", "rank_dropout", "module_dropout")
_CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)


class CapturedStep:
    """A captured training step: ``step(batch)`` copies ``batch`` into the captured buffers, replays the graph
    and returns the step's loss (a CUDA tensor of its own; reading it is the caller's only synchronisation);
    :meth:`grad_norm` is the last replay's gradient norm before clipping."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: Any, loss: torch.Tensor,
                 norm: torch.Tensor | None = None) -> None:
        self.graph, self.inputs, self.loss, self.norm = graph, inputs, loss, norm

    def __call__(self, batch: Any) -> torch.Tensor:
        _copy_into(self.inputs, batch, "batch")
        self.graph.replay()
        return self.loss.clone()

    def grad_norm(self) -> torch.Tensor | None:
        """The trainable parameters' total gradient norm of the last replay, before clipping (a CUDA tensor of its
        own); None when the step was captured without ``max_grad_norm``."""
        return None if self.norm is None else self.norm.clone()


def _check_optimizer(optimizer: torch.optim.Optimizer, fixed_lr: bool) -> list[nn.Parameter]:
    if not isinstance(optimizer, _CAPTURABLE):
        raise ConfigError(f"capture_step runs torch.optim.Adam / AdamW inside a CUDA graph, not "
                          f"{type(optimizer).__name__}")
    params = []
    for i, group in enumerate(optimizer.param_groups):
        if not group.get("capturable", False):
            raise ConfigError(f"param group {i} of the optimizer is not capturable: construct it with "
                              f"{type(optimizer).__name__}(..., capturable=True) (its step counter then lives on "
                              "the device)")
        if not isinstance(group["lr"], torch.Tensor) and not fixed_lr:
            raise ConfigError(f"param group {i} has a float learning rate ({group['lr']}), which a CUDA graph replays "
                              "as a constant (a scheduler would change nothing): pass "
                              "lr=torch.tensor(lr, device='cuda'), or fixed_lr=True to keep it constant")
        params += [p for p in group["params"] if p.requires_grad]
    return params


def _check_no_adapter_dropout(model: nn.Module) -> None:
    for name, adapter in adapter_modules(model):
        for field in _DROPOUT_FIELDS:
            if adapter.training and (getattr(adapter, field, 0.0) or 0.0) > 0:
                raise ConfigError(f"{name} has {field}={getattr(adapter, field)}: slimtune draws adapter dropout "
                                  "masks from host-side seeds, which a CUDA graph replays unchanged; set it to 0 "
                                  "(lora_dropout / rank_dropout / module_dropout) or train without capture")


def _static_copy(example: Any, where: str = "example_batch") -> Any:
    """CUDA clones of ``example``'s tensors in its structure (dicts, lists, tuples; other leaves kept)."""
    if isinstance(example, torch.Tensor):
        if not example.is_cuda:
            raise ConfigError(f"{where} is on {example.device}: capture_step replays a CUDA graph; move the batch "
                              "to the GPU")
        return example.detach().clone()
    if isinstance(example, dict):
        return {k: _static_copy(v, f"{where}[{k!r}]") for k, v in example.items()}
    if isinstance(example, (list, tuple)):
        return type(example)(_static_copy(v, f"{where}[{i}]") for i, v in enumerate(example))
    return example


def _copy_into(static: Any, batch: Any, where: str) -> None:
    """Copy ``batch`` into the captured buffers ``static`` (same structure, shapes, dtypes, devices)."""
    if isinstance(static, torch.Tensor):
        if not isinstance(batch, torch.Tensor):
            raise ConfigError(f"{where} is a {type(batch).__name__}; the captured step took a tensor there")
        if batch.shape != static.shape or batch.dtype != static.dtype or batch.device != static.device:
            raise ConfigError(f"{where} is {tuple(batch.shape)} {batch.dtype} on {batch.device}; the captured step "
                              f"takes {tuple(static.shape)} {static.dtype} on {static.device} (static shapes: pad "
                              "or drop the last partial batch)")
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, dict):
        if not isinstance(batch, dict) or batch.keys() != static.keys():
            raise ConfigError(f"{where} has keys {sorted(batch) if isinstance(batch, dict) else type(batch).__name__}"
                              f"; the captured step takes {sorted(static)}")
        for key in static:
            _copy_into(static[key], batch[key], f"{where}[{key!r}]")
    elif isinstance(static, (list, tuple)):
        if not isinstance(batch, (list, tuple)) or len(batch) != len(static):
            raise ConfigError(f"{where} does not have the captured step's {len(static)} entries")
        for i, (s, b) in enumerate(zip(static, batch)):
            _copy_into(s, b, f"{where}[{i}]")
    elif batch != static:
        raise ConfigError(f"{where} is {batch!r}; the captured step was recorded with {static!r}")


class _Snapshot:
    """Trainable parameters, buffers, the optimizer's state and the random generators, to put back in place."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.tensors = [(t, t.detach().clone()) for t in [*params, *model.buffers()]]
        self.state = {p: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for p, s in optimizer.state.items()}
        self.optimizer = optimizer
        self.cpu_rng, self.cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in self.tensors:
            tensor.copy_(saved)
        for param, state in self.optimizer.state.items():
            before = self.state.get(param, {})
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key in before:
                    value.copy_(before[key])
                else:  # created by the warm-up: Adam's and AdamW's state starts at zero
                    value.zero_()
        torch.set_rng_state(self.cpu_rng)
        torch.cuda.set_rng_state_all(self.cuda_rng)


def capture_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Any], torch.Tensor],
                 example_batch: Any, *, max_grad_norm: float | None = None, warmup_steps: int = 3,
                 fixed_lr: bool = False) -> CapturedStep:
    """Capture one training step of ``model`` as a CUDA graph (module docstring).

    ``loss_fn(batch)``: the scalar loss of a batch (e.g. ``lambda b: model(**b).loss``); ``example_batch``: a
    batch of the shapes every later batch has (a tensor, or dicts / lists / tuples of them); ``max_grad_norm``:
    clip the trainable parameters' gradient norm before the optimizer step. Returns the :class:`CapturedStep`;
    call it with each batch instead of running the step."""
    params = _check_optimizer(optimizer, fixed_lr)
    _check_no_adapter_dropout(model)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ConfigError(f"warmup_steps must be a positive integer, got {warmup_steps!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm must be positive (or None), got {max_grad_norm!r}")
    inputs = _static_copy(example_batch)
    if not torch.cuda.is_available():
        raise ConfigError("capture_step needs CUDA")

    def step() -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = loss_fn(inputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError("loss_fn must return the batch's scalar loss tensor")
        loss.backward()
        norm = None
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        optimizer.step()
        return loss.detach().reshape(()), norm

    snapshot = _Snapshot(model, params, optimizer)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    snapshot.restore()
    optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients, and writes them each replay
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            loss, norm = step()
    except RuntimeError as exc:  # torch's own message says what failed, not what to change
        raise ConfigError(f"the step could not be captured as a CUDA graph ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}): something in it reads a value back to "
                          "the host (.item(), a shape that depends on values such as boolean indexing) or is not "
                          "capturable; run it without capture") from exc
    return CapturedStep(graph, inputs, loss, norm)
