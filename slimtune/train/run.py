"""``train(config)``: one run, from the data file to the adapter checkpoint.

Everything that can be wrong with the input is found before any model is built: the settings
(:meth:`TrainConfig.resolved`), the data (read and tokenised whole: a malformed line or a sample longer than
``--seq`` names its line), ``--seq`` against the model's context, the batch split over processes, and the output
directory (another run's is refused unless ``--resume``). Then, in every process: the model is built, quantised,
adapted (``--ranks auto``: ranks allocated by :func:`slimtune.ranks.allocate_ranks` on a few training batches,
recorded in ``OUT/ranks.json``), wrapped for DDP / FSDP, and trained by :class:`~slimtune.train.loop.Loop`;
a resumed run first restores its newest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.timed import load_timings, set_variant_criterion, variant_criterion
from ..errors import ConfigError
from ..memory.options import check_dependencies
from ..memory.plan import fit_plain_layers
from ..models.presets import get_preset, preset_from_dir
from ..ranks import allocate_ranks
from . import checkpoint
from .build import (adapter_config, build_base, check_model_task, model_context, prepare_model, read_rank_pattern,
                    trained_part)
from .config import TrainConfig
from .distributed import (Environment, barrier, broadcast_object, device_for, environment, process_group,
                          resolve_mode, wrap)
from .loop import TIMINGS_NAME, Loop, Parts, cosine_schedule
from .order import DataOrder
from .progress import Reporter
from .rundir import RunDir, fingerprints
from .tasks import Task, make_task

DEFAULT_SEQ = 1024
CALIBRATION_BATCHES = 4  # micro-batches --ranks auto measures on
RANKS_NAME = "ranks.json"


def sequence_length(cfg: TrainConfig) -> int:
    """``--seq``, or ``min(context, 1024)``; refused when longer than the model's context."""
    context = model_context(cfg) if cfg.task != "diffusion" else None
    seq = cfg.seq if cfg.seq is not None else min(context or DEFAULT_SEQ, DEFAULT_SEQ)
    if context is not None and seq > context:
        raise ConfigError(f"--seq {seq} is longer than the model's context ({context} positions)")
    return seq


def auto_plain_layers(cfg: TrainConfig, seq: int, env: Environment, device: torch.device, reporter: Reporter
                      ) -> int:
    """``--plain-layers auto``: as many trailing layers left un-checkpointed as the planner predicts fit this GPU
    (:func:`slimtune.memory.plan.fit_plain_layers`, for one process's micro-batch of ``seq``-token rows)."""
    if device.type != "cuda":
        raise ConfigError("--plain-layers auto fits the layers to the GPU's memory: it needs a CUDA device (on the "
                          "CPU give a number)")
    spec = get_preset(cfg.preset) if cfg.preset is not None else preset_from_dir(str(cfg.model_dir))
    micro = cfg.micro_batch or cfg.batch // env.world
    gpu_mem = torch.cuda.get_device_properties(device).total_memory
    count, estimates = fit_plain_layers(spec, cfg.method, cfg.rank, micro, seq, cfg.quant, str(cfg.dtype), cfg.memory,
                                        gpu_mem)
    if count < 0:
        reporter.note(f"--plain-layers auto: even with every layer checkpointed the predicted peak "
                      f"({estimates[0].peak_bytes / 2**30:.2f} GiB) exceeds this GPU; training with 0 plain layers "
                      "(a smaller --micro-batch or --memory max-fit would fit)")
        return 0
    reporter.note(f"--plain-layers auto: {count} of {spec.num_hidden_layers} layers stay un-checkpointed (predicted "
                  f"to fit {gpu_mem / 2**30:.0f} GiB)")
    return count


