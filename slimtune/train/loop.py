"""The training loop: global batches split over processes and micro-batches, AdamW with a cosine schedule,
evaluation on the held-out rows, checkpoints, and the records the reporter and ``log.jsonl`` get.

One optimizer step takes ``batch`` rows from the data order (:mod:`.order`); this process takes its contiguous
share and runs it ``micro_batch`` rows at a time, gradients accumulating (reduced across processes on the last
micro-batch only). Each micro-batch's summed loss is scaled by ``processes / targets in the global batch`` —
DDP and FSDP average gradients over processes — so the step follows the mean loss over every target of the global
batch whatever the split: one process with accumulation and N processes compute the same step (up to the order
of floating-point sums). Then the gradient norm is clipped (``max_grad_norm``, as transformers' Trainer does by
default), AdamW steps, the scheduler steps (:func:`cosine_schedule`: linear warm-up, then cosine to zero), and
gradients are dropped.

``--capture`` (one process, one micro-batch per step, shapes fixed: :meth:`TrainConfig.resolved` and
:func:`~slimtune.train.run.check_capture_run` check it): the first step records forward, backward, clipping and
AdamW as one CUDA graph (:func:`slimtune.capture_step`, after its eager warm-up steps, which it undoes), and every
step replays it on that step's batch. The loss scale enters the graph as a tensor of the batch (the number of
targets differs between packed batches); the learning rate is a tensor the scheduler writes in place. The summed
loss it reports is the replayed, scaled loss divided back (equal up to one rounding).
"""
from __future__ import annotations

import dataclasses
import math
import resource
import time
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..core.capture import CapturedStep, capture_step
from ..core.siblings import relearn
from ..core.timed import save_timings
from ..models.diffusion import training_attention
from . import checkpoint
from .config import TrainConfig
from .distributed import Environment, all_gather_objects, all_reduce_sum, barrier, gradient_sync
from .order import DataOrder
from .progress import Reporter
from .rundir import RunDir
from .tasks import Task

