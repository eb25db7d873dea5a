"""A sweep of profile configurations that reproduces the seed study's tables, slimtune and PEFT side by side.

The seed study (LoRA/QLoRA: profiling adapters for language and diffusion models) measured memory "after
model creation" and "after 1 step" of Llama-7B and Stable Diffusion 1.5 with no adapter (a full
fine-tune), LoRA, QLoRA, LoHa, LoKr and LoCon on a 16 GB V100. :func:`sweep_configs` builds that grid for
any presets, methods and backends; :func:`run_sweep` profiles each configuration (on CUDA in its own
process, so that peaks never mix; on the CPU, where memory is accounted rather than read from an
allocator, in this process unless told otherwise) and writes, under ``out``:

* ``sweep.jsonl``: one :class:`~slimtune.memory.result.ProfileResult` per line, appended as each run ends
  (``resume=True`` keeps the finished ones and runs only the rest — a long sweep can be run in pieces);
* ``sweep.md``: the seed-style table (after creation / after 1 step, GiB and share of the device's memory,
  per backend), the breakdown by part and the activations by module kind;
* ``sweep.png``: stacked bars per configuration (:mod:`.plot`; skipped with a note without matplotlib).

:func:`merge_results` + :func:`write_reports` turn the ``sweep.jsonl`` of several pieces (e.g. one per GPU
job) into one report (``slimtune sweep --merge A/sweep.jsonl B/sweep.jsonl --out DIR``).

"After 1 step" is the peak through the first training step (what a GPU monitor shows once the step has
run: the caching allocator keeps the peak reserved); the memory still allocated after it is in the JSON.
LoCon runs on diffusion models only (a language model has no convolution: LoCon would be LoRA).
A run that runs out of memory is recorded as ``OOM``, not raised. A full fine-tune has no adapter, so it
runs once (backend ``slimtune``) and fills every backend's columns.
"""
from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from ..models.presets import is_diffusion
from .accounting import ACTIVATION_KINDS
from .options import BACKENDS, ProfileOptions, default_device
from .plot import plot_results
from .profile import profile_options
from .report import backend_label, gib, markdown_table, size_unit
from .result import BREAKDOWN_KEYS, ProfileResult
from .subproc import run_children

__all__ = ["SEED_METHODS", "SEED_PRESETS", "SWEEP_METHODS", "TINY_PRESETS", "SweepSpec", "config_key",
           "load_results", "merge_results", "render_markdown", "run_sweep", "sweep_configs", "sweep_method",
           "write_reports"]

#: Sweep method name -> (profile method, quant). ``qlora`` is LoRA over an NF4 base; ``none`` a full fine-tune.
SWEEP_METHODS: dict[str, tuple[str, str]] = {
    "none": ("none", "none"), "lora": ("lora", "none"), "qlora": ("lora", "nf4"), "loha": ("loha", "none"),
    "lokr": ("lokr", "none"), "locon": ("locon", "none"), "dora": ("dora", "none"), "hra": ("hra", "none"),
    "qloha": ("loha", "nf4"), "qlokr": ("lokr", "nf4"), "qdora": ("dora", "nf4"),
}
SEED_METHODS = ("none", "lora", "qlora", "loha", "lokr", "locon")
SEED_PRESETS = ("llama-7b", "stable-diffusion-1.5")
TINY_PRESETS = ("tiny-llama", "tiny-unet")  # the seed grid's shapes, small enough for the CPU
JSONL, MARKDOWN, PNG = "sweep.jsonl", "sweep.md", "sweep.png"
SHORT_LABELS = {"slimtune": "slimtune", "peft": "PEFT", "peft-bf16": "PEFT bf16"}

StartCallback = Callable[[int, ProfileOptions], None]
DoneCallback = Callable[[int, ProfileResult], None]


@dataclasses.dataclass
class SweepSpec:
    """The grid: every preset x method x backend at one batch / seq / rank. ``None`` fields take device
    defaults (presets: the seed's on CUDA, tiny ones on the CPU; batch 1; dtype as ``slimtune profile``)."""

    presets: Sequence[str] | None = None
    methods: Sequence[str] = SEED_METHODS
    backends: Sequence[str] = ("slimtune", "peft")
    batch: int = 1
    seq: int = 512
    rank: int = 16
    steps: int = 3
    device: str | None = None
    dtype: str | None = None
    grad_checkpointing: bool = False
    seed: int = 0

    def resolved_presets(self) -> list[str]:
        if self.presets:
            return list(self.presets)
        device = self.device or default_device()
        return list(TINY_PRESETS if device == "cpu" else SEED_PRESETS)