def check_batch(cfg: TrainConfig, env: Environment) -> None:
    """The global batch splits evenly over the processes, and each share into micro-batches."""
    if cfg.batch % env.world:
        raise ConfigError(f"--batch {cfg.batch} does not split over {env.world} processes: use a multiple of "
                          f"{env.world}")
    share = cfg.batch // env.world
    if cfg.micro_batch is not None and share % cfg.micro_batch:
        raise ConfigError(f"--micro-batch {cfg.micro_batch} does not divide this process's share of the batch "
                          f"({share} = --batch {cfg.batch} / {env.world} processes)")


def check_capture_run(cfg: TrainConfig, env: Environment, device: torch.device) -> None:
    """``--capture``: one process on a CUDA device, one micro-batch per optimizer step (the graph holds one forward
    and backward). The rest of what a graph cannot hold is refused by :meth:`TrainConfig.resolved`."""
    if not cfg.capture:
        return
    if device.type != "cuda":
        raise ConfigError(f"--capture replays CUDA graphs: it needs a CUDA device, not {device.type}")
    if env.world > 1:
        raise ConfigError(f"--capture runs one process, not {env.world}: start the run without torchrun")
    if cfg.micro_batch is not None and cfg.micro_batch != cfg.batch:
        raise ConfigError(f"--capture replays one micro-batch per optimizer step: drop --micro-batch "
                          f"{cfg.micro_batch} (or make it --batch {cfg.batch})")


def total_steps(cfg: TrainConfig, task: Task) -> int:
    """``--max-steps``, or enough global batches for ``--epochs`` passes over the rows."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * len(task.rows or []) / cfg.batch))


def auto_ranks(cfg: TrainConfig, model: nn.Module, task: Task, config: AdapterConfig, device: torch.device,
               env: Environment, mode: str, run: RunDir, resuming: bool) -> AdapterConfig:
    """``--ranks auto``: the rank (and alpha) pattern allocated on the main process from the first training
    micro-batches and shared with the others; a resumed run reuses ``OUT/ranks.json``."""
    saved = run.path / RANKS_NAME
    if resuming and saved.is_file():
        patterns = json.loads(saved.read_text(encoding="utf-8"))
    else:
        patterns = None
        if env.is_main:
            micro = cfg.micro_batch or cfg.batch // env.world
            order = DataOrder(None if task.rows is None else len(task.rows), cfg.seed)
            indices = order.take(0, micro * CALIBRATION_BATCHES)
            batches = [task.batch(indices[k:k + micro], device) for k in range(0, len(indices), micro)]
            objective = task.objective(model)
            new = allocate_ranks(trained_part(model), batches, config, budget=cfg.rank_budget,
                                 loss_fn=lambda _part, batch: objective(**batch)[0])
            patterns = {"rank_pattern": new.rank_pattern, "alpha_pattern": new.alpha_pattern}
            saved.write_text(json.dumps(patterns, indent=1), encoding="utf-8")
        patterns = broadcast_object(patterns, mode)
    return dataclasses.replace(config, **patterns)


def _finish_complete(run: RunDir, reporter: Reporter) -> None:
    """A resumed run that had already finished: its final adapter is the last checkpoint's."""
    step, latest = checkpoint.checkpoints(run.path)[-1]
    for name in (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME):
        shutil.copyfile(latest / name, run.path / name)
    reporter.note(f"the run in {run.path} is complete (step {step}); nothing to train")


