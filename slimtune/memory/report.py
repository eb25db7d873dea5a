"""Presenting profile results: number formatting, slimtune/PEFT ratios, rich tables, markdown."""
from __future__ import annotations

from typing import Any, Sequence

from ..models.presets import PRESETS
from .accounting import ACTIVATION_KINDS
from .result import BREAKDOWN_KEYS, ProfileResult

#: Row titles of the breakdown parts (``ProfileResult.breakdown`` keys).
BREAKDOWN_LABELS = {
    "base_weights": "base weights (+ buffers)",
    "adapter_weights": "adapter weights",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations (saved for backward)",
    "temporary": "temporary (peak − the rest)",
}
CPU_TEMPORARY_NOTE = "n/a on cpu"

BACKEND_LABELS = {"slimtune": "slimtune", "peft": "PEFT (default)", "peft-bf16": "PEFT (bf16 adapters)"}


def backend_label(result: ProfileResult) -> str:
    """Column title: PEFT's default upcasts adapters to float32; ``peft-bf16`` keeps the model's dtype."""
    if result.backend == "peft":
        label = "PEFT default (fp32 adapters)"
    elif result.backend == "peft-bf16":
        label = "PEFT (bf16 adapters)" if result.dtype == "bfloat16" else f"PEFT (no upcast, {result.dtype})"
    else:
        label = BACKEND_LABELS.get(result.backend, result.backend)
    return label + (" + GC" if result.grad_checkpointing else "")


def format_bytes(n: int | None) -> str:
    """``"15.63 GiB"`` / ``"41.3 MiB"``; ``"—"`` for ``None``."""
    if n is None:
        return "—"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def format_seconds(s: float | None) -> str:
    """``"0.170 s"`` / ``"45.2 ms"``; ``"—"`` for ``None``."""
    if s is None:
        return "—"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1000:.1f} ms"


