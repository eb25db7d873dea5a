"""Stacked-bar plots of profile results: where the memory of each configuration goes (matplotlib, Agg).

One horizontal bar per configuration, stacked by :data:`~slimtune.memory.result.BREAKDOWN_KEYS` (base weights,
adapter weights, gradients, optimizer state, activations, and on CUDA the temporary rest of the allocator's
peak), a tick at the memory after model creation, and ``OOM`` / the error status for runs that did not finish.
A second panel splits the activations by module kind. Sizes in GiB (2^30 bytes), or MiB when every
configuration is under 1 GiB.

matplotlib is optional: :func:`~slimtune.models.deps.require_pyplot` raises
:class:`~slimtune.errors.MissingDependencyError` with the install command when it is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..models.deps import require_pyplot
from .accounting import ACTIVATION_KINDS
from .report import BREAKDOWN_LABELS, size_unit
from .result import BREAKDOWN_KEYS, ProfileResult

__all__ = ["plot_results"]

PART_COLORS = {"base_weights": "#4c72b0", "adapter_weights": "#dd8452", "gradients": "#c44e52",
               "optimizer_state": "#8172b3", "activations": "#55a868", "temporary": "#b0b0b0"}
KIND_COLORS = {"linear": "#4c72b0", "conv": "#64b5cd", "attention": "#dd8452", "norm": "#8172b3",
               "activation": "#55a868", "embedding": "#937860", "loss": "#c44e52", "checkpoint": "#da8bc3",
               "other": "#b0b0b0"}



def _stack(ax: Any, y: int, parts: Sequence[tuple[str, float, str]], hatch: dict[str, str]) -> float:
    """Draw one stacked horizontal bar at ``y``; returns its right end."""
    left = 0.0
    for key, value, color in parts:
        if value <= 0:
            continue
        ax.barh(y, value, left=left, color=color, edgecolor="white", linewidth=0.5, hatch=hatch.get(key))
        left += value
    return left


def _legend(ax: Any, entries: Sequence[tuple[str, str, str | None]], extra: Sequence[Any] = ()) -> None:
    """A legend in stacking order: ``(label, color, hatch)`` patches, then ``extra`` handles."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=color, edgecolor="white", hatch=hatch, label=label) for label, color, hatch in entries]
    fig = ax.figure
    below = 0.55 / (ax.get_position().height * fig.get_figheight())  # 0.55 inch: under the ticks and the x label
    ax.legend(handles=[*handles, *extra], loc="upper center", bbox_to_anchor=(0.5, -below), ncol=3,
              fontsize="small", frameon=False)


def plot_results(results: Sequence[ProfileResult], path: str | Path, title: str | None = None,
                 budget_bytes: int | None = None) -> Path:
    """Write a PNG of ``results``' memory breakdowns to ``path`` and return the path.

    ``budget_bytes`` draws a vertical line at a memory budget (e.g. a 16 GiB card); the device's own
    memory is drawn when every result ran on the same CUDA device.
    """
    if not results:
        raise ValueError("nothing to plot: no results")
    plt = require_pyplot()
    path = Path(path)
    with_kinds = any(r.activations_by_module for r in results)
    n = len(results)
    fig, axes = plt.subplots(1, 2 if with_kinds else 1, figsize=(15 if with_kinds else 10, 1.5 + 0.45 * n),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2]} if with_kinds else None)
    ax = axes[0][0]
    unit, div = size_unit(max([0, *(v or 0 for r in results for v in (r.peak_bytes, r.mem_created_bytes,
                                                                     r.peak_first_step_bytes))]))
    labels = [r.label for r in results]
    hatch = {"temporary": "//"}
    parts_seen: set[str] = set()
    widest = 0.0
    for y, r in enumerate(results):
        if r.breakdown:
            parts = [(k, (r.breakdown.get(k) or 0) / div, PART_COLORS[k]) for k in BREAKDOWN_KEYS]
            parts_seen.update(k for k, v, _ in parts if v > 0)
            end = _stack(ax, y, parts, hatch)
        else:  # not measured part by part (an OOM before the first step ended, an error): the peak alone
            end = (r.peak_bytes or r.peak_first_step_bytes or 0) / div
            if end:
                ax.barh(y, end, color="#e0e0e0", edgecolor="#999999", hatch="xx")
        if r.mem_created_bytes:
            ax.plot([r.mem_created_bytes / div] * 2, [y - 0.42, y + 0.42], color="black", linewidth=1.5)
        if not r.ok:
            ax.text(end, y, f"  {r.status}", va="center", ha="left", color="#c44e52", fontweight="bold")
        widest = max(widest, end, (r.mem_created_bytes or 0) / div)
    from matplotlib.lines import Line2D

    extra = [Line2D([], [], color="black", linewidth=1.5, label="after creation")]
    devices = {(r.memory_kind, r.device_memory_bytes) for r in results}
    line = None
    if budget_bytes:
        line = (budget_bytes, f"budget {budget_bytes / 2**30:.0f} GiB")
    elif len(devices) == 1:
        kind, total = next(iter(devices))
        if kind == "cuda allocator" and total and total / div < 2 * max(widest, 1e-9):
            line = (total, "device memory")
    if line is not None:
        ax.axvline(line[0] / div, color="#c44e52", linestyle="--", linewidth=1)
        extra.append(Line2D([], [], color="#c44e52", linestyle="--", linewidth=1, label=line[1]))
    ax.set_yticks(range(n), labels)
    ax.set_ylim(n - 0.5, -0.5)  # first configuration on top
    ax.set_xlabel(unit)
    kind = next(iter(devices))[0] if len(devices) == 1 else "mixed"
    ax.set_title("memory at the peak step" + (" (cpu accounted: no temporaries)" if kind == "cpu accounted" else ""))
    ax.grid(axis="x", alpha=0.3)
    if with_kinds:
        kax = axes[0][1]
        kinds = [k for k in ACTIVATION_KINDS if any((r.activations_by_module or {}).get(k) for r in results)]
        for y, r in enumerate(results):
            by = r.activations_by_module or {}
            _stack(kax, y, [(k, by.get(k, 0) / div, KIND_COLORS[k]) for k in kinds], {})
        kax.set_yticks(range(n), [""] * n)
        kax.set_ylim(n - 0.5, -0.5)
        kax.set_xlabel(unit)
        kax.set_title("activations saved for backward, by module kind")
        kax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _legend(ax, [(BREAKDOWN_LABELS[k], PART_COLORS[k], hatch.get(k)) for k in BREAKDOWN_KEYS if k in parts_seen],
            extra)
    if with_kinds:
        _legend(kax, [(k, KIND_COLORS[k], None) for k in kinds])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
