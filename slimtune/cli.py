"""The ``slimtune`` command line. Thin: arguments and presentation here, the work in :mod:`slimtune.memory`.

``slimtune profile`` trains a few steps of a preset model (random weights) and reports parameters,
memory after model creation, peak memory and median step time; ``--compare-peft`` runs the same
configuration through PEFT too (float32 adapters as PEFT defaults to, and bf16 adapters), each in its
own process, and adds slimtune/PEFT ratios.

Exit status: 0 success, 1 a run ran out of memory or failed (or a dependency is missing),
2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from .errors import ConfigError, SlimtuneError


class UsageError(Exception):
    """Bad command-line arguments (reported in one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _print_error(message: str) -> None:
    print(message if message.startswith("slimtune") else f"slimtune: error: {message}", file=sys.stderr)


# -- slimtune profile -------------------------------------------------------------------------------
def _progress(disable: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=_stderr_console(), transient=True, disable=disable)


def _profile_here(options: Any, quiet: bool) -> Any:
    """Profile in this process with a progress bar over the steps."""
    from .memory.profile import profile_options

    with _progress(disable=quiet or not sys.stderr.isatty()) as progress:
        build = progress.add_task(f"building {options.preset} on {options.device}", total=None)
        steps: list[Any] = []

        def prepared(_session: Any) -> None:
            progress.remove_task(build)
            steps.append(progress.add_task(f"{options.backend}: training steps", total=options.steps))

        def stepped(step: int, _seconds: float) -> None:
            progress.update(steps[0], completed=step)

        return profile_options(options, on_step=stepped, on_prepared=prepared)


def _profile_compare(options: Any, quiet: bool) -> list[Any]:
    """slimtune, PEFT default and PEFT bf16 adapters, each in its own process."""
    import dataclasses

    from .memory.report import BACKEND_LABELS
    from .memory.subproc import can_stage, run_children

    configs = [dataclasses.replace(options, backend=b) for b in ("slimtune", "peft", "peft-bf16")]
    staged = can_stage(configs)
    with _progress(disable=quiet or not sys.stderr.isatty()) as progress:
        first = "starting 3 processes (imports, model builds)" if staged else "starting"
        task = progress.add_task(first, total=len(configs))

        def started(_i: int, config: Any) -> None:
            progress.update(task, description=f"profiling {BACKEND_LABELS[config.backend]}")

        def done(_i: int, _result: Any) -> None:
            progress.advance(task)

        return run_children(configs, staged=staged, on_start=started, on_done=done)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .memory.profile import check_dependencies, options_from_args
    from .memory.report import comparison_ratios, cpu_breakdown_table, describe_run, results_table

    options = options_from_args(args).resolved()
    if args.compare_peft:
        if options.method != "lora":
            raise ConfigError("--compare-peft compares LoRA adapters: use it with --method lora")
        if options.backend != "slimtune":
            raise ConfigError("--compare-peft runs slimtune and both PEFT variants itself: drop --backend")
        check_dependencies("peft")
        results = _profile_compare(options, quiet=args.json)
    else:
        check_dependencies(options.backend)
        results = [_profile_here(options, quiet=args.json)]

    if args.json:
        if args.compare_peft:
            payload: Any = {"results": [r.to_dict() for r in results], "ratios": comparison_ratios(results)}
        else:
            payload = results[0].to_dict()
        print(json.dumps(payload))
    else:
        from rich.console import Console

        console = Console()
        console.print(describe_run(results[0]), highlight=False)
        console.print(results_table(results))
        breakdown = cpu_breakdown_table(results[0]) if len(results) == 1 else None
        if breakdown is not None:
            console.print(breakdown)
        if results[0].memory_kind == "cpu accounted":
            console.print("[dim]cpu accounted: parameters + buffers + gradients + optimizer state + tensors saved "
                          "for backward (no allocator statistics on the CPU; temporaries not included)[/dim]",
                          highlight=False)
    return 0 if all(r.ok for r in results) else 1


def _add_profile_parser(subparsers: Any) -> None:
    from .memory.profile import add_profile_arguments

    parser = subparsers.add_parser(
        "profile", help="measure memory and step time of a few training steps",
        description="Train a few steps of a preset Llama (random weights) and report parameters, memory after "
                    "model creation, peak memory and median step time.")
    add_profile_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--compare-peft", action="store_true",
                        help="also run PEFT (default fp32 adapters, and bf16 adapters), each configuration in "
                             "its own process, and report slimtune/PEFT ratios")
    parser.set_defaults(handler=_cmd_profile)


COMMANDS: list[Callable[[Any], None]] = [_add_profile_parser]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="slimtune", description="slimtune: parameter-efficient fine-tuning on one GPU.")
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimtune`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _print_error(str(exc))
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    from .models.presets import MissingDependencyError

    try:
        return handler(args)
    except MissingDependencyError as exc:
        _print_error(str(exc))
        return 1
    except SlimtuneError as exc:
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
