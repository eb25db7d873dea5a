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
import os
import sys
from typing import Any, Callable, Sequence

import torch
from rich.console import Console

from .errors import ConfigError, MissingDependencyError, SlimtuneError
from .interop import FORMATS as CONVERT_FORMATS
from .interop import convert as convert_adapter
from .interop import read_peft
from .memory.estimate import estimate_memory
from .memory.options import BACKENDS, METHODS, QUANTS, ProfileOptions, check_dependencies
from .memory.plan import (CONTEXT_BYTES, DEFAULT_TFLOPS, FOOTNOTE, FRAGMENTATION, GiB, breakdown_table, parse_size,
                          fit_plain_layers, search, search_table, summary_table, usable_bytes)
from .memory.plot import plot_results
from .memory.setting import MEMORY_SETTINGS, memory_setting
from .memory.profile import model_dependencies, profile_options
from .memory.report import (BACKEND_LABELS, activations_table, comparison_ratios, describe_run, format_bytes,
                            memory_notes, results_table)
from .memory.report import breakdown_table as profile_breakdown_table
from .memory.subproc import can_stage, run_children, serve_child
from .memory.sweep import (SEED_METHODS, SEED_PRESETS, SWEEP_METHODS, TINY_PRESETS, SweepSpec, merge_results, run_sweep,
                           sweep_configs, sweep_method, write_reports)
from .models.deps import require_pyplot
from .models.diffusion import DiffusionPreset, build_parts
from .models.explain import explain_preset
from .core.explain import explanation_table
from .core.timed import load_timings
from .models.presets import PRESETS, get_preset, preset_from_dir
from .models.workload import METHODS as WORKLOAD_METHODS
from .models.workload import make_adapter_config
from .ranks import ALLOCATORS as RANK_ALLOCATORS
from .ranks import METHODS as SENSITIVITY_METHODS
from .ranks import plan_ranks
from .ranks.report import allocation_table, plot_allocation
from .train import TASKS as TRAIN_TASKS
from .train import TrainConfig, make_reporter, train
from .train.calibration import load_calibration
from .train.encode import encode_dataset
from .train.export import BASES as EXPORT_BASES
from .train.export import export_merged
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
    parser.add_argument("--memory", default="fast", metavar="{fast,balanced,max-fit}",
                        help="fast = nothing extra; balanced = chunked loss + per-layer checkpointing (diffusion "
                             "models: the feed-forward projections recomputed); max-fit = balanced + checkpointed "
                             "inputs offloaded to CPU memory, language models only (slimtune backend; with "
                             "--compare-peft, PEFT gets transformers' checkpointing) (default: fast)")
    parser.add_argument("--plain-layers", type=int, default=0, metavar="N", help=PLAIN_LAYERS_HELP)
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP + " (PEFT's too, with --compare-peft)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and token ids (default: 0)")
    parser.add_argument("--release-outputs", action="store_true",
                        help="drop each step's outputs (logits) once the loss is taken, before backward; by default "
                             "they live through backward into the next forward, as in the PEFT baseline protocol")


PLAIN_LAYERS_HELP = ("with --memory balanced or max-fit: leave the last N transformer layers un-checkpointed "
                     "(faster: no recompute for them; each keeps one layer's activations) (default: 0)")