def sweep_configs(spec: SweepSpec) -> list[ProfileOptions]:
    """The resolved configurations of ``spec``, preset by preset, method by method, backend by backend.

    A full fine-tune (``none``) runs once, with the first backend (every backend trains it the same way).
    LoCon on a language model is skipped: with no convolution to adapt it is LoRA (the seed ran it on SD only).
    """

    unknown = [m for m in spec.methods if m not in SWEEP_METHODS]
    if unknown:
        raise ConfigError(f"unknown sweep method {unknown[0]!r}; choose from {', '.join(SWEEP_METHODS)}")
    bad = [b for b in spec.backends if b not in BACKENDS]
    if bad:
        raise ConfigError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}")
    if not spec.backends:
        raise ConfigError("no backend to sweep")
    configs = []
    for preset in spec.resolved_presets():
        for name in dict.fromkeys(spec.methods):
            method, quant = SWEEP_METHODS[name]
            if method == "locon" and not is_diffusion(preset):
                continue
            backends = ["slimtune" if "slimtune" in spec.backends else spec.backends[0]] if method == "none" \
                else list(dict.fromkeys(spec.backends))
            for backend in backends:
                configs.append(ProfileOptions(
                    preset=preset, method=method, quant=quant, backend=backend, rank=spec.rank, batch=spec.batch,
                    seq=spec.seq, steps=spec.steps, device=spec.device, dtype=spec.dtype,
                    grad_checkpointing=spec.grad_checkpointing, seed=spec.seed).resolved())
    return configs


def sweep_method(result: ProfileResult | ProfileOptions) -> str:
    """The sweep's name of a configuration's method: ``qlora`` for LoRA over NF4, else the method."""
    for name, pair in SWEEP_METHODS.items():
        if pair == (result.method, result.quant):
            return name
    return f"{result.method}+{result.quant}"


def config_key(item: ProfileResult | ProfileOptions) -> tuple[Any, ...]:
    """What identifies a configuration across runs (a result and the options that made it share it)."""
    preset = item.model_dir if getattr(item, "model_dir", None) else item.preset
    adapted = item.method != "none"
    return (preset, item.method, item.quant, item.backend, item.rank if adapted else None, item.batch, item.seq,
            item.grad_checkpointing, item.dtype, str(item.device).split(":")[0])


def load_results(path: Path) -> list[ProfileResult]:
    """The results of a ``sweep.jsonl`` (unreadable lines skipped)."""
    results = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                results.append(ProfileResult.from_dict(json.loads(line)))
            except (ValueError, TypeError):
                continue
    return results


def _run_in_process(options: ProfileOptions) -> ProfileResult:
    """Profile in this process; any failure becomes an ``error`` result (a sweep never stops on one run)."""

    try:
        return profile_options(options)
    except Exception as exc:  # noqa: BLE001
        return ProfileResult.for_options(options, status="error", error=f"{type(exc).__name__}: {exc}"[:1500])