TIMINGS_NAME = "timings.json"  # --variant-criterion timed: the measured variant choices (slimtune.core.timed)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """The learning rate rises linearly over ``warmup`` steps, then falls along half a cosine to 0 at ``total``
    (transformers' ``get_cosine_schedule_with_warmup``, without importing its trainer utilities)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)


@dataclasses.dataclass
class Position:
    """How far the run is: optimizer steps done, rows consumed (all processes), tokens seen, seconds trained."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: the CUDA allocator's peak, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu peak RSS"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@dataclasses.dataclass
class Parts:
    """What the loop trains: the objective (unwrapped, and as it runs: in DDP or sharded), the model's adapted part."""

    objective: nn.Module
    wrapped: nn.Module
    part: nn.Module


class Loop:
    def __init__(self, cfg: TrainConfig, task: Task, parts: Parts, optimizer: torch.optim.Optimizer,
                 scheduler: Any, max_steps: int, env: Environment, mode: str, device: torch.device,
                 run: RunDir, reporter: Reporter) -> None:
        self.cfg, self.task, self.parts = cfg, task, parts
        self.optimizer, self.scheduler, self.max_steps = optimizer, scheduler, max_steps
        self.env, self.mode, self.device, self.run, self.reporter = env, mode, device, run, reporter
        self.order = DataOrder(None if task.rows is None else len(task.rows), cfg.seed)
        self.share = cfg.batch // env.world
        self.micro = cfg.micro_batch or self.share
        self.trainable = [p for p in parts.objective.parameters() if p.requires_grad]
        self.at = Position()
        self.last_eval: dict[str, Any] = {}
        self.started = Position()  # where this process's run began (a resumed run's checkpoint)
        self.attention = training_attention(parts.objective, device)  # the step's SDPA backends (a DiT's on CUDA)
        self.captured: CapturedStep | None = None  # --capture: the step's graph, recorded at the first step

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """Run one step; ``(summed loss on this process, gradient norm, targets, tokens)`` of the global batch."""
        indices = self.order.take(self.at.position, self.cfg.batch)
        targets = sum(self.task.targets(i) for i in indices)
        tokens = sum(self.task.tokens(i) for i in indices)
        mine = indices[self.env.rank * self.share:(self.env.rank + 1) * self.share]
        chunks = [mine[k:k + self.micro] for k in range(0, len(mine), self.micro)]
        scale = self.env.world / max(targets, 1)
        if self.cfg.capture:
            total, norm = self._replay(self.task.batch(mine, self.device), scale)
            self.scheduler.step()
            return self._advance(targets, tokens, total, norm)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for k, chunk in enumerate(chunks):
            batch = self.task.batch(chunk, self.device)
            with gradient_sync(self.parts.wrapped, self.mode, sync=k == len(chunks) - 1), self.attention():
                loss, _ = self.parts.wrapped(**batch)
                (loss * scale).backward()
            total += loss.detach()
            del loss, batch
        norm = None
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._advance(targets, tokens, total, norm)

    def _advance(self, targets: int, tokens: int, total: torch.Tensor, norm: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        self.at.step += 1
        self.at.position += self.cfg.batch
        self.at.tokens += tokens
        return total, norm, targets, tokens

    def _replay(self, batch: dict[str, Any], scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``--capture``: one step as the captured graph's replay (captured first, at the first call); ``(summed
        loss, gradient norm before clipping)``."""
        inputs = {"batch": batch, "scale": torch.tensor(scale, dtype=torch.float32, device=self.device)}
        if self.captured is None:
            for group in self.optimizer.param_groups:  # what the graph reads each replay, the scheduler writes
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)

            def scaled_loss(b: dict[str, Any]) -> torch.Tensor:
                with self.attention():
                    loss, _ = self.parts.wrapped(**b["batch"])
                return loss * b["scale"]

            self.captured = capture_step(self.parts.wrapped, self.optimizer, scaled_loss, inputs,
                                         max_grad_norm=self.cfg.max_grad_norm or None)
        return self.captured(inputs) / scale, self.captured.grad_norm()

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Loss (and accuracy) on the held-out rows; every process runs the same number of forward passes."""
        rows = self.task.eval_rows
        per = math.ceil(len(rows) / self.env.world)
        mine = list(range(self.env.rank * per, min(len(rows), (self.env.rank + 1) * per)))
        loss_sum, correct = 0.0, 0.0
        self.parts.wrapped.eval()
        with torch.no_grad():
            for b in range(math.ceil(per / self.micro)):
                chunk = mine[b * self.micro:(b + 1) * self.micro]
                real = [True] * len(chunk) if chunk else [False]
                loss, right = self.parts.wrapped(**self.task.batch(chunk or [0], self.device, rows, real))
                loss_sum += float(loss)
                correct += float(right)
        self.parts.wrapped.train()
        loss_sum, correct = all_reduce_sum([loss_sum, correct], self.device, self.mode)
        record = {"step": self.at.step, "eval_loss": loss_sum / max(1, sum(r.targets for r in rows)),
                  "eval_accuracy": correct / len(rows) if self.task.num_labels else None}
        self.last_eval = record
        return record

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        """A checkpoint of the current step (every process takes part in gathering; the main one writes). Every
        process's fused LoRA layers relearn, as a run resumed from here does (:func:`~slimtune.core.siblings.relearn`)."""
        relearn(self.parts.objective)
        params, optim = checkpoint.gather(self.parts.objective, self.optimizer)
        rng = all_gather_objects(rng_state(self.device), self.mode)
        if self.env.is_main:
            state = dict(dataclasses.asdict(self.at), scheduler=self.scheduler.state_dict())
            adapter = checkpoint.peft_tensors(self.parts.objective, self.parts.part, params)
            path = checkpoint.save(self.run.path, self.at.step, state, params, optim, rng, adapter, self.parts.part,
                                   self.cfg.keep)
            if self.cfg.variant_criterion == "timed":  # the measured choices, so that a resumed run repeats them
                save_timings(self.run.path / TIMINGS_NAME)
            if self.at.step == self.max_steps:
                checkpoint.write_adapter(self.run.path, self.parts.part, adapter)
            self.reporter.checkpoint({"step": self.at.step, "path": str(path)})
        barrier(self.mode)

    def restore(self, directory: Any) -> None:
        """Continue from a checkpoint: parameters, optimizer, scheduler, position, and the RNG states when the
        number of processes is unchanged (else the generators are re-seeded from the seed, step and rank)."""
        state = checkpoint.load(directory, self.parts.objective, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.at = Position(**{f.name: state[f.name] for f in dataclasses.fields(Position)})
        rng = state["rng"].get(self.env.rank)
        if state["world"] == self.env.world and rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.at.step + self.env.rank)
            self.reporter.note(f"resumed on {self.env.world} processes from {state['world']}: random generators "
                               "re-seeded (the run continues, not bit for bit)")

    # -- the run ------------------------------------------------------------------------------------
    def _step_record(self, loss: float, norm: float | None, seconds: float, tokens: int) -> dict[str, Any]:
        done = self.at.step - self.started.step
        rate = (self.at.elapsed_s - self.started.elapsed_s) / done if done else 0.0
        return {"step": self.at.step, "loss": loss, "lr": float(self.scheduler.get_last_lr()[0]), "grad_norm": norm,
                "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                "peak_mem_bytes": peak_memory(self.device)[0], "epoch": self.order.epoch(self.at.position),
                "elapsed_s": round(self.at.elapsed_s, 3), "eta_s": rate * (self.max_steps - self.at.step)}

    def run_steps(self) -> dict[str, Any]:
        cfg = self.cfg
        self.started = dataclasses.replace(self.at)
        self.parts.wrapped.train()
        window_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        window_targets, window_tokens, window_start = 0, 0, time.perf_counter()
        start = time.perf_counter()
        final_loss = None
        while self.at.step < self.max_steps:
            loss, norm, targets, tokens = self.train_step()
            window_loss += loss
            window_targets += targets
            window_tokens += tokens
            self.at.elapsed_s = self.started.elapsed_s + time.perf_counter() - start
            last = self.at.step == self.max_steps
            if self.at.step % cfg.log_every == 0 or last:
                summed = all_reduce_sum([float(window_loss)], self.device, self.mode)[0]
                now = time.perf_counter()
                final_loss = summed / max(window_targets, 1)
                record = self._step_record(final_loss, None if norm is None else float(norm), now - window_start,
                                           window_tokens)
                window_loss.zero_()
                window_targets, window_tokens, window_start = 0, 0, now
                self._log(record)
                self.reporter.step(record)
            if self.task.eval_rows and ((cfg.eval_every and self.at.step % cfg.eval_every == 0) or last):
                record = self.evaluate()
                self._log({"event": "eval", **record})
                self.reporter.eval(record)
            if (cfg.save_every and self.at.step % cfg.save_every == 0) or last:
                self.save()
        return self.summary(final_loss, time.perf_counter() - start)

    def _log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            self.run.log(record)

    def summary(self, final_loss: float | None, seconds: float) -> dict[str, Any]:
        peak, kind = peak_memory(self.device)
        trained = self.at.tokens - self.started.tokens
        return {"steps": self.at.step, "epochs": self.order.epoch(self.at.position), "final_loss": final_loss,
                "eval_loss": self.last_eval.get("eval_loss"), "eval_accuracy": self.last_eval.get("eval_accuracy"),
                "tokens": self.at.tokens, "tokens_per_s": trained / seconds if seconds > 0 else 0.0,
                "peak_mem_bytes": peak, "memory_kind": kind, "elapsed_s": round(self.at.elapsed_s, 3),
                "adapter": str(self.run.path)}