def _plain_layers_arg(text: str) -> int | str:
    """``--plain-layers``: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


COMPILE_HELP = ("torch.compile each transformer layer (one compiled graph for all; the first step takes the compile "
                "time): fuses norms, rotary and SwiGLU around the matrix products")


def options_from_args(args: argparse.Namespace) -> ProfileOptions:
    """:class:`ProfileOptions` from parsed :func:`add_profile_arguments` arguments (not yet resolved)."""
    alpha = args.alpha
    if alpha is not None and float(alpha).is_integer():
        alpha = int(alpha)
    return ProfileOptions(preset=args.preset, method=args.method, rank=args.rank, alpha=alpha, batch=args.batch,
                          seq=args.seq, steps=args.steps, device=args.device, dtype=args.dtype,
                          backend=args.backend, grad_checkpointing=args.grad_checkpointing, seed=args.seed,
                          release_outputs=args.release_outputs, quant=args.quant, model_dir=args.model_dir,
                          memory=args.memory, plain_layers=args.plain_layers, compile=args.compile)


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
    """slimtune, PEFT default and PEFT bf16 adapters, each in its own process (with ``--memory balanced`` or
    ``max-fit``, PEFT runs with transformers' gradient checkpointing: the nearest it has)."""
    peft = {"memory": "fast", "plain_layers": 0, "grad_checkpointing": True} if options.memory != "fast" else {}
    configs = [dataclasses.replace(options, backend=b, **({} if b == "slimtune" else peft))
               for b in ("slimtune", "peft", "peft-bf16")]
    staged = can_stage(configs)
    with _progress(disable=quiet or not sys.stderr.isatty()) as progress:
        first = "starting 3 processes (imports, model builds)" if staged else "starting"
        task = progress.add_task(first, total=len(configs))

        def started(_i: int, config: Any) -> None:
            progress.update(task, description=f"profiling {BACKEND_LABELS[config.backend]}")

        def done(_i: int, _result: Any) -> None:
            progress.advance(task)

        return run_children(configs, staged=staged, on_start=started, on_done=done)


def _check_writable(path: str, option: str) -> None:
    """A one-line ConfigError now, before any work, unless a file can be written at ``path`` (tried: created and
    removed again if it did not exist)."""
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        os.remove(path)


def _explain(options: Any, as_json: bool, timings: str | None = None) -> int:
    """``profile --explain``: each adapted layer's forward / backward variant for this configuration, with every
    option's FLOP / byte counts, found on the meta device (nothing is trained); with ``timings``, the measured
    choices that file holds in place of the counted ones; with ``--compile``, as the compiled layers run them."""
    if options.method == "none" or options.model_dir is not None or options.backend != "slimtune":
        raise ConfigError("--explain shows slimtune's choices for a --preset with an adapter --method "
                          "(not --method none, --model-dir or a PEFT --backend)")
    if timings is not None:
        load_timings(timings)
    rows = explain_preset(options.preset, options.method, options.rank, options.alpha, options.batch, options.seq,
                          options.dtype, compiled=options.compile)
    if as_json:
        print(json.dumps({"layers": [row.to_dict() for row in rows]}))
    else:
        title = (f"{options.preset}, {options.method} r={options.rank}, batch {options.batch} x seq {options.seq}"
                 + (", layers compiled" if options.compile else ""))
        Console().print(explanation_table(rows, title=title))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    options = options_from_args(args).resolved()
    if args.explain:
        return _explain(options, args.json, args.timings)
    if args.timings is not None:
        raise ConfigError("--timings shows a run's measured choices: it goes with --explain")
    if args.plot:
        require_pyplot()  # fail before the run, not after it
        _check_writable(args.plot, "--plot")
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
    parser.add_argument("--explain", action="store_true",
                        help="instead of training, print each adapted layer's forward/backward variant (LoRA's "
                             "backward order, structured or folded path, what DoRA keeps) with every option's "
                             "FLOP and byte counts (found on the meta device); with --compile, as the compiled "
                             "layers run from step 2 (stacked chains)")
    parser.add_argument("--timings", default=None, metavar="FILE",
                        help="with --explain: a timings file (a train run's OUT/timings.json, or "
                             "slimtune.save_timings) whose measured choices replace the counted ones for the shapes "
                             "it holds")
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
    parser.add_argument("--model", "--preset", dest="model", default="llama-7b", metavar="NAME|DIR",
                        help=f"model preset: {', '.join(PRESETS)} (default: llama-7b); or a local causal-LM "
                             "directory (only its config.json is read)")
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
    parser.add_argument("--memory", default=None, metavar="SETTINGS",
                        help="memory setting(s): fast, balanced, max-fit, comma-separated (default when searching: "
                             "all three for language models, fast and balanced for diffusion models; fast for one "
                             "method)")
    parser.add_argument("--plain-layers", type=int, default=0, metavar="N",
                        help="with --method and --memory balanced or max-fit: " + PLAIN_LAYERS_HELP.split(": ", 1)[1])
    parser.add_argument("--no-plain-layers", action="store_true",
                        help="searching: keep every layer of the balanced / max-fit rows checkpointed (by default "
                             "each fitting one leaves as many trailing layers plain as fit: faster steps; planning "
                             "takes about twice as long)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of weights and activations (default bf16)")
    parser.add_argument("--release-outputs", action="store_true",
                        help="the training loop drops each step's outputs (logits) before backward")
    parser.add_argument("--top", type=int, default=15, help="rows to list (default: 15)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help=f"effective TFLOP/s of the throughput model (default {DEFAULT_TFLOPS:g})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _cmd_plan(args: argparse.Namespace) -> int:
    """``slimtune plan``: the search (``--gpu-mem``) or one configuration's breakdown (``--method``)."""
    spec = preset_from_dir(args.model) if os.path.isdir(args.model) else get_preset(args.model)
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
        memories = _str_list(args.memory or "fast")
        if len(memories) != 1:
            raise ConfigError("--method predicts one configuration: give one --memory setting")
        plain = None
        if gpu_mem is not None and memory_setting(memories[0]).checkpoint and not args.plain_layers \
                and not diffusion and gc_choice != "on":
            plain, (est, one, two) = fit_plain_layers(spec, args.method, ranks[0], batches[0], seqs[0], quant,
                                                      args.dtype, memories[0], gpu_mem, args.release_outputs)
        else:
            est = estimate_memory(spec, args.method, ranks[0], batch=batches[0], seq=seqs[0], resolution=res,
                                  quant=quant, dtype=args.dtype, grad_checkpointing=gc_choice == "on",
                                  release_outputs=args.release_outputs, reduced_depth=True, memory=memories[0],
                                  plain_layers=args.plain_layers)
        if args.json:
            payload = est.to_dict()
            if gpu_mem is not None:
                payload["fits"] = est.peak_bytes <= usable_bytes(gpu_mem)
            if plain is not None:
                payload["plain_layers_that_fit"] = max(plain, 0)
            print(json.dumps(payload))
        else:
            console.print(breakdown_table(est, gpu_mem))
            if plain is not None and plain > 0:
                console.print(f"Within --gpu-mem {args.gpu_mem}: up to {plain} of the {spec.num_hidden_layers} layers "
                              f"can stay un-checkpointed (--plain-layers {plain}), each "
                              f"{format_bytes(two.peak_bytes - one.peak_bytes)} more and one layer's recompute "
                              "less a step.", highlight=False)
        return 0
    if args.plain_layers:
        raise ConfigError("--plain-layers applies to one configuration: give --method")
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
                      tflops=args.tflops, on_group=lambda text: status.update(f"simulating {spec.name}: {text}…"),
                      memories=_str_list(args.memory or ("fast,balanced" if diffusion else ",".join(MEMORY_SETTINGS))),
                      plain_layer_search=not args.no_plain_layers)
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


# -- slimtune train ---------------------------------------------------------------------------------
def _add_train_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune an adapter on a JSONL file into a PEFT-format checkpoint (one GPU or torchrun)",
        description="Train an adapter on --data (JSONL: {\"text\"}, {\"prompt\", \"completion\"} with the loss on "
                    "the completion, or {\"text\", \"label\"} for classification) and write it to --out in PEFT's "
                    "format, with checkpoints every --save-every steps that --resume continues bit for bit. "
                    "Several processes: torchrun --nproc_per_node N -m slimtune train ... --distributed ddp|fsdp.")
    model = parser.add_argument_group("model and adapter")
    model.add_argument("--model", dest="model_dir", default=None, metavar="DIR",
                       help="a local Hugging Face model directory (its weights and tokenizer; a diffusers UNet / "
                            "Flux transformer directory for --task diffusion)")
    model.add_argument("--preset", default=None, metavar="NAME",
                       help=f"or a preset with random weights and a byte-level tokenizer: {', '.join(PRESETS)}")
    model.add_argument("--task", default="causal-lm", metavar="{" + ",".join(TRAIN_TASKS) + "}",
                       help="causal-lm (default), classification (a sequence classifier; its head trained whole), "
                            "diffusion (noise-prediction MSE on random latents and text embeddings)")
    model.add_argument("--method", default="lora", metavar="METHOD",
                       help="lora (default), dora, hra, loha, lokr, locon, dora-recompute, dora-recompute-unshared")
    model.add_argument("--rank", type=int, default=16, help="adapter rank (default: 16)")
    model.add_argument("--alpha", type=float, default=None, help="adapter alpha (default: the rank)")
    model.add_argument("--targets", type=_str_list, default=None, metavar="A,B",
                       help="module-name suffixes to adapt (default: the preset's; all-linear for a directory)")
    model.add_argument("--ranks", default=None, metavar="FILE|auto",
                       help="a JSON rank_pattern file ({pattern: rank}), or auto: allocate ranks per layer on a few "
                            "training batches (slimtune.allocate_ranks; written to OUT/ranks.json)")
    model.add_argument("--rank-budget", default=None, metavar="BUDGET",
                       help="with --ranks auto: adapter parameters (12M) or bytes (48MB) (default: what --rank costs)")
    model.add_argument("--quant", default="none", choices=("none", "nf4"), help="4-bit NF4 base weights (QLoRA)")
    model.add_argument("--adapter-dtype", default=None, metavar="DTYPE",
                       help="adapter weights' dtype (default: the base's; float32 = fp32 master weights)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="FILE",
                      help="training data: JSONL (one JSON object a line); --task diffusion: a .safetensors file of "
                           "precomputed latents and text embeddings, or a folder of them (slimtune encode; without "
                           "it, seeded random ones)")
    data.add_argument("--eval-data", default=None, metavar="FILE.jsonl", help="held-out data for evaluation")
    data.add_argument("--eval-fraction", type=float, default=0.0,
                      help="or hold out this fraction of --data (seeded; default: 0, no evaluation)")
    data.add_argument("--seq", type=int, default=None,
                      help="tokens per row: longer samples are refused (see --truncate); short causal-lm samples are "
                           "packed into rows this long (default: min(model context, 1024))")
    data.add_argument("--truncate", action="store_true", help="cut samples longer than --seq instead of refusing")
    data.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                      help="pack short causal-lm samples into --seq rows (default: on for causal-lm)")
    loop = parser.add_argument_group("training")
    loop.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints, log, adapter)")
    loop.add_argument("--batch", type=int, default=8, help="global batch per optimizer step, in rows (default: 8)")
    loop.add_argument("--micro-batch", type=int, default=None,
                      help="rows per forward pass per process; gradient accumulation = batch / (micro-batch x "
                           "processes) (default: batch / processes)")
    loop.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW (default: 2e-4)")
    loop.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    loop.add_argument("--warmup-steps", type=int, default=0,
                      help="linear warm-up steps, then cosine decay to 0 (default: 0)")
    loop.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: 1)")
    loop.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default: 1)")
    loop.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    loop.add_argument("--grad-ckpt", dest="grad_checkpointing", action="store_true", help="gradient checkpointing")
    loop.add_argument("--memory", default="fast", metavar="{fast,balanced,max-fit}",
                      help="fast = nothing extra; balanced = every layer checkpointed (recomputed in backward; "
                           "--task diffusion: the feed-forward projections); max-fit = balanced + checkpointed inputs "
                           "kept in CPU memory, not for --task diffusion (default: fast)")
    loop.add_argument("--plain-layers", type=_plain_layers_arg, default=0, metavar="N|auto",
                      help=PLAIN_LAYERS_HELP.replace(" (default: 0)", "; auto: as many as the planner predicts fit "
                                                     "this GPU (causal LMs) (default: 0)"))
    loop.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    loop.add_argument("--capture", action="store_true",
                      help="replay each optimizer step as one CUDA graph (slimtune.capture_step): no per-kernel host "
                           "cost, for short host-bound steps; one process, one micro-batch per step, fixed shapes "
                           "(causal-lm packed, diffusion), --memory fast")
    loop.add_argument("--variant-criterion", default="flops", choices=("flops", "timed"),
                      help="how each layer picks its forward/backward variant: by FLOP count, or timed once per shape "
                           "on this GPU (choices kept in OUT/timings.json, so --resume repeats them) (default: flops)")
    loop.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    loop.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    loop.add_argument("--seed", type=int, default=0, help="seed of weights, adapter init, data order (default: 0)")
    loop.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (and at the end)")
    loop.add_argument("--save-every", type=int, default=100,
                      help="checkpoint every N steps (and at the end; 0 = at the end only) (default: 100)")
    loop.add_argument("--keep", type=int, default=2, help="checkpoints kept (default: 2)")
    loop.add_argument("--log-every", type=int, default=1, help="log the loss every N steps (default: 1)")
    loop.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    loop.add_argument("--distributed", default="auto", choices=("auto", "none", "ddp", "fsdp"),
                      help="under torchrun: ddp or fsdp (FSDP2, sharded per decoder layer) (default: auto = ddp "
                           "with several processes)")
    loop.add_argument("--json", action="store_true", help="JSON lines on stdout instead of the progress bar")
    parser.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train(config, make_reporter(args.json))
    return 0


