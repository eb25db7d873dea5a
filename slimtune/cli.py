"""The ``slimtune`` command line. Thin: arguments and presentation here, the work in :mod:`slimtune.memory`.

``slimtune profile`` trains a few steps of a preset model (random weights) and reports parameters,
memory after model creation, peak memory and median step time; ``--compare-peft`` runs the same
configuration through PEFT too (float32 adapters as PEFT defaults to, and bf16 adapters), each in its
own process, and adds slimtune/PEFT ratios. ``slimtune sweep`` profiles a grid of presets x methods x
backends (the seed study's tables: after creation / after 1 step) into OUT/sweep.{jsonl,md,png}.

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
        build = progress.add_task(f"building {options.model_name} on {options.device}", total=None)
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
    from .memory.profile import model_dependencies
    from .memory.report import (activations_table, breakdown_table, comparison_ratios, describe_run, memory_notes,
                                results_table)

    options = options_from_args(args).resolved()
    if args.plot:
        from .memory.plot import require_matplotlib

        require_matplotlib()  # fail before the run, not after it
    if args.compare_peft:
        if options.method == "none":
            raise ConfigError("--compare-peft compares adapters: use it with an adapter method (e.g. --method lora), "
                              "not --method none")
        if options.backend != "slimtune":
            raise ConfigError("--compare-peft runs slimtune and both PEFT variants itself: drop --backend")
        check_dependencies("peft", options.quant, model_dependencies(options))
        results = _profile_compare(options, quiet=args.json)
    else:
        check_dependencies(options.backend, options.quant, model_dependencies(options))
        results = [_profile_here(options, quiet=args.json)]
    if args.plot:
        from .memory.plot import plot_results

        plot_results(results, args.plot, title=describe_run(results[0]))

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
        for table in (breakdown_table(results), activations_table(results)):
            if table is not None:
                console.print(table)
        for note in memory_notes(results):
            console.print(f"[dim]{note}[/dim]", highlight=False)
        if args.plot:
            console.print(f"plot: {args.plot}", highlight=False)
    return 0 if all(r.ok for r in results) else 1


def _add_profile_parser(subparsers: Any) -> None:
    from .memory.profile import add_profile_arguments

    parser = subparsers.add_parser(
        "profile", help="measure memory and step time of a few training steps",
        description="Train a few steps of a preset (an LLM, or a diffusion UNet/DiT) or of a local Hugging Face "
                    "model directory and report parameters, memory after model creation and after the first "
                    "step, peak memory broken down into base weights, adapter weights, gradients, optimizer "
                    "state, activations (by module kind) and temporaries, and the median step time.")
    add_profile_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also write a stacked-bar plot of the memory breakdown (needs matplotlib)")
    parser.add_argument("--compare-peft", action="store_true",
                        help="also run PEFT (default fp32 adapters, and bf16 adapters), each configuration in "
                             "its own process, and report slimtune/PEFT ratios")
    parser.set_defaults(handler=_cmd_profile)


COMMANDS: list[Callable[[Any], None]] = [_add_profile_parser]


# -- slimtune sweep ---------------------------------------------------------------------------------
def _cmd_sweep(args: argparse.Namespace) -> int:
    from .memory.options import check_dependencies
    from .memory.report import format_bytes
    from .memory.sweep import SweepSpec, run_sweep, sweep_configs, sweep_method

    plot = not args.no_plot
    if plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            _print_error("matplotlib not installed: no plot (pip install 'slimtune[plot]')")
            plot = False
    if args.merge:
        from .memory.sweep import merge_results, write_reports

        files = write_reports(merge_results(args.merge), args.out, plot=plot)
        print(files["markdown"].read_text(encoding="utf-8"))
        for kind, path in files.items():
            print(f"{kind}: {path}", file=sys.stderr)
        return 0
    spec = SweepSpec(presets=args.presets, methods=args.methods, backends=args.backends, batch=args.batch,
                     seq=args.seq, rank=args.rank, steps=args.steps, device=args.device, dtype=args.dtype,
                     grad_checkpointing=args.grad_checkpointing, seed=args.seed)
    configs = sweep_configs(spec)
    from .memory.profile import model_dependencies

    for backend, quant, extra in {(c.backend, c.quant, model_dependencies(c)) for c in configs}:
        check_dependencies(backend, quant, extra)
    interactive = sys.stderr.isatty()
    with _progress(disable=not interactive) as progress:
        task = progress.add_task(f"{len(configs)} configurations", total=len(configs))

        def started(_i: int, options: Any) -> None:
            progress.update(task, description=f"{options.model_name} {sweep_method(options)} · {options.backend}")

        def done(_i: int, result: Any) -> None:
            progress.advance(task)
            if not interactive:
                peak = format_bytes(result.peak_first_step_bytes)
                print(f"slimtune sweep: {result.label}: {result.status}, created "
                      f"{format_bytes(result.mem_created_bytes)}, 1 step {peak}, setup {result.setup_time_s} s, "
                      f"step {result.step_time_s} s", file=sys.stderr, flush=True)

        results, files = run_sweep(configs, out=args.out, resume=args.resume,
                                   isolate=None if args.isolate is None else args.isolate == "process",
                                   timeout=args.timeout, on_start=started, on_done=done, plot=plot)
    print(files["markdown"].read_text(encoding="utf-8"))
    for kind, path in files.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return 0 if all(r.status in ("ok", "OOM") for r in results) else 1


def _add_sweep_parser(subparsers: Any) -> None:
    from .memory.options import BACKENDS
    from .memory.sweep import SEED_METHODS, SEED_PRESETS, SWEEP_METHODS, TINY_PRESETS

    parser = subparsers.add_parser(
        "sweep", help="profile a grid of models x methods x backends (the seed study's tables)",
        description="Profile every preset x method x backend (each configuration in its own process on CUDA) "
                    "and write OUT/sweep.jsonl, OUT/sweep.md (after creation / after 1 step per backend, the "
                    "breakdown, activations by module kind) and OUT/sweep.png. Out-of-memory runs are recorded "
                    "as OOM. Defaults reproduce the seed study: " + ", ".join(SEED_PRESETS) + " with "
                    + ", ".join(SEED_METHODS) + ", slimtune and PEFT.")
    parser.add_argument("--presets", nargs="+", default=None, metavar="NAME",
                        help=f"presets (default: {' '.join(SEED_PRESETS)} on cuda, {' '.join(TINY_PRESETS)} on cpu)")
    parser.add_argument("--methods", nargs="+", default=list(SEED_METHODS), metavar="METHOD",
                        help=f"{', '.join(SWEEP_METHODS)}; qlora = LoRA over NF4, none = full fine-tune "
                             f"(default: {' '.join(SEED_METHODS)})")
    parser.add_argument("--backends", nargs="+", default=["slimtune", "peft"], metavar="BACKEND",
                        help=f"{', '.join(BACKENDS)} (default: slimtune peft)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--seq", type=int, default=512, help="LLM sequence length (default: 512)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default: 16)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration (default: 3)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--grad-checkpointing", "--grad-ckpt", dest="grad_checkpointing", action="store_true",
                        help="gradient checkpointing in every configuration")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default: 0)")
    parser.add_argument("--out", default="sweep-results", metavar="DIR",
                        help="output directory (default: sweep-results)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the ok/OOM results already in OUT/sweep.jsonl and run only the rest")
    parser.add_argument("--isolate", choices=("process", "none"), default=None,
                        help="process: each configuration in its own process (default on cuda); none: all in "
                             "this process (default on cpu, where memory is accounted)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per configuration process (default: 600)")
    parser.add_argument("--no-plot", action="store_true", help="do not write sweep.png")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSONL",
                        help="run nothing: merge these sweep.jsonl files (pieces of one sweep) into OUT's report")
    parser.set_defaults(handler=_cmd_sweep)


COMMANDS.append(_add_sweep_parser)


# -- slimtune plan ----------------------------------------------------------------------------------
def _add_plan_parser(subparsers: Any) -> None:
    from .memory.plan import add_plan_arguments, run_plan

    parser = subparsers.add_parser(
        "plan", help="predict memory: what fits a GPU, or one configuration's breakdown (nothing is allocated)",
        description="Predict training memory from the model's configuration alone (a simulated step on PyTorch's "
                    "meta device). With --gpu-mem: every configuration (method, rank, quantisation, batch, sequence "
                    "length, gradient checkpointing) that fits the card, fastest first. With --method: one "
                    "configuration's predicted breakdown.")
    add_plan_arguments(parser)
    parser.set_defaults(handler=run_plan)


COMMANDS.append(_add_plan_parser)


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