def train(config: TrainConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train an adapter as ``config`` says; returns the summary (steps, final and eval loss, tokens/s, peak
    memory, where the adapter is). Under torchrun every process calls this."""
    reporter = reporter if reporter is not None else Reporter()
    env = environment()
    mode = resolve_mode(config.distributed, env)
    device = device_for(config.device, env)
    cfg = config.resolved(cuda=device.type == "cuda")
    check_dependencies("slimtune", cfg.quant, ("diffusers",) if cfg.task == "diffusion" else ())
    check_model_task(cfg)
    check_capture_run(cfg, env, device)
    if cfg.ranks not in (None, "auto"):
        read_rank_pattern(cfg.ranks)
    seq = sequence_length(cfg)
    task = make_task(cfg)
    task.load(seq)
    check_batch(cfg, env)
    max_steps = total_steps(cfg, task)
    if cfg.plain_layers == "auto":
        cfg = dataclasses.replace(cfg, plain_layers=auto_plain_layers(cfg, seq, env, device, reporter))
    run = RunDir(cfg.out)
    prints = fingerprints(cfg)
    resuming = run.check(cfg, prints)
    criterion = variant_criterion()
    set_variant_criterion(cfg.variant_criterion)
    try:
        return _train(cfg, env, mode, device, task, max_steps, run, prints, resuming, seq, reporter)
    finally:
        set_variant_criterion(criterion)


def _train(cfg: TrainConfig, env: Environment, mode: str, device: torch.device, task: Task, max_steps: int,
           run: RunDir, prints: dict[str, str | None], resuming: bool, seq: int, reporter: Reporter) -> dict[str, Any]:
    """:func:`train` once its input is checked."""
    timings = run.path / TIMINGS_NAME
    if resuming and cfg.variant_criterion == "timed" and timings.is_file():
        load_timings(timings)  # the choices the run made before: a resumed run repeats them
    with process_group(mode, device):
        # the model, its DDP or FSDP wrapper and the optimizer live in the call below: they are gone when it returns,
        # before the group is torn down
        summary = _train_in_group(cfg, env, mode, device, task, max_steps, run, prints, resuming, seq, reporter)
    reporter.finish(summary)
    return summary


def _train_in_group(cfg: TrainConfig, env: Environment, mode: str, device: torch.device, task: Task, max_steps: int,
                    run: RunDir, prints: dict[str, str | None], resuming: bool, seq: int,
                    reporter: Reporter) -> dict[str, Any]:
    """:func:`_train`'s steps, within the process group."""
    barrier(mode)  # every process has looked at OUT before the main one writes to it
    if env.is_main:
        if resuming:
            checkpoint.remove_stale(run.path)
        else:
            run.start(cfg, prints, {"labels": task.labels, "num_labels": task.num_labels, "seq": seq,
                                    "max_steps": max_steps, "device": device.type})
    barrier(mode)
    model = build_base(cfg, device, task.num_labels)
    adapter = adapter_config(cfg, model)
    if cfg.ranks == "auto":
        adapter = auto_ranks(cfg, model, task, adapter, device, env, mode, run, resuming)
    prepare_model(cfg, model, adapter)
    objective = task.objective(model)
    parts = Parts(objective, wrap(objective, model, mode, device), trained_part(model))
    trainable = [p for p in objective.parameters() if p.requires_grad]
    # fused AdamW kernels on CUDA (transformers' Trainer defaults to them too); PyTorch's default elsewhere (the
    # CPU, and FSDP's sharded DTensor parameters)
    fused = device.type == "cuda" and mode != "fsdp"
    # --capture: its step counters on the GPU (the loop gives it a learning rate tensor before capturing)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None,
                                  capturable=cfg.capture)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, max_steps)
    loop = Loop(cfg, task, parts, optimizer, scheduler, max_steps, env, mode, device, run, reporter)
    latest = checkpoint.checkpoints(run.path)[-1:] if resuming else []
    if latest:
        loop.restore(latest[0][1])
    if resuming and env.is_main:
        run.trim_log(loop.at.step)  # the lines of steps this run repeats
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak reported is training's, not the model build's
    reporter.start({"task": cfg.task, "model": cfg.model_name, "method": cfg.method, "processes": env.world,
                    "distributed": mode, "device": str(device), "dtype": cfg.dtype, "max_steps": max_steps,
                    "start_step": loop.at.step, "rows": None if task.rows is None else len(task.rows),
                    "eval_rows": len(task.eval_rows), "seq": seq,
                    "trainable_params": sum(p.numel() for p in trainable),
                    "total_params": sum(p.numel() for p in objective.parameters())})
    try:
        if loop.at.step >= max_steps and env.is_main:
            _finish_complete(run, reporter)
        summary = loop.run_steps()
    finally:
        reporter.close()
    return summary