COMMANDS.append(_add_train_parser)


# -- slimtune export --------------------------------------------------------------------------------

def _add_export_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export", help="merge a trained adapter into its base model and save the plain model (from_pretrained loads "
                       "it without slimtune or PEFT)",
        description="SOURCE -> --out DIR. SOURCE is a slimtune train output directory (its run.json says how the base "
                    "was built), one of its checkpoint-N directories, or a PEFT / slimtune adapter directory with "
                    "--model DIR or --preset NAME (default: the local directory its base_model_name_or_path names). "
                    "The merged model's output on a probe batch is checked against "
                    "the adapted model's before anything is written.")
    parser.add_argument("source", metavar="SOURCE", help="a train output directory, a checkpoint, or an adapter")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (new or empty)")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--model", dest="model_dir", default=None, metavar="DIR",
                      help="the base model directory of an adapter directory SOURCE (default: the one its "
                           "config names)")
    base.add_argument("--preset", default=None, metavar="NAME", help="or the preset it was trained on")
    parser.add_argument("--dtype", default=None,
                        help="dtype of the saved weights (default: the run's, float32 for an adapter directory)")
    parser.add_argument("--device", default=None,
                        help="where to merge: cpu or cuda (default: cpu; a run on random preset weights: where it "
                             "drew them)")
    parser.add_argument("--base", default="original", choices=EXPORT_BASES,
                        help="a QLoRA run: merge onto the original dense weights (default) or onto their NF4 round "
                             "trip (dequantized: what the adapter was trained against)")
    parser.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    console = Console()
    with console.status("building the base model, loading and merging the adapter…"):
        result = export_merged(args.source, args.out, model_dir=args.model_dir, preset=args.preset, dtype=args.dtype,
                               device=args.device, base=args.base)
    console.print(f"{result.out}: {result.method} merged into {result.adapted_layers} layers ({result.dtype}, onto the "
                  f"{result.base} base weights); merged vs adapted output {result.relative_error:.1e} relative, "
                  f"where the adapter moves the output by {result.adapter_effect:.1e}", highlight=False)
    return 0


