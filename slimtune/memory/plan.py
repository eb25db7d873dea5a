"""What fits on a GPU: a search over training configurations with the estimator of :mod:`.estimate`.

``slimtune plan --model llama-7b --gpu-mem 16GB`` lists the configurations (method, rank, quantisation, batch,
sequence length / resolution, gradient checkpointing or memory setting) whose predicted peak fits the card,
fastest first;
``slimtune plan --model llama-7b --method lora --rank 16 --batch 4 --seq 512`` prints one configuration's
predicted breakdown.

**Budget.** A configuration fits when its predicted ``max_memory_allocated`` peak is at most
``(gpu_mem − CONTEXT_BYTES) × (1 − FRAGMENTATION)``: the CUDA context, cuBLAS/cuDNN handles and the driver
take memory the allocator never sees (:data:`CONTEXT_BYTES`, 0.75 GiB), and the caching allocator reserves
more than it hands out (fragmentation) while the estimate itself has an error of a few percent
(:data:`FRAGMENTATION`, 7%). ``--gpu-mem 16GB`` means 16 GiB, as GPU memory is sold.

**Throughput model** (a relative ranking, not a benchmark). A step's time is its GEMM, convolution and attention
FLOPs — counted by the estimator's simulation, so a frozen base costs ~4·N·tokens (forward + input gradients),
a full fine-tune ~6·N·tokens, gradient checkpointing one more forward, and each adapter its own GEMMs — at
``tflops`` effective TFLOP/s, plus the NF4 dequantisation traffic (0.5 byte read + 2 bytes written per weight
element, per use) at ``bandwidth`` GB/s. Tokens per second = tokens per step / step time.

**Speed of the search.** Each (method, quant, checkpointing) is simulated at the smallest and largest token
count of the grid (language models and DiTs at two and three layers, extrapolated to the real depth) at the
largest rank; the other token counts are interpolated linearly (activations grow linearly with tokens under
flash attention; attention FLOPs quadratically with a sample's length) and the other ranks corrected by their
exact adapter bytes (weights, gradients and AdamW's two moments). ``slimtune plan`` with ``--method`` simulates
the one configuration exactly.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from ..models import workload
from ..models.diffusion import DiffusionPreset
from ..models.presets import ModelPreset, Preset, get_preset, resolve_dtype
from .estimate import (BREAKDOWN_KEYS, MemoryEstimate, StepSim, adapter_bytes, build_meta_model, estimate_from_sim,
                       simulate_points)
from .report import format_bytes, format_count
from .setting import MEMORY_SETTINGS, check_for_diffusion, memory_setting

GiB = 2**30
#: Memory the allocator never sees: CUDA context, cuBLAS/cuDNN handles, driver reservations.
CONTEXT_BYTES = int(0.75 * GiB)
#: Share of the rest kept free for allocator fragmentation and estimation error.
FRAGMENTATION = 0.07
#: Effective GEMM throughput and memory bandwidth of the throughput model (only the ranking matters).
DEFAULT_TFLOPS = 100.0
DEFAULT_BANDWIDTH_GBS = 900.0

LLM_METHODS = ("lora", "dora", "hra", "loha", "lokr", "none")
UNET_METHODS = ("lora", "locon", "loha", "lokr", "none")
DIT_METHODS = ("lora", "dora", "loha", "lokr", "none")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes for ``"16GB"`` / ``"16GiB"`` / ``"16G"`` / ``"16384MB"`` (binary units: GB = GiB, as GPU memory is
    sold); a bare number is GiB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not text > 0:
            raise ConfigError(f"memory size must be positive, got {text!r}")
        return int(text * GiB)
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"cannot read the memory size {text!r}; write e.g. 16GB, 24GiB or 81920MB")
    value, unit = float(match.group(1)), match.group(2).lower()
    scale = {"": GiB if not match.group(3) else 1, "k": 2**10, "m": 2**20, "g": GiB, "t": 2**40}[unit]
    if value <= 0:
        raise ConfigError(f"memory size must be positive, got {text!r}")
    return int(value * scale)


def usable_bytes(gpu_mem: int, context: int = CONTEXT_BYTES, fragmentation: float = FRAGMENTATION) -> int:
    """The largest predicted peak that fits a card of ``gpu_mem`` bytes (see the module docstring)."""
    return max(0, int((gpu_mem - context) * (1.0 - fragmentation)))


def plain_layers_that_fit(peaks: tuple[int, int, int], budget: int, depth: int) -> int:
    """How many trailing layers a ``balanced`` / ``max-fit`` configuration can leave un-checkpointed within
    ``budget`` bytes, from its predicted peaks with none, one and two plain layers. The first costs less than the
    others (the checkpointed model's peak already holds one layer's recomputed activations); from there on each
    adds the same — a layer's activations — so the count is extrapolated from one and two. At most ``depth``;
    -1 when even none fits."""
    none, one, two = peaks
    if none > budget:
        return -1
    if one > budget:
        return 0
    step = two - one
    return depth if step <= 0 else min(depth, 1 + (budget - one) // step)


def fit_plain_layers(preset: str | Preset, method: str, rank: int, batch: int, seq: int, quant: str, dtype: str,
                     memory: str, gpu_mem: int, release_outputs: bool = False
                     ) -> tuple[int, tuple[MemoryEstimate, MemoryEstimate, MemoryEstimate]]:
    """How many trailing layers a language model's ``balanced`` / ``max-fit`` configuration can leave
    un-checkpointed on a ``gpu_mem``-byte card (:func:`plain_layer_count`; -1: even none fits), and the
    estimates with none, one and two plain layers it was read from."""
    spec = get_preset(preset)
    if not isinstance(spec, ModelPreset):
        raise ConfigError("plain (un-checkpointed) layers apply to language models")
    if not memory_setting(memory).checkpoint:
        raise ConfigError(f"memory={memory!r} checkpoints no layer: plain layers need balanced or max-fit")
    torch_dtype = resolve_dtype(dtype)
    sims = [simulate_points(spec, [(batch, seq, None)], method, rank, None, quant, torch_dtype, False, release_outputs,
                            "cuda", reduced_depth=True, memory=memory, plain_layers=n)[0] for n in (0, 1, 2)]

    def estimate(sim: StepSim) -> MemoryEstimate:
        return estimate_from_sim(spec, sim, method, rank, quant, batch, seq, None, torch_dtype, False,
                                 release_outputs, "cuda", memory)

    estimates = tuple(estimate(sim) for sim in sims)
    count, _ = plain_layer_count(estimates[0].peak_bytes, sims[1], sims[2], estimate, usable_bytes(gpu_mem),
                                 spec.num_hidden_layers)
    return count, estimates  # type: ignore[return-value]


def plain_layer_count(peak_none: int, one: StepSim, two: StepSim, estimate: Callable[[StepSim], MemoryEstimate],
                      budget: int, depth: int) -> tuple[int, MemoryEstimate | None]:
    """The most trailing layers left plain within ``budget`` (-1: even none fits; 0: none can stay plain) and the
    estimate with that many (None for 0 or -1), from the checkpointed peak and the simulated steps with one and two
    plain layers: :func:`plain_layers_that_fit` extrapolates the count, and the estimate of the step extrapolated
    to it decides (the peak is a maximum of parts, so not quite linear in the count: one layer fewer where needed)."""
    est_one, est_two = estimate(one), estimate(two)
    count = plain_layers_that_fit((peak_none, est_one.peak_bytes, est_two.peak_bytes), budget, depth)
    while count >= 1:
        est = est_one if count == 1 else est_two if count == 2 else estimate(_interpolate(one, two, 1, 2, count, 1, 1))
        if est.peak_bytes <= budget:
            return count, est
        count -= 1
    return count, None


# -- the grid ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlanPoint:
    """One configuration of the grid (``rank`` None for a full fine-tune; ``seq`` 0 and ``resolution`` set for
    diffusion models)."""

    method: str
    rank: int | None
    quant: str
    batch: int
    seq: int
    resolution: int | None
    grad_checkpointing: bool
    memory: str = "fast"  # the memory setting (slimtune.memory.setting)
    plain_layers: int = 0  # balanced / max-fit: trailing layers left un-checkpointed (:func:`plain_layer_count`)


@dataclasses.dataclass
class PlanRow:
    """A configuration with its estimate, whether it fits, and its modelled speed."""

    point: PlanPoint
    estimate: MemoryEstimate
    fits: bool
    tokens_per_s: float
    relative_speed: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.point), "peak_bytes": self.estimate.peak_bytes, "fits": self.fits,
                "tokens_per_s": round(self.tokens_per_s, 1), "relative_speed": round(self.relative_speed, 4),
                "breakdown": self.estimate.breakdown}


def default_methods(spec: Preset) -> tuple[str, ...]:
    if isinstance(spec, ModelPreset):
        return LLM_METHODS
    return UNET_METHODS if spec.family == "unet" else DIT_METHODS


def _interpolate(lo: StepSim, hi: StepSim, t_lo: float, t_hi: float, t: float, a_lo: float, a: float) -> StepSim:
    """``lo``/``hi`` simulated at ``t_lo``/``t_hi`` tokens; linear in tokens, attention FLOPs in ``a``
    (batch x sample tokens²)."""
    w = (t - t_lo) / (t_hi - t_lo) if t_hi != t_lo else 0.0

    def mix(x: float, y: float) -> float:
        return x + (y - x) * w

    fields: dict[str, Any] = {}
    for f in dataclasses.fields(StepSim):
        x, y = getattr(lo, f.name), getattr(hi, f.name)
        if f.name == "attention_flops":
            fields[f.name] = x * a / a_lo if a_lo else 0.0
        elif isinstance(x, dict):
            fields[f.name] = {k: int(round(mix(x.get(k, 0), y.get(k, 0)))) for k in {*x, *y}}
        elif isinstance(x, int):
            fields[f.name] = int(round(mix(x, y)))
        else:
            fields[f.name] = mix(x, y)
    return StepSim(**fields)


def _with_rank(sim: StepSim, delta_bytes: int, delta_params: int) -> StepSim:
    """``sim`` with ``delta_bytes`` more adapter weights: their gradients and AdamW moments too (all counted
    as present at the peak, a slight overestimate)."""
    if not delta_bytes:
        return sim
    return dataclasses.replace(
        sim, static=sim.static + delta_bytes, static_rounded=sim.static_rounded + delta_bytes,
        trainable=sim.trainable + delta_bytes, params_total=sim.params_total + delta_params,
        params_trainable=sim.params_trainable + delta_params, gradients=sim.gradients + delta_bytes,
        optimizer_state=sim.optimizer_state + 2 * delta_bytes, peak_live=sim.peak_live + 3 * delta_bytes)


def _with_plain_layers(row: PlanRow, plain: dict[int, StepSim], spec: Preset, budget: int, dtype: torch.dtype,
                       release_outputs: bool, tflops: float, bandwidth_gbs: float) -> PlanRow:
    """``row`` (a fitting balanced / max-fit configuration) with as many plain layers as fit ``budget``
    (:func:`plain_layer_count`, from its simulated steps with one and two), or ``row`` itself when none can."""
    p = row.point

    def estimate(sim: StepSim) -> MemoryEstimate:
        return estimate_from_sim(spec, sim, p.method, p.rank or 0, p.quant, p.batch, p.seq, p.resolution, dtype,
                                 p.grad_checkpointing, release_outputs, "cuda", p.memory)

    count, est = plain_layer_count(row.estimate.peak_bytes, plain[1], plain[2], estimate, budget,
                                   spec.num_hidden_layers)
    if est is None:
        return row
    speed = est.tokens / max(est.step_seconds(tflops, bandwidth_gbs), 1e-12)
    return PlanRow(dataclasses.replace(p, plain_layers=count), est, True, speed)


class PlanResult(list):
    """The rows of :func:`search` (a list), with ``skipped``: the (method, quant, checkpointing) groups whose
    simulation failed, and why (e.g. a combination slimtune cannot train)."""

    def __init__(self, rows: Sequence[PlanRow], skipped: Sequence[str] = ()) -> None:
        super().__init__(rows)
        self.skipped = list(skipped)


def search(preset: str | Preset, gpu_mem: int, methods: Sequence[str] | None = None, ranks: Sequence[int] = (16,),
           quants: Sequence[str] = ("none", "nf4"), batches: Sequence[int] = (1, 2, 4, 8),
           seqs: Sequence[int] = (512, 1024, 2048), resolutions: Sequence[int] | None = None,
           grad_checkpointing: Sequence[bool] = (False, True), dtype: str = "bfloat16", release_outputs: bool = False,
           tflops: float = DEFAULT_TFLOPS, bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS,
           on_group: Callable[[str], None] | None = None, memories: Sequence[str] = ("fast",),
           plain_layer_search: bool = True) -> PlanResult:
    """Every configuration of the grid with its estimate; fitting ones first, fastest first.

    ``gpu_mem``: the card's memory in bytes (the budget is :func:`usable_bytes` of it). ``seqs`` apply to
    language models, ``resolutions`` (latent sides; default the preset's) to diffusion models. ``on_group`` is
    called with a description before each simulated group (progress). ``memories``: the memory settings to
    try (:mod:`.setting`; ``balanced`` and ``max-fit`` for language models, without transformers' checkpointing,
    which they replace). ``plain_layer_search``: each fitting ``balanced`` / ``max-fit`` configuration of a
    language model leaves as many trailing layers un-checkpointed as still fit (faster: less recomputation; two more
    simulations per group with a fitting configuration); its row says how many (``PlanPoint.plain_layers``).
    """
    spec = get_preset(preset)
    torch_dtype = resolve_dtype(dtype)
    budget = usable_bytes(gpu_mem)
    methods = tuple(methods or default_methods(spec))
    for method in methods:
        if method not in workload.METHODS:
            raise ConfigError(f"unknown method {method!r}; choose from {', '.join(workload.METHODS)}")
    for quant in quants:
        if quant not in ("none", "nf4"):
            raise ConfigError(f"unknown quant {quant!r}; choose from none, nf4")
    diffusion = isinstance(spec, DiffusionPreset)
    for memory in memories:
        if diffusion:
            check_for_diffusion(memory_setting(memory))
    variants = [(gc, "fast") for gc in grad_checkpointing if "fast" in memories]
    variants += [(False, m) for m in memories if m != "fast"]
    if not variants:
        raise ConfigError("the grid is empty: memory settings other than fast go without grad checkpointing")
    shapes = ([(b, 0, r) for b in batches for r in (resolutions or [spec.sample_size])] if diffusion
              else [(b, s, None) for b in batches for s in seqs])
    if not shapes or not ranks:
        raise ConfigError("the grid is empty: give at least one batch, one seq/resolution and one rank")

    def tokens(shape: tuple[int, int, int | None]) -> tuple[int, int]:
        per_sample = workload.sample_tokens(spec, shape[1], shape[2])
        return shape[0] * per_sample, shape[0] * per_sample**2

    lo, hi = min(shapes, key=lambda s: tokens(s)[0]), max(shapes, key=lambda s: tokens(s)[0])
    ref_rank = max(ranks)
    bases: dict[str, Any] = {}
    rows: list[PlanRow] = []
    skipped: list[str] = []
    for method in methods:
        for quant in quants:
            if quant != "none" and method == "none":
                continue
            for gc, memory in variants:
                label = (f"{method}{'+' + quant if quant != 'none' else ''}{' +GC' if gc else ''}"
                         f"{' memory=' + memory if memory != 'fast' else ''}")
                if on_group is not None:
                    on_group(label)
                points = [lo] if lo == hi else [lo, hi]
                try:
                    sims = simulate_points(spec, points, method, ref_rank, None, quant, torch_dtype, gc,
                                           release_outputs, "cuda", reduced_depth=True, memory=memory)
                except Exception as exc:  # noqa: BLE001 - a combination slimtune cannot run is reported, not fatal
                    skipped.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    continue
                sim_lo, sim_hi = sims[0], sims[-1]
                # balanced / max-fit on a language model: with one and two plain layers too, simulated only when
                # some configuration of the group fits (then each fitting row keeps as many as still fit)
                plain_sims: dict[int, list[StepSim]] | None = None
                method_ranks: Sequence[int | None] = [None] if method == "none" else ranks
                for rank in method_ranks:
                    delta = (0, 0)
                    if rank is not None and rank != ref_rank:
                        if quant not in bases:
                            bases[quant] = build_meta_model(spec, "none", quant=quant, dtype=torch_dtype)[0]
                        now = adapter_bytes(bases[quant], spec, method, rank)
                        ref = adapter_bytes(bases[quant], spec, method, ref_rank)
                        delta = (now[0] - ref[0], now[1] - ref[1])
                    for shape in shapes:
                        (t, a), (t_lo, a_lo), (t_hi, _) = tokens(shape), tokens(lo), tokens(hi)
                        sim = _with_rank(_interpolate(sim_lo, sim_hi, t_lo, t_hi, t, a_lo, a), *delta)
                        est = estimate_from_sim(spec, sim, method, rank or ref_rank, quant, shape[0], shape[1],
                                                shape[2], torch_dtype, gc, release_outputs, "cuda", memory)
                        point = PlanPoint(method, rank, quant, shape[0], shape[1], est.resolution, gc, memory)
                        speed = est.tokens / max(est.step_seconds(tflops, bandwidth_gbs), 1e-12)
                        row = PlanRow(point, est, est.peak_bytes <= budget, speed)
                        if row.fits and plain_layer_search and memory_setting(memory).checkpoint and not diffusion:
                            if plain_sims is None:
                                plain_sims = {n: simulate_points(spec, points, method, ref_rank, None, quant,
                                                                 torch_dtype, gc, release_outputs, "cuda",
                                                                 reduced_depth=True, memory=memory, plain_layers=n)
                                              for n in (1, 2)}
                            plain = {n: _with_rank(_interpolate(plain_sims[n][0], plain_sims[n][-1], t_lo, t_hi, t,
                                                                a_lo, a), *delta) for n in (1, 2)}
                            row = _with_plain_layers(row, plain, spec, budget, torch_dtype, release_outputs, tflops,
                                                     bandwidth_gbs)
                        rows.append(row)
    if not rows:
        raise ConfigError("no configuration could be simulated: " + "; ".join(skipped))
    best = max((r.tokens_per_s for r in rows if r.fits), default=0.0) or max(r.tokens_per_s for r in rows)
    for row in rows:
        row.relative_speed = row.tokens_per_s / best
    rows.sort(key=lambda r: (not r.fits, -r.tokens_per_s if r.fits else r.estimate.peak_bytes))
    return PlanResult(rows, skipped)


# -- presentation -----------------------------------------------------------------------------------
def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def _config_label(p: PlanPoint) -> str:
    method = "full FT" if p.method == "none" else p.method
    return method + ("+nf4" if p.quant == "nf4" else "")


def _shape(p: PlanPoint, diffusion: bool) -> str:
    return f"{p.batch}×{p.resolution}²" if diffusion else f"{p.batch}×{p.seq}"


def summary_table(rows: Sequence[PlanRow], gpu_mem: int, diffusion: bool) -> Any:
    """One row per method (and base quantisation): the largest batch x length that fits, without and with
    gradient checkpointing and with each memory setting searched, or how much memory the smallest configuration
    needs."""
    from rich.table import Table

    budget = usable_bytes(gpu_mem)
    table = Table(title=f"What fits {gpu_mem / GiB:g} GiB: the most {'samples' if diffusion else 'tokens'} per step "
                        "(batch × " + ("latent side²" if diffusion else "seq") + ")")
    table.add_column("method")
    table.add_column("without grad ckpt", justify="right")
    table.add_column("with grad ckpt", justify="right")
    settings = [m for m in MEMORY_SETTINGS if m != "fast" and any(r.point.memory == m for r in rows)]
    for memory in settings:
        table.add_column(f"memory={memory}", justify="right")
    groups: dict[tuple[str, str], list[PlanRow]] = {}
    for row in rows:
        groups.setdefault((row.point.method, row.point.quant), []).append(row)
    for (method, quant), members in groups.items():
        cells = []
        for gc, memory in [(False, "fast"), (True, "fast"), *((False, m) for m in settings)]:
            mine = [r for r in members if r.point.grad_checkpointing == gc and r.point.memory == memory]
            if not mine:
                cells.append("[dim]not simulated[/dim]")
                continue
            fitting = [r for r in mine if r.fits]
            if fitting:
                best = max(fitting, key=lambda r: (r.estimate.tokens, -r.estimate.peak_bytes))
                cells.append(f"[green]{_shape(best.point, diffusion)}[/green] ({_gib(best.estimate.peak_bytes)})")
            else:
                least = min(mine, key=lambda r: r.estimate.peak_bytes)
                cells.append(f"[red]no[/red] (≥ {_gib(least.estimate.peak_bytes)})")
        table.add_row(_config_label(members[0].point), *cells)
    table.caption = f"a configuration fits when its predicted peak ≤ {_gib(budget)}; ranks as given"
    return table


def search_table(rows: Sequence[PlanRow], gpu_mem: int, top: int, diffusion: bool) -> Any:
    """A rich Table of the best ``top`` fitting configurations (or the smallest ones when none fits)."""
    from rich.table import Table

    budget = usable_bytes(gpu_mem)
    fitting = [r for r in rows if r.fits]
    shown = fitting[:top] if fitting else rows[:min(top, 5)]
    title = (f"The {len(shown)} fastest of the {len(fitting)} (of {len(rows)}) configurations that fit" if fitting
             else f"nothing fits {gpu_mem / GiB:g} GiB (peak ≤ {_gib(budget)}): the smallest configurations")
    table = Table(title=title)
    for name, justify in (("#", "right"), ("method", "left"), ("rank", "right"),
                          ("batch×res²" if diffusion else "batch×seq", "right"), ("ckpt", "center"),
                          ("peak", "right"), ("free", "right"), ("speed", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    if any(row.point.plain_layers for row in shown):
        table.caption = ("ckpt balanced / max-fit +N: the last N layers left un-checkpointed (as many as fit; "
                         "train --plain-layers N, or auto)")
    for i, row in enumerate(shown, 1):
        p = row.point
        table.add_row(str(i), _config_label(p), "—" if p.rank is None else str(p.rank), _shape(p, diffusion),
                      "on" if p.grad_checkpointing else (p.memory if p.memory != "fast" else "—")
                      + (f" +{p.plain_layers}" if p.plain_layers else ""),
                      _gib(row.estimate.peak_bytes),
                      _gib(budget - row.estimate.peak_bytes) if row.fits else "—", f"{row.relative_speed:.2f}×")
    return table


def breakdown_table(est: MemoryEstimate, gpu_mem: int | None = None) -> Any:
    """A rich Table of one estimate: the parts of the peak, then the activations by module kind."""
    from rich.table import Table


    table = Table(title=f"{est.label} · batch {est.batch} × "
                        + (f"{est.resolution}² latents" if est.resolution else f"seq {est.seq}") + f" · {est.dtype}")
    table.add_column("part")
    table.add_column("predicted", justify="right")
    table.add_column("share of peak", justify="right")
    labels = dict(base_weights="base weights" + (" (NF4 + dense embeddings)" if est.quant == "nf4" else ""),
                  adapter_weights="adapter weights", gradients="gradients", optimizer_state="optimizer state (AdamW)",
                  activations="activations saved for backward", temporary="temporary (peak rest)")
    for key in BREAKDOWN_KEYS:
        value = est.breakdown[key]
        table.add_row(labels[key], format_bytes(value), f"{100 * value / est.peak_bytes:.1f}%")
    table.add_section()
    table.add_row("[bold]peak (max_memory_allocated)[/bold]", f"[bold]{format_bytes(est.peak_bytes)}[/bold]", "")
    table.add_row("after model creation", format_bytes(est.mem_created_bytes), "")
    share = 100 * est.params_trainable / est.params_total if est.params_total else 0.0
    table.add_row("parameters (trainable)", f"{format_count(est.params_total)} ({format_count(est.params_trainable)},"
                  f" {share:.2f}%)", "")
    if est.activations_by_module:
        table.add_section()
        for kind, value in est.activations_by_module.items():
            table.add_row(f"  activations: {kind}", format_bytes(value), "")
    if gpu_mem is not None:
        budget = usable_bytes(gpu_mem)
        verdict = "[green]fits[/green]" if est.peak_bytes <= budget else "[red]does not fit[/red]"
        table.add_section()
        table.add_row(f"{gpu_mem / GiB:g} GiB card (usable {_gib(budget)})", verdict, "")
    return table


FOOTNOTE = ("Budget: predicted peak ≤ (card − {ctx:.2f} GiB for the CUDA context and library handles) × "
            "{keep:.0%} (allocator fragmentation and estimation error). Speed: modelled tokens/s relative to the "
            "fastest fitting configuration (step FLOPs incl. recomputation, plus NF4 dequantisation traffic).")
