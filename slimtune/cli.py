"""The ``slimtune`` command line. Thin: every argument is parsed here, and presented here; the work is in
:mod:`slimtune.memory` (and the library).

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
import dataclasses
import importlib.util
import json
import sys
from typing import Any, Callable, Sequence

from rich.console import Console

from .errors import ConfigError, MissingDependencyError, SlimtuneError
from .memory.estimate import estimate_memory
from .memory.options import BACKENDS, METHODS, QUANTS, ProfileOptions, check_dependencies
from .memory.plan import (CONTEXT_BYTES, DEFAULT_TFLOPS, FOOTNOTE, FRAGMENTATION, GiB, breakdown_table, parse_size,
                          search, search_table, summary_table, usable_bytes)
from .memory.plot import plot_results, require_matplotlib
from .memory.profile import model_dependencies, profile_options
from .memory.report import (BACKEND_LABELS, activations_table, comparison_ratios, describe_run, format_bytes,
                            memory_notes, results_table)
from .memory.report import breakdown_table as profile_breakdown_table
from .memory.subproc import can_stage, run_children, serve_child
from .memory.sweep import (SEED_METHODS, SEED_PRESETS, SWEEP_METHODS, TINY_PRESETS, SweepSpec, merge_results, run_sweep,
                           sweep_configs, sweep_method, write_reports)
from .models.diffusion import DiffusionPreset
from .models.presets import PRESETS, get_preset
from .models.workload import METHODS as WORKLOAD_METHODS
from .version import __version__


class UsageError(Exception):
    """Bad command-line arguments (reported in one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _stderr_console() -> Any:
    return Console(stderr=True)


def _print_error(message: str) -> None:
    print(message if message.startswith("slimtune") else f"slimtune: error: {message}", file=sys.stderr)


# -- slimtune profile -------------------------------------------------------------------------------
def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one profile configuration (``slimtune profile`` and its child processes)."""
    parser.add_argument("--preset", default="tiny-llama", metavar="NAME",
                        help=f"model preset: {', '.join(PRESETS)} (default: tiny-llama)")
    parser.add_argument("--method", default="lora", metavar="{" + ",".join(METHODS) + "}",
                        help="adapter method, or none = full fine-tune; locon = LoRA on the linear and the "
                             "convolution layers (default: lora)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default: 16)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="adapter alpha where the method has one (default: the rank)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 4 on cuda, 2 on cpu)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default: 128)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (default: 4)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--backend", default="slimtune", metavar="{slimtune,peft,peft-bf16}",
                        help="slimtune; peft = PEFT default (float32 adapters); peft-bf16 = PEFT with "
                             "autocast_adapter_dtype=False (default: slimtune)")
    parser.add_argument("--model-dir", default=None, metavar="DIR",
                        help="a local Hugging Face causal-LM directory (config.json; weights loaded when present, "
                             "random init when absent) instead of --preset")
    parser.add_argument("--quant", default="none", metavar="{" + ",".join(QUANTS) + "}",
                        help="base weights: none, or nf4 = 4-bit NormalFloat with double quantisation (QLoRA; "
                             "bitsandbytes Linear4bit for the PEFT backends) (default: none)")
    parser.add_argument("--grad-checkpointing", "--grad-ckpt", dest="grad_checkpointing", action="store_true",
                        help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and token ids (default: 0)")
    parser.add_argument("--release-outputs", action="store_true",
                        help="drop each step's outputs (logits) once the loss is taken, before backward; by default "
                             "they live through backward into the next forward, as in the PEFT baseline protocol")


def options_from_args(args: argparse.Namespace) -> ProfileOptions:
    """:class:`ProfileOptions` from parsed :func:`add_profile_arguments` arguments (not yet resolved)."""
    alpha = args.alpha
    if alpha is not None and float(alpha).is_integer():
        alpha = int(alpha)
    return ProfileOptions(preset=args.preset, method=args.method, rank=args.rank, alpha=alpha, batch=args.batch,
                          seq=args.seq, steps=args.steps, device=args.device, dtype=args.dtype,
                          backend=args.backend, grad_checkpointing=args.grad_checkpointing, seed=args.seed,
                          release_outputs=args.release_outputs, quant=args.quant, model_dir=args.model_dir)


def _progress(disable: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=_stderr_console(), transient=True, disable=disable)


def _profile_here(options: Any, quiet: bool) -> Any:
    """Profile in this process with a progress bar over the steps."""
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
    options = options_from_args(args).resolved()
    if args.plot:
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
        plot_results(results, args.plot, title=describe_run(results[0]))

    if args.json:
        if args.compare_peft:
            payload: Any = {"results": [r.to_dict() for r in results], "ratios": comparison_ratios(results)}
        else:
            payload = results[0].to_dict()
        print(json.dumps(payload))
    else:
        console = Console()
        console.print(describe_run(results[0]), highlight=False)
        console.print(results_table(results))
        for table in (profile_breakdown_table(results), activations_table(results)):
            if table is not None:
                console.print(table)
        for note in memory_notes(results):
            console.print(f"[dim]{note}[/dim]", highlight=False)
        if args.plot:
            console.print(f"plot: {args.plot}", highlight=False)
    return 0 if all(r.ok for r in results) else 1


def _cmd_profile_child(args: argparse.Namespace) -> int:
    return serve_child(options_from_args(args), wait=args.wait)


def _add_profile_parser(subparsers: Any) -> None:
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
    # one configuration in this process, one JSON line on stdout: what ``slimtune profile --compare-peft`` and
    # ``slimtune sweep`` start per configuration (slimtune.memory.subproc); not listed in --help
    child = subparsers.add_parser("profile-child")
    add_profile_arguments(child)
    child.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    child.set_defaults(handler=_cmd_profile_child)


COMMANDS: list[Callable[[Any], None]] = [_add_profile_parser]


# -- slimtune sweep ---------------------------------------------------------------------------------
def _cmd_sweep(args: argparse.Namespace) -> int:
    plot = not args.no_plot
    if plot:
        if importlib.util.find_spec("matplotlib") is None:
            _print_error("matplotlib not installed: no plot (pip install 'slimtune[plot]')")
            plot = False
    if args.merge:
        files = write_reports(merge_results(args.merge), args.out, plot=plot)
        print(files["markdown"].read_text(encoding="utf-8"))
        for kind, path in files.items():
            print(f"{kind}: {path}", file=sys.stderr)
        return 0
    spec = SweepSpec(presets=args.presets, methods=args.methods, backends=args.backends, batch=args.batch,
                     seq=args.seq, rank=args.rank, steps=args.steps, device=args.device, dtype=args.dtype,
                     grad_checkpointing=args.grad_checkpointing, seed=args.seed)
    configs = sweep_configs(spec)
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
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """``slimtune plan``'s arguments."""
    parser.add_argument("--model", "--preset", dest="model", default="llama-7b", metavar="NAME",
                        help=f"model preset: {', '.join(PRESETS)} (default: llama-7b)")
    parser.add_argument("--gpu-mem", default=None, metavar="SIZE",
                        help="GPU memory to fit, e.g. 16GB, 24GB, 80GB (GB = GiB). Required for the search")
    parser.add_argument("--method", default=None,
                        help=f"one method ({', '.join(WORKLOAD_METHODS)}): print its predicted breakdown")
    parser.add_argument("--methods", default=None,
                        help="methods to search (comma-separated; default: all for the model)")
    parser.add_argument("--rank", "--ranks", dest="ranks", default="16", help="rank(s) (default: 16)")
    parser.add_argument("--quant", default=None, help="none, nf4 or none,nf4 (default: none,nf4 when searching)")
    parser.add_argument("--batch", default=None, help="batch size(s) (default: 1,2,4,8; one value: 4)")
    parser.add_argument("--seq", default=None, help="sequence length(s) for language models (default: 512,1024,2048)")
    parser.add_argument("--resolution", default=None,
                        help="latent side(s) for diffusion models (default: the model's sample size)")
    parser.add_argument("--grad-ckpt", choices=("off", "on", "both"), default=None,
                        help="gradient checkpointing (default: both when searching, off for one method)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of weights and activations (default bf16)")
    parser.add_argument("--release-outputs", action="store_true",
                        help="the training loop drops each step's outputs (logits) before backward")
    parser.add_argument("--top", type=int, default=15, help="rows to list (default: 15)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help=f"effective TFLOP/s of the throughput model (default {DEFAULT_TFLOPS:g})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _cmd_plan(args: argparse.Namespace) -> int:
    """``slimtune plan``: the search (``--gpu-mem``) or one configuration's breakdown (``--method``)."""
    spec = get_preset(args.model)
    diffusion = isinstance(spec, DiffusionPreset)
    gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem is not None else None
    gc_choice = args.grad_ckpt
    console = Console(stderr=args.json)
    if args.method is not None:
        ranks, batches = _int_list(args.ranks), _int_list(args.batch or "4")
        seqs = _int_list(args.seq or "512")
        res = _int_list(args.resolution)[0] if args.resolution else None
        if len(ranks) > 1 or len(batches) > 1 or len(seqs) > 1:
            raise ConfigError("--method predicts one configuration: give one --rank, --batch and --seq "
                              "(or use --methods with --gpu-mem to search)")
        quant = args.quant or "none"
        est = estimate_memory(spec, args.method, ranks[0], batch=batches[0], seq=seqs[0], resolution=res, quant=quant,
                              dtype=args.dtype, grad_checkpointing=gc_choice == "on",
                              release_outputs=args.release_outputs, reduced_depth=True)
        if args.json:
            payload = est.to_dict()
            if gpu_mem is not None:
                payload["fits"] = est.peak_bytes <= usable_bytes(gpu_mem)
            print(json.dumps(payload))
        else:
            console.print(breakdown_table(est, gpu_mem))
        return 0
    if gpu_mem is None:
        raise ConfigError("give --gpu-mem SIZE to search what fits, or --method (and --rank, --batch, --seq) "
                          "for one configuration's breakdown")
    checkpointing = {"off": (False,), "on": (True,)}.get(gc_choice or "both", (False, True))
    with console.status(f"simulating {spec.name} on the meta device…") as status:
        rows = search(spec, gpu_mem, methods=_str_list(args.methods) if args.methods else None,
                      ranks=_int_list(args.ranks), quants=_str_list(args.quant or "none,nf4"),
                      batches=_int_list(args.batch or "1,2,4,8"), seqs=_int_list(args.seq or "512,1024,2048"),
                      resolutions=_int_list(args.resolution) if args.resolution else None,
                      grad_checkpointing=checkpointing, dtype=args.dtype, release_outputs=args.release_outputs,
                      tflops=args.tflops, on_group=lambda text: status.update(f"simulating {spec.name}: {text}…"))
    if args.json:
        print(json.dumps({"model": spec.name, "gpu_mem_bytes": gpu_mem, "budget_bytes": usable_bytes(gpu_mem),
                          "rows": [r.to_dict() for r in rows], "skipped": rows.skipped}))
        return 0
    console.print(f"[bold]{spec.name}[/bold] — {spec.description}", highlight=False)
    console.print(summary_table(rows, gpu_mem, diffusion))
    console.print(search_table(rows, gpu_mem, args.top, diffusion))
    for line in rows.skipped:
        console.print(f"[yellow]not simulated[/yellow] {line}", highlight=False)
    console.print(f"[dim]{FOOTNOTE.format(ctx=CONTEXT_BYTES / GiB, keep=1 - FRAGMENTATION)}[/dim]", highlight=False)
    if str(args.dtype).lower() in ("bfloat16", "bf16"):
        console.print("[dim]bf16 needs an Ampere or newer GPU; on a V100/T4 train in fp16 (--dtype float16): "
                      "the same memory.[/dim]", highlight=False)
    return 0 if any(r.fits for r in rows) else 1


def _add_plan_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan", help="predict memory: what fits a GPU, or one configuration's breakdown (nothing is allocated)",
        description="Predict training memory from the model's configuration alone (a simulated step on PyTorch's "
                    "meta device). With --gpu-mem: every configuration (method, rank, quantisation, batch, sequence "
                    "length, gradient checkpointing) that fits the card, fastest first. With --method: one "
                    "configuration's predicted breakdown.")
    add_plan_arguments(parser)
    parser.set_defaults(handler=_cmd_plan)


COMMANDS.append(_add_plan_parser)


def build_parser() -> argparse.ArgumentParser:
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