COMMANDS.append(_add_export_parser)


# -- slimtune encode --------------------------------------------------------------------------------

def _add_encode_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "encode", help="images and captions -> the latents file that train --task diffusion --data reads",
        description="Run a local diffusers pipeline's frozen VAE and text encoders (SD-1.5, SDXL or Flux style) once "
                    "over --data and write latents, encoder_hidden_states (+ text_embeds, time_ids for SDXL; "
                    "pooled_projections for Flux, whose latents are packed) to --out. "
                    "--data: a folder of images, each with its caption in a .txt file of the same name, or a JSONL "
                    "file of {\"image\": path, \"text\": caption}. Images are resized (shorter side) and "
                    "centre-cropped to --resolution.")
    parser.add_argument("--pipeline", required=True, metavar="DIR",
                        help="a local diffusers pipeline directory (model_index.json, vae/, text_encoder/, tokenizer/; "
                             "text_encoder_2/, tokenizer_2/ for SDXL and Flux)")
    parser.add_argument("--data", required=True, metavar="FOLDER|FILE.jsonl", help="the images and captions")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors|FOLDER",
                        help="the latents file to write (with --shard-rows: a new folder of them)")
    parser.add_argument("--shard-rows", type=int, default=None, metavar="N",
                        help="write --out as a folder of files of N samples each, holding one file in memory at a "
                             "time (large sets: Flux's T5 features are ~4 MB a sample); train --data takes the folder")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: the pipeline UNet's sample size times the VAE's factor)")
    parser.add_argument("--batch", type=int, default=8, help="images per encoder call (default: 8)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", default="float32", help="encoders' and file's dtype (default: float32)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="Flux: T5 tokens per caption (default: its tokenizer's maximum, at most 512)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_cmd_encode)


def _cmd_encode(args: argparse.Namespace) -> int:
    with _progress(args.quiet) as progress:
        task = progress.add_task("encoding", total=None)
        result = encode_dataset(args.pipeline, args.data, args.out, resolution=args.resolution,
                                batch_size=args.batch, device=args.device, dtype=args.dtype, text_len=args.text_len,
                                shard_rows=args.shard_rows, on_batch=lambda done, total: progress.update(task, completed=done, total=total))
    shapes = ", ".join(f"{key} {shape}" for key, shape in result.shapes.items())
    Console().print(f"{result.out}: {result.samples} samples ({shapes}); train on it with slimtune train --task "
                    f"diffusion --data {result.out}", highlight=False)
    return 0


COMMANDS.append(_add_encode_parser)


# -- slimtune convert -------------------------------------------------------------------------------



def _base_module_paths(name: str) -> list[str]:
    """The module paths of a diffusion preset's denoiser (built on the meta device: nothing allocated)."""
    spec = get_preset(name)
    if not isinstance(spec, DiffusionPreset):
        raise ConfigError(f"--base {name!r} is not a diffusion preset; choose from "
                          f"{', '.join(n for n, p in PRESETS.items() if isinstance(p, DiffusionPreset))}")
    with torch.device("meta"):
        denoiser = build_parts(spec, text_encoders=False).denoiser
    return [path for path, _ in denoiser.named_modules()]


def _add_convert_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert an adapter between kohya/LyCORIS .safetensors and PEFT's directory format",
        description="IN -> OUT. --to peft: a kohya / LyCORIS file (lora_unet_*.lora_down.weight, hada_*, lokr_*, "
                    "dora_scale) into a PEFT adapter directory; --to kohya: a PEFT / slimtune adapter directory into "
                    "one kohya file (LoRA/LoCon, DoRA, LoHa, LoKr). kohya -> PEFT -> kohya is bit-identical.")
    parser.add_argument("src", metavar="IN", help="a kohya .safetensors file, or a PEFT adapter directory")
    parser.add_argument("dst", metavar="OUT", help="the PEFT directory, or the kohya .safetensors file, to write")
    parser.add_argument("--to", required=True, choices=CONVERT_FORMATS, help="the format to write")
    parser.add_argument("--prefix", default=None, metavar="PREFIX",
                        help="kohya module-name prefix to write: lora_unet (SD/SDXL, diffusers' SD loaders), "
                             "lora_transformer (diffusers' Flux loader), lycoris (default: the file's own, else "
                             "lora_unet)")
    parser.add_argument("--base", default=None, metavar="PRESET",
                        help="decode kohya module names against this diffusion preset's denoiser (default: "
                             "diffusers' UNet / Flux module vocabulary)")
    parser.add_argument("--skip-text-encoder", action="store_true",
                        help="drop the file's text-encoder modules (lora_te*) instead of refusing the file")
    parser.set_defaults(handler=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    paths = _base_module_paths(args.base) if args.base and args.to == "peft" else None
    out = convert_adapter(args.src, args.dst, args.to, prefix=args.prefix, paths=paths,
                          skip_text_encoder=args.skip_text_encoder)
    if args.to == "peft":
        config = read_peft(out).config
        print(f"{out}: PEFT {config.peft_type} adapter, {len(config.target_modules)} modules, r={config.r}, "
              f"alpha={config.alpha:g}")
    else:
        print(f"{out}: kohya / LyCORIS file")
    return 0


COMMANDS.append(_add_convert_parser)


# -- slimtune allocate ------------------------------------------------------------------------------

ALLOCATE_ADAPTERS = ("lora", "dora", "loha", "lokr", "hra")
_REGEX_CHARS = set("\\^$*+?()[]{}|")


def _targets_arg(text: str) -> str | list[str]:
    """``--targets``: "all-linear", a regular expression (when it holds regex characters), or name suffixes A,B."""
    return text if text == "all-linear" or _REGEX_CHARS & set(text) else _str_list(text)


def _add_allocate_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "allocate", help="allocate adapter ranks per layer under a parameter budget (LoRAMBo)",
        description="Measure how sensitive each targeted layer is on calibration text (--data: the JSONL records "
                    "slimtune train reads; lines that all carry a \"label\" measure a sequence classifier) and spend "
                    "--budget where it gains most. "
                    "Prints the per-layer table; --out writes the rank_pattern / alpha_pattern that slimtune and "
                    "PEFT configs take (JSON), --plot a bar chart.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", dest="model_dir", default=None, metavar="DIR",
                        help="a local Hugging Face model directory (weights, tokenizer)")
    source.add_argument("--preset", default=None, metavar="NAME",
                        help="or a language-model preset with random weights and a byte-level tokenizer")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="calibration text, one JSON object a line")
    parser.add_argument("--budget", default=None, metavar="BUDGET",
                        help="adapter parameters (12M, 1.5k, 12000000) or bytes of adapter weights (48MB) "
                             "(default: what --rank costs on every layer)")
    parser.add_argument("--method", default="gradient", choices=SENSITIVITY_METHODS,
                        help="sensitivity: gradient (‖∂L/∂W‖ and its spectrum), hessian (Hutchinson trace), data "
                             "(gradient spectrum in the input-covariance norm) (default: gradient)")
    parser.add_argument("--allocator", default="greedy", choices=RANK_ALLOCATORS,
                        help="greedy marginal benefit, or LoRAMBo's closed form r ∝ √s / √(d + k) (default: greedy)")
    parser.add_argument("--adapter", default="lora", choices=ALLOCATE_ADAPTERS, help="adapter method (default: lora)")
    parser.add_argument("--rank", type=int, default=16, help="the uniform rank: the default budget and the alpha "
                                                             "reference (default: 16)")
    parser.add_argument("--alpha", type=float, default=None, help="alpha at --rank (default: the rank)")
    parser.add_argument("--targets", type=_targets_arg, default=None, metavar="A,B|REGEX|all-linear",
                        help="layers to adapt (default: the preset's; all-linear for a directory)")
    parser.add_argument("--min-rank", type=int, default=None, help="smallest rank of a layer (default: --granule)")
    parser.add_argument("--max-rank", type=int, default=None, help="largest rank (default: the layer's full rank)")
    parser.add_argument("--granule", type=int, default=8, help="ranks are multiples of this (default: 8)")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches (default: 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per batch (default: 4)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of preset weights and Hessian probes (default: 0)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the allocation as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart per layer (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print the allocation as JSON instead of a table")
    parser.set_defaults(handler=_cmd_allocate)


def _cmd_allocate(args: argparse.Namespace) -> int:
    if args.plot:
        require_pyplot()  # fail before the measurement, not after it
    for option in ("out", "plot"):
        if getattr(args, option):
            _check_writable(getattr(args, option), f"--{option}")
    console = Console(stderr=args.json)
    with console.status("loading the model and the calibration data…"):
        calib = load_calibration(args.data, model_dir=args.model_dir, preset=args.preset, batch_size=args.batch_size,
                                 count=args.batches, max_length=args.max_length, seed=args.seed)
    alpha = None if args.alpha is None else (int(args.alpha) if float(args.alpha).is_integer() else args.alpha)
    config = make_adapter_config(args.adapter, args.rank, alpha, args.targets or calib.default_targets)
    with console.status(f"measuring {args.method} sensitivity on {len(calib.batches)} batches…"):
        plan = plan_ranks(calib.model, calib.batches, config, budget=args.budget, method=args.method,
                          allocator=args.allocator, min_rank=args.min_rank, max_rank=args.max_rank,
                          granule=args.granule, seed=args.seed)
    payload = plan.to_dict()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1)
    if args.plot:
        plot_allocation(plan, args.plot)
    if args.json:
        print(json.dumps(payload))
        return 0
    console.print(allocation_table(plan))
    for path, what in ((args.out, "rank_pattern / alpha_pattern"), (args.plot, "plot")):
        if path:
            console.print(f"{what}: {path}", highlight=False)
    return 0


COMMANDS.append(_add_allocate_parser)


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
    except OSError as exc:  # a file the user named cannot be read or written: one line, no traceback
        _print_error(str(exc))
        return 1
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