def run_sweep(configs: Sequence[ProfileOptions], out: str | Path | None = None, resume: bool = False,
              isolate: bool | None = None, timeout: float | None = None, on_start: StartCallback | None = None,
              on_done: DoneCallback | None = None, plot: bool = True, title: str | None = None
              ) -> tuple[list[ProfileResult], dict[str, Path]]:
    """Profile ``configs`` and write the sweep's files under ``out``; returns the results (in ``configs``'
    order) and the written files (``"jsonl"``, ``"markdown"``, ``"png"`` when plotted).

    ``isolate`` (default: on CUDA) runs each configuration in its own process (``timeout`` seconds each);
    otherwise in this process, one after another. ``resume`` keeps the ``ok``/``OOM`` results already in
    ``out/sweep.jsonl`` and runs only the missing configurations. ``on_start(i, options)`` /
    ``on_done(i, result)`` follow every configuration that runs (``i`` counts the runs).
    """
    out_dir = Path(out) if out is not None else None
    jsonl = out_dir / JSONL if out_dir is not None else None
    done: dict[tuple[Any, ...], ProfileResult] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            done = {config_key(r): r for r in load_results(jsonl) if r.status in ("ok", "OOM")}
            jsonl.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in done.values()), encoding="utf-8")
        else:
            jsonl.write_text("", encoding="utf-8")
    pending = [c for c in configs if config_key(c) not in done]
    if isolate is None:
        isolate = any(str(c.device).startswith("cuda") for c in pending)

    def finished(i: int, result: ProfileResult) -> None:
        done[config_key(result)] = result
        if jsonl is not None:
            with jsonl.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(result.to_dict()) + "\n")
        if on_done is not None:
            on_done(i, result)

    if isolate:

        run_children(pending, staged=False, on_start=on_start, on_done=finished, timeout=timeout)
    else:
        for i, options in enumerate(pending):
            if on_start is not None:
                on_start(i, options)
            finished(i, _run_in_process(options))
    results = [done.get(config_key(c)) or ProfileResult.for_options(c, status="error", error="no result")
               for c in configs]
    files: dict[str, Path] = {}
    if out_dir is not None:
        files = {"jsonl": jsonl, **write_reports(results, out_dir, plot=plot, title=title)}
    return results, files


