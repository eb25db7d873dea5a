"""Showing an allocation: a rich table per layer, and a PNG bar chart (matplotlib, optional)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..models.deps import require_pyplot
from .plan import Allocation


def allocation_table(allocation: Allocation) -> Table:
    """One row per layer: shape, sensitivity (and its share of the largest), uniform → allocated rank, parameters."""
    top = max((layer.score for layer in allocation.layers), default=0.0) or 1.0
    budget = allocation.budget
    table = Table(title=f"rank allocation — {allocation.method} sensitivity, {allocation.allocator} allocator",
                  caption=f"used {budget.describe(allocation.used)} of {budget.describe()}; "
                          f"{allocation.params:,} adapter parameters (uniform: {allocation.uniform_params:,})")
    table.add_column("layer", overflow="fold")
    for column in ("d_out × d_in", "sensitivity", "rel.", "rank", "params"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in allocation.layers:
        change = "" if layer.rank == layer.uniform_rank else f"{layer.uniform_rank} → "
        table.add_row(layer.name, f"{layer.d_out} × {layer.d_in}", f"{layer.score:.3g}", f"{layer.score / top:.2f}",
                      f"{change}{layer.rank}", f"{layer.params:,}")
    return table



def plot_allocation(allocation: Allocation, path: str | Path, title: str | None = None) -> Path:
    """A PNG: the allocated rank per layer (bars) against the uniform rank (ticks), and below it each layer's
    sensitivity relative to the largest (log scale)."""
    plt = require_pyplot()
    layers = allocation.layers
    xs = list(range(len(layers)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * len(layers) + 2), 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    top.bar(xs, [layer.rank for layer in layers], color="#4c72b0", label="allocated rank")
    top.scatter(xs, [layer.uniform_rank for layer in layers], marker="_", s=120, color="#c44e52", label="uniform rank")
    top.set_ylabel("rank")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title or f"{allocation.method} sensitivity, {allocation.allocator}: "
                           f"{allocation.params:,} adapter parameters (uniform {allocation.uniform_params:,})",
                  fontsize=9)
    peak = max((layer.score for layer in layers), default=0.0) or 1.0
    bottom.bar(xs, [max(layer.score / peak, 1e-6) for layer in layers], color="#55a868")
    bottom.set_yscale("log")
    bottom.set_ylabel("sensitivity / max")
    bottom.set_xticks(xs)
    bottom.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
