"""Several processes (``torchrun``): PyTorch's DDP and FSDP2, and the few collectives the loop needs.

``torchrun --nproc_per_node N -m slimtune train ... --distributed ddp|fsdp`` starts N processes; each reads the
whole data set and takes its share of every global batch (rows ``[rank·b/N, (rank+1)·b/N)`` of it).

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` around the objective (gradients all-reduced; only the
  adapters' are, the frozen base has none).
* ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every decoder layer (the classes a transformers or
  diffusers model lists in ``_no_split_modules``; else the elements of its ``nn.ModuleList``\\ s), deepest first,
  then on the objective: each layer's parameters — its frozen base weights and its adapters, which live inside
  it — are sharded across the processes and gathered for its forward and backward. 4-bit (NF4) weights are
  buffers, which FSDP2 does not shard: they are replicated.

Backends: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Environment:
    """This process's place in the run, from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment() -> Environment:
    """The torchrun environment of this process (one process when the variables are not set)."""
    try:
        values = {key: int(os.environ.get(key, default)) for key, default in
                  (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0))}
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    return Environment(values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"])


def resolve_mode(requested: str, env: Environment) -> str:
    """``none``, ``ddp`` or ``fsdp`` (``auto``: ``ddp`` under torchrun with several processes, else ``none``)."""
    if requested == "auto":
        return "ddp" if env.world > 1 else "none"
    if requested == "none" and env.world > 1:
        raise ConfigError(f"{env.world} processes (torchrun) with --distributed none: pass --distributed ddp or fsdp")
    if requested != "none" and env.world == 1:
        raise ConfigError(f"--distributed {requested} needs several processes: start the run with "
                          "torchrun --nproc_per_node N -m slimtune train ...")
    return requested


def device_for(requested: str | None, env: Environment) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` under torchrun on GPUs, else ``requested`` (default: cuda
    when available)."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ConfigError(f"invalid device {requested!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} requested but CUDA is not available; use --device cpu")
        index = env.local_rank if env.world > 1 else (device.index or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ConfigError(f"unsupported device {requested!r}; use cpu or cuda")
    return device


@contextlib.contextmanager
def process_group(mode: str, device: torch.device) -> Iterator[None]:
    """The default process group for the run's duration (nothing for ``mode == "none"``)."""
    if mode == "none":
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
        # what the body dropped (a DDP reducer, FSDP's hooks: each holds the group) is freed now, while the group
        # lives, not by a later collection or at interpreter exit after the group is gone
        gc.collect()
        dist.barrier()  # every process is done with the group before any tears it down (gloo aborts a process
        # whose peer closed the connection under it)
    finally:
        dist.destroy_process_group()


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one, deepest first: those whose class the model (or a diffusion model's
    denoiser) names in ``_no_split_modules``; else every element of its ``nn.ModuleList``\\ s."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        units = [m for m in model.modules() if type(m).__name__ in names]
    else:
        units = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    units = [u for u in units if any(True for _ in u.parameters())]
    return units[::-1]


def wrap(objective: nn.Module, model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The objective as the loop runs it: itself, in DDP, or sharded by FSDP2 in place."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                   else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units(model):
            fully_shard(unit)
        fully_shard(objective)
    return objective


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, mode: str, sync: bool) -> Iterator[None]:
    """Within: backward passes reduce gradients across processes only when ``sync`` (the last micro-batch of an
    accumulation); the others accumulate locally."""
    if mode == "ddp" and not sync:
        with wrapped.no_sync():  # type: ignore[operator]
            yield
        return
    if mode == "fsdp":
        wrapped.set_requires_gradient_sync(sync)  # type: ignore[operator]
    yield


def all_reduce_sum(values: list[float], device: torch.device, mode: str) -> list[float]:
    """Element-wise sums over the processes (float64)."""
    if mode == "none":
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(value: Any, mode: str) -> list[Any]:
    """``value`` of every process, by rank (picklable values; in memory between this run's processes)."""
    if mode == "none":
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier(mode: str) -> None:
    if mode != "none":
        dist.barrier()


def broadcast_object(value: Any, mode: str) -> Any:
    """The main process's ``value``, on every process."""
    if mode == "none":
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