def write_reports(results: Sequence[ProfileResult], out: str | Path, plot: bool = True,
                  title: str | None = None) -> dict[str, Path]:
    """Write ``out/sweep.md`` (and ``out/sweep.png`` when ``plot``) for ``results``; returns the paths."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out_dir / MARKDOWN}
    files["markdown"].write_text(render_markdown(results, title=title), encoding="utf-8")
    if plot and results:

        files["png"] = plot_results(results, out_dir / PNG, title=title or "slimtune sweep")
    return files


def merge_results(paths: Sequence[str | Path]) -> list[ProfileResult]:
    """The results of several ``sweep.jsonl`` files (pieces of one sweep run separately), one per
    configuration: a later file's result replaces an earlier one's."""
    merged: dict[tuple[Any, ...], ProfileResult] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"no such results file: {path}")
        for result in load_results(Path(path)):
            merged[config_key(result)] = result
    return list(merged.values())


# -- the tables --------------------------------------------------------------------------------------
def _environment(results: Sequence[ProfileResult]) -> str:
    first = next((r for r in results if r.device_name), results[0])
    versions = [f"torch {first.torch_version}"]
    if first.transformers_version:
        versions.append(f"transformers {first.transformers_version}")
    peft = next((r.peft_version for r in results if r.peft_version), None)
    if peft:
        versions.append(f"peft {peft}")
    total = first.device_memory_bytes
    memory = f", {gib(total)} GiB" if total else ""
    return (f"{first.device_name or first.device}{memory} · python {platform.python_version()} · "
            + " · ".join(versions) + f" · slimtune {first.slimtune_version or '?'}")


def _cell(r: ProfileResult | None, field: str, div: int) -> str:
    if r is None:
        return ""
    if field == "mem_created_bytes" and r.mem_created_bytes is not None:
        return gib(r.mem_created_bytes, r.device_memory_bytes, div)
    if not r.ok:
        return r.status
    return gib(getattr(r, field), r.device_memory_bytes, div)


def _ratio(a: ProfileResult | None, b: ProfileResult | None, field: str) -> str:
    if a is None or b is None or a is b or not (a.ok and b.ok):
        return "—"
    x, y = getattr(a, field), getattr(b, field)
    return f"{x / y:.2f}" if x is not None and y else "—"


def _step(r: ProfileResult | None) -> str:
    return "—" if r is None or r.step_time_s is None else f"{r.step_time_s:.3f}"


def render_markdown(results: Sequence[ProfileResult], title: str | None = None) -> str:
    """The sweep's report: setup, the seed-style table per backend, the breakdown, activations by kind."""
    if not results:
        return "(no results)\n"

    backends = list(dict.fromkeys(r.backend for r in results if r.method != "none"))
    backends = backends or list(dict.fromkeys(r.backend for r in results))
    first = results[0]
    rank = next((r.rank for r in results if r.rank is not None), None)
    unit, div = size_unit(max([0, *(v or 0 for r in results for v in (r.peak_bytes, r.mem_created_bytes,
                                                                     r.peak_first_step_bytes))]))
    lines = [f"# {title}" if title else "# slimtune sweep", "", _environment(results), "",
             f"batch {first.batch} · seq {first.seq} (language models; a diffusion model trains at its sample "
             f"size) · rank {rank or '—'} · {first.dtype} · {first.steps} steps"
             + (" · gradient checkpointing" if first.grad_checkpointing else "") + f" · memory: {first.memory_kind}",
             ""]
    rows_by: dict[tuple[str, str], dict[str, ProfileResult]] = {}
    for r in results:
        rows_by.setdefault((r.preset, sweep_method(r)), {})[r.backend] = r
    labels = {b: SHORT_LABELS.get(b, b) for b in backends}
    legend = "; ".join(f"{labels[b]} = {backend_label(next(r for r in results if r.backend == b))}"
                       for b in backends if b != "slimtune")
    header = ["model", "method"]
    for b in backends:
        header += [f"{labels[b]} created", f"{labels[b]} 1 step"]
    if "slimtune" in backends:
        others = [b for b in backends if b != "slimtune"]
        header += [f"1 step ÷ {labels[b]}" for b in others]
    header += [f"step s {labels[b]}" for b in backends]
    rows = []
    for (preset, method), by in rows_by.items():
        full = method == "none"
        pick = {b: (next(iter(by.values())) if full else by.get(b)) for b in backends}
        row: list[Any] = [preset, "full fine-tune" if full else method]
        for b in backends:
            row += [_cell(pick[b], "mem_created_bytes", div), _cell(pick[b], "peak_first_step_bytes", div)]
        if "slimtune" in backends:
            row += [_ratio(pick["slimtune"], pick[b], "peak_first_step_bytes") if not full else "—"
                    for b in backends if b != "slimtune"]
        row += [_step(pick[b]) for b in backends]
        rows.append(row)
    lines += [f"## After model creation / after 1 step ({unit}, share of the device's memory)", "",
              markdown_table(header, rows), "",
              "created: memory after model creation (weights, quantised and adapted). 1 step: the peak through the "
              "first training step (forward, backward, optimizer step) — what the seed study read once a step had "
              "run. A full fine-tune has no adapter: one run fills every backend's columns. OOM: the run ran out "
              "of memory." + (f" {legend}." if legend else ""), ""]
    parts = ["base", "adapter", "grads", "optimizer", "activations", "temporary"]
    brows = []
    for r in results:
        b = r.breakdown or {}
        brows.append([r.preset, sweep_method(r), r.backend, r.status,
                      *(gib(b.get(k), None, div) if r.breakdown else "—" for k in BREAKDOWN_KEYS),
                      gib(r.peak_bytes, None, div), gib(r.reserved_peak_bytes, None, div),
                      gib(r.mem_after_step_bytes, None, div), _step(r)])
    lines += [f"## Breakdown at the peak step ({unit})", "",
              markdown_table(["model", "method", "backend", "status", *parts, "peak", "reserved", "held after step 1",
                              "step s"], brows), "",
              "temporary = the allocator's peak minus the other parts (casts, dequantised weights, workspaces, "
              "transient gradients, the optimizer's scratch); on the CPU it cannot be measured (—). reserved: the "
              "caching allocator's reserved peak (CUDA; a GPU monitor adds the CUDA context to it).", ""]
    kinds = [k for k in ACTIVATION_KINDS if any((r.activations_by_module or {}).get(k) for r in results)]
    if kinds:
        arows = [[r.preset, sweep_method(r), r.backend,
                  *(gib((r.activations_by_module or {}).get(k, 0), None, div) if r.activations_by_module else "—"
                    for k in kinds)]
                 for r in results]
        lines += [f"## Activations saved for backward, by module kind ({unit})", "",
                  markdown_table(["model", "method", "backend", *kinds], arows), ""]
    errors = [r for r in results if r.status not in ("ok", "OOM")]
    if errors:
        lines += ["## Failed runs", ""]
        lines += [f"- {r.label}: {r.status}: {(r.error or '').strip()[-400:]}" for r in errors]
        lines.append("")
    return "\n".join(lines)