def format_count(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 10**9:
        return f"{n / 1e9:.2f} B"
    if n >= 10**6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"


def trainable_share(result: ProfileResult) -> str:
    if not result.params_total or result.params_trainable is None:
        return format_count(result.params_trainable)
    return f"{format_count(result.params_trainable)} ({100 * result.params_trainable / result.params_total:.2f}%)"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def format_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def result_key(result: ProfileResult) -> str:
    """``"peft-bf16"``, ``"peft+gc"``...: the backend, marked when gradient checkpointing was on."""
    return result.backend + ("+gc" if result.grad_checkpointing else "")


def comparison_ratios(results: Sequence[ProfileResult]) -> dict[str, dict[str, float | None]]:
    """For each non-slimtune result, ``{"peak": slimtune/it, "step_time": slimtune/it}`` keyed by backend.

    The first slimtune result is the numerator; ratios need both runs to have status ``ok``.
    """
    ours = next((r for r in results if r.backend == "slimtune"), None)
    out: dict[str, dict[str, float | None]] = {}
    if ours is None:
        return out
    for other in results:
        if other.backend == "slimtune":
            continue
        both = ours.ok and other.ok
        out[result_key(other)] = {"peak": ratio(ours.peak_bytes, other.peak_bytes) if both else None,
                    "step_time": ratio(ours.step_time_s, other.step_time_s) if both else None}
    return out


def step_rule(steps: int) -> str:
    """Which steps the median step time covers: ``"median of steps 4-8"`` (see ``median_step_time``)."""
    first = 4 if steps > 3 else (2 if steps > 1 else 1)
    return f"median of steps {first}-{steps}" if first < steps else f"step {steps}"


def describe_run(result: ProfileResult) -> str:
    """One line: preset, method, quant, shape, dtype, checkpointing and the step-time rule."""
    method = (f"{result.method} r={result.rank} alpha={result.alpha:g}" if result.method != "none"
              else "full fine-tune")
    quant = f" · {result.quant} base" if result.quant != "none" else ""
    gc = " · gradient checkpointing" if result.grad_checkpointing else ""
    gc += f" · --memory {result.memory}" if result.memory != "fast" else ""
    gc += f" --plain-layers {result.plain_layers}" if result.plain_layers else ""
    gc += " · --compile" if result.compile else ""
    n = result.steps
    rule = step_rule(n)
    return (f"{result.preset} · {method}{quant} · batch {result.batch} × {_sample_shape(result)} · "
            f"{result.dtype}{gc} · {n} steps ({rule}) · memory: {result.memory_kind or '—'}")


def _sample_shape(result: ProfileResult) -> str:
    """``"seq 512"`` for a language model; ``"latent 64x64"`` for a diffusion preset (seq does not apply)."""

    preset = PRESETS.get(result.preset) if result.model_dir is None else None
    size = getattr(preset, "sample_size", None)
    if size is not None and getattr(preset, "family", "") == "unet":
        return f"latent {size}x{size}"
    if size is not None:
        return f"latent {size}x{size} ({(size // 2) ** 2} tokens)"
    return f"seq {result.seq}"


def _losses(result: ProfileResult) -> str:
    if not result.losses:
        return "—"
    return f"{result.losses[0]:.4f} → {result.losses[-1]:.4f}"


def _rows(result: ProfileResult) -> list[tuple[str, str]]:
    status = result.status if result.ok else f"{result.status}: {(result.error or '')[:120]}"
    return [
        ("status", status),
        ("params total", format_count(result.params_total)),
        ("params trainable", trainable_share(result)),
        ("memory after creation", format_bytes(result.mem_created_bytes)),
        ("memory after 1st step", format_bytes(result.mem_after_step_bytes)),
        ("peak memory, 1st step", format_bytes(result.peak_first_step_bytes)),
        ("peak memory (steps)", format_bytes(result.peak_bytes)),
        ("median step time", format_seconds(result.step_time_s)),
        ("loss (first → last step)", _losses(result)),
        ("device", result.device_name or result.device),
    ]


def results_table(results: Sequence[ProfileResult]) -> Any:
    """A rich Table: one column per result, ratio rows slimtune/other when slimtune is compared."""
    from rich.table import Table

    table = Table()
    table.add_column("", style="bold", no_wrap=True)
    for result in results:
        table.add_column(backend_label(result), justify="right")
    rows = [_rows(r) for r in results]
    for i, (label, _) in enumerate(rows[0]):
        table.add_row(label, *(r[i][1] for r in rows))
    ratios = comparison_ratios(results)
    if ratios and len(results) > 1:
        table.add_section()
        for metric, label in (("peak", "peak: slimtune/col"), ("step_time", "step time: slimtune/col")):
            cells = ["1.00×" if r.backend == "slimtune" else format_ratio(ratios.get(result_key(r), {}).get(metric))
                     for r in results]
            table.add_row(label, *cells)
    return table


def cpu_breakdown_table(result: ProfileResult) -> Any | None:
    """What the accounted CPU peak is made of, or ``None`` off the CPU."""
    if not result.cpu_breakdown:
        return None
    from rich.table import Table

    table = Table(title="accounted peak (cpu)", show_header=False)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for key, value in result.cpu_breakdown.items():
        table.add_row(key.replace("_", " "), format_bytes(value))
    return table


def short_label(result: ProfileResult) -> str:
    """Column title naming what differs between configurations: method, quant, GC and the backend."""
    return result.label


def _column_titles(results: Sequence[ProfileResult]) -> list[str]:
    if len({(r.preset, r.method, r.quant, r.rank, r.grad_checkpointing) for r in results}) == 1:
        return [backend_label(r) for r in results]
    return [short_label(r) for r in results]


def breakdown_table(results: Sequence[ProfileResult]) -> Any | None:
    """A rich Table of :data:`BREAKDOWN_KEYS` (one column per result), or ``None`` when nothing was accounted.

    On CUDA the parts sum to the allocator's peak; on the CPU the temporary part cannot be measured.
    """
    if not any(r.breakdown for r in results):
        return None
    from rich.table import Table

    table = Table(title="memory at the peak step, by part")
    table.add_column("", style="bold", no_wrap=True)
    for title in _column_titles(results):
        table.add_column(title, justify="right")
    for key in BREAKDOWN_KEYS:
        cells = []
        for r in results:
            value = (r.breakdown or {}).get(key)
            cells.append(CPU_TEMPORARY_NOTE if value is None and key == "temporary" and r.breakdown
                         else format_bytes(value))
        table.add_row(BREAKDOWN_LABELS[key], *cells)
    table.add_section()
    table.add_row("peak", *(format_bytes(r.peak_bytes) for r in results))
    return table


def activations_table(results: Sequence[ProfileResult]) -> Any | None:
    """A rich Table of the activations saved for backward by module kind, or ``None`` when not measured."""
    if not any(r.activations_by_module for r in results):
        return None
    from rich.table import Table

    kinds = [k for k in ACTIVATION_KINDS if any((r.activations_by_module or {}).get(k) for r in results)]
    table = Table(title="activations saved for backward, by module kind")
    table.add_column("", style="bold", no_wrap=True)
    for title in _column_titles(results):
        table.add_column(title, justify="right")
    for kind in kinds:
        table.add_row(kind, *(format_bytes((r.activations_by_module or {}).get(kind, 0)) if r.activations_by_module
                              else "—" for r in results))
    return table


def memory_notes(results: Sequence[ProfileResult]) -> list[str]:
    """Footnotes on how the memory was measured (one per memory kind present)."""
    notes = []
    if any(r.memory_kind == "cpu accounted" for r in results):
        notes.append("cpu accounted: parameters + buffers + gradients + optimizer state + tensors saved for "
                     "backward (no allocator statistics on the CPU, so temporaries — casts, dequantised weights, "
                     "workspaces — cannot be measured there)")
    if any(r.memory_kind == "cuda allocator" for r in results):
        notes.append("cuda allocator: torch.cuda.memory_allocated / max_memory_allocated (the GPU also holds the "
                     "CUDA context and the allocator's cache: see reserved_peak_bytes in --json)")
    return notes


# -- markdown (sweeps) -------------------------------------------------------------------------------
GIB = 2**30
MIB = 2**20


def size_unit(largest: int) -> tuple[str, int]:
    """``("GiB", 2**30)``, or ``("MiB", 2**20)`` when ``largest`` (bytes) is under 1 GiB."""
    return ("GiB", GIB) if largest >= GIB else ("MiB", MIB)


def gib(n: int | None, total: int | None = None, divisor: int = GIB) -> str:
    """``"10.28"`` (GiB by default; ``divisor`` picks the unit), with the share of ``total`` when given:
    ``"10.28 (12.9%)"``; ``"—"`` for ``None``."""
    if n is None:
        return "—"
    share = f" ({100 * n / total:.1f}%)" if total else ""
    return f"{n / divisor:.2f}{share}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
