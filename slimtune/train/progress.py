"""What a run shows while it trains: a rich progress bar (loss, tokens/s, peak memory, ETA) and a final summary,
or, with ``--json``, one JSON object per line on stdout (``{"event": "start" | "step" | "eval" | "checkpoint" |
"summary", ...}``). Only the main process reports; the others get :class:`Reporter` (silent).

Records (dicts) come from :mod:`.loop`: a step has ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``peak_mem_bytes``, ``elapsed_s``, ``eta_s``; an evaluation ``step``, ``eval_loss`` (and ``eval_accuracy`` for
classification).
"""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..memory.report import format_bytes
from .distributed import environment


class Reporter:
    """Reports nothing (the base, and what non-main processes get)."""

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, record: dict[str, Any]) -> None: ...

    def eval(self, record: dict[str, Any]) -> None: ...

    def checkpoint(self, record: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonReporter(Reporter):
    """One JSON line per event on stdout, flushed as it happens; notes on stderr."""

    def _emit(self, event: str, record: dict[str, Any]) -> None:
        print(json.dumps({"event": event, **record}), flush=True)

    def start(self, info):
        self._emit("start", info)

    def step(self, record):
        self._emit("step", record)

    def eval(self, record):
        self._emit("eval", record)

    def checkpoint(self, record):
        self._emit("checkpoint", record)

    def note(self, text):
        print(f"slimtune train: {text}", file=sys.stderr, flush=True)

    def finish(self, summary):
        self._emit("summary", summary)


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


class RichReporter(Reporter):
    """A progress bar on stderr (when it is a terminal; otherwise a line now and then) and a summary table."""

    def __init__(self) -> None:
        self.err = Console(stderr=True)
        self.interactive = self.err.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self.every = 1

    def start(self, info):
        self.err.print(f"[bold]slimtune train[/bold] {info['task']} · {info['model']} · {info['method']} "
                       f"(trainable {info['trainable_params']:,} of {info['total_params']:,}) · {info['processes']} "
                       f"process(es), {info['distributed']} · {info['device']} {info['dtype']}", highlight=False)
        total, done = info["max_steps"], info["start_step"]
        self.every = max(1, total // 20)
        if self.interactive:
            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                                     TextColumn("peak {task.fields[peak]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=self.err, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, completed=done, loss="—", speed="", peak="—")

    def step(self, record):
        speed = f"{record['tokens_per_s']:,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], loss=_loss(record["loss"]), speed=speed,
                                 peak=format_bytes(record["peak_mem_bytes"]))
        elif record["step"] % self.every == 0:
            self.err.print(f"step {record['step']}: loss {_loss(record['loss'])}, {speed}, peak "
                           f"{format_bytes(record['peak_mem_bytes'])}, ETA {record['eta_s']:.0f} s", highlight=False)

    def eval(self, record):
        accuracy = f", accuracy {record['eval_accuracy']:.3f}" if record.get("eval_accuracy") is not None else ""
        self._print(f"step {record['step']}: eval loss {_loss(record['eval_loss'])}{accuracy}")

    def checkpoint(self, record):
        if self.progress is None:
            self._print(f"step {record['step']}: checkpoint {record['path']}")

    def note(self, text):
        self._print(text)

    def _print(self, text: str) -> None:
        (self.progress.console if self.progress is not None else self.err).print(text, highlight=False)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self, summary):
        self.close()
        table = Table(title="slimtune train", show_header=False)
        rows = [("steps", f"{summary['steps']} ({summary['epochs']:.2f} epochs)" if summary.get("epochs")
                 else str(summary["steps"])),
                ("final loss", _loss(summary["final_loss"])),
                ("eval loss", _loss(summary.get("eval_loss"))),
                ("eval accuracy", "—" if summary.get("eval_accuracy") is None else f"{summary['eval_accuracy']:.3f}"),
                ("tokens", f"{summary['tokens']:,}"),
                ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
                ("peak memory", f"{format_bytes(summary['peak_mem_bytes'])} ({summary['memory_kind']})"),
                ("time", f"{summary['elapsed_s']:.1f} s"),
                ("adapter", summary["adapter"])]
        for name, value in rows:
            table.add_row(name, value)
        Console().print(table)


def make_reporter(json_lines: bool) -> Reporter:
    """The reporter of this process: JSON lines or rich output on the main process (torchrun's rank 0), silence
    elsewhere."""
    if not environment().is_main:
        return Reporter()
    return JsonReporter() if json_lines else RichReporter()
