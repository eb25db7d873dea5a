"""The PEFT config a set of kohya / LyCORIS modules amounts to, and the kohya ``alpha`` a PEFT config gives back.

A kohya file says per module what PEFT's config says once: the rank is in the tensors' shapes and the scale in a
stored ``alpha`` (``scale = alpha / r``; a missing or zero alpha means ``alpha = r``). :func:`config_for` turns the
per-module ranks and alphas into ``r`` / ``alpha`` (the most common values) plus ``rank_pattern`` /
``alpha_pattern`` for the others (keyed by full module path), the targets into the list of module paths, and the
method's switches into its config fields — refusing, with the module named, what one PEFT config cannot say.

LoKr needs the most care (the rules are PEFT's and LyCORIS', :mod:`slimtune.methods.lokr.math`):

* LyCORIS scales a layer whose two Kronecker factors are both full matrices by 1 whatever its alpha; PEFT always
  by ``alpha / r``. Such a layer gets the smallest ``r`` for which PEFT keeps both factors full and ``alpha = r``.
* The factor shapes come from one ``decompose_factor`` in PEFT; the first of ``-1`` and the shapes' own sides that
  reproduces every module's ``w1`` / ``w2`` split is taken. ``decompose_both`` is on when any module splits w1.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import torch

from ..core.config import AdapterConfig
from ..errors import CheckpointError
from ..methods.loha import LohaConfig
from ..methods.lokr import LokrConfig, factorization
from ..methods.lora import LoraConfig
from ..methods.lora.math import lora_scaling
from .layout import DORA_SCALE, LOHA, LOKR, LORA, Layout


@dataclasses.dataclass
class KohyaModule:
    """One adapted layer as a kohya file holds it: ``tensors`` kohya suffix -> tensor (``alpha`` apart)."""

    name: str  # the kohya module name, prefix included
    path: str  # the diffusers module path it stands for
    layout: Layout
    tensors: dict[str, torch.Tensor]
    alpha: torch.Tensor | None

    def primary(self) -> torch.Tensor:
        """The first of the method's tensors (its dtype is the one kohya trainers save ``alpha`` in)."""
        return next(self.tensors[k] for k in self.layout.keys if k in self.tensors)


def stored_alpha(alpha: torch.Tensor | None, r: int) -> float:
    """kohya's reading of a stored alpha: missing or 0 means ``r`` (no scaling)."""
    value = None if alpha is None else float(alpha.float().reshape(-1)[0])
    return float(r) if value is None or value == 0 else value


# -- LoKr geometry -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KronShape:
    """A LoKr module's factor geometry read from its tensors. ``b_in`` is None where the file cannot tell it (a
    low-rank, non-Tucker w2 of a convolution stores ``b_in · kernel`` flattened)."""

    a_out: int
    a_in: int
    b_out: int
    b_in: int | None
    rank_w1: int | None  # None: full w1
    rank_w2: int | None  # None: full w2
    tucker: bool


def kron_shape(module: KohyaModule) -> KronShape:
    t = module.tensors
    if "lokr_w1" in t:
        (a_out, a_in), rank_w1 = t["lokr_w1"].shape[:2], None
    else:
        a_out, rank_w1, a_in = t["lokr_w1_a"].shape[0], t["lokr_w1_a"].shape[1], t["lokr_w1_b"].shape[1]
    tucker = "lokr_t2" in t
    if "lokr_w2" in t:
        (b_out, b_in), rank_w2 = t["lokr_w2"].shape[:2], None
    elif tucker:
        rank_w2, b_out, b_in = t["lokr_t2"].shape[0], t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]
    else:
        (b_out, rank_w2), b_in = t["lokr_w2_a"].shape[:2], None  # w2_b holds b_in·kernel flattened
    return KronShape(int(a_out), int(a_in), int(b_out), None if b_in is None else int(b_in),
                     None if rank_w1 is None else int(rank_w1), None if rank_w2 is None else int(rank_w2), tucker)


def _fits_factor(shape: KronShape, factor: int) -> bool:
    if factorization(shape.a_out * shape.b_out, factor) != (shape.a_out, shape.b_out):
        return False
    return shape.b_in is None or factorization(shape.a_in * shape.b_in, factor) == (shape.a_in, shape.b_in)


def lokr_factor(shapes: dict[str, KronShape]) -> int:
    """The one PEFT ``decompose_factor`` that gives every module its factor shapes."""
    candidates = [-1] + sorted({s for k in shapes.values() for s in (k.a_out, k.a_in, k.b_out, k.b_in or 1)} - {1})
    for factor in candidates:
        if all(_fits_factor(shape, factor) for shape in shapes.values()):
            return factor
    lone = next((p for p, s in shapes.items() if not any(_fits_factor(s, f) for f in candidates)), None)
    detail = (f"{lone}'s split (w1 {shapes[lone].a_out}x{shapes[lone].a_in}, w2 {shapes[lone].b_out} rows) is no "
              "PEFT factorization (LyCORIS orders a factor larger than the root first, PEFT does not; or "
              "unbalanced_factorization)" if lone else "the modules need different factors")
    raise CheckpointError(f"the LoKr factor shapes fit no single PEFT decompose_factor: {detail}")


def lokr_rank(path: str, shape: KronShape, decompose_both: bool) -> int:
    """The PEFT ``r`` that rebuilds this module's form (full or low-rank w1 and w2) under PEFT's rules."""
    if shape.rank_w1 is not None and shape.rank_w2 is not None and shape.rank_w1 != shape.rank_w2:
        raise CheckpointError(f"{path}: lokr_w1 has rank {shape.rank_w1}, lokr_w2 rank {shape.rank_w2}; PEFT "
                              "uses one rank for both")
    rank = shape.rank_w2 if shape.rank_w2 is not None else shape.rank_w1
    half_a, half_b = max(shape.a_out, shape.a_in) / 2, max(shape.b_out, shape.b_in or 0) / 2
    if rank is None:  # both full: the smallest r PEFT keeps full matrices for
        rank = max(math.ceil(half_b), math.ceil(half_a) if decompose_both else 1, 1)
    full_w1 = not (decompose_both and rank < half_a)
    full_w2 = rank >= half_b  # decides only where b_in is known (a full or a Tucker w2)
    if full_w1 != (shape.rank_w1 is None) or (shape.rank_w2 is None and not full_w2) or (
            shape.rank_w2 is not None and shape.b_in is not None and full_w2):
        raise CheckpointError(f"{path}: its LoKr form (w1 {'full' if shape.rank_w1 is None else 'low-rank'}, w2 "
                              f"{'full' if shape.rank_w2 is None else 'low-rank'}, rank {rank}) is not what PEFT "
                              f"builds for that rank (LyCORIS full_matrix?)")
    return rank


# -- the config ----------------------------------------------------------------------------------------------------
def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(most common value, {path: value} for the others)``."""
    default = collections.Counter(values.values()).most_common(1)[0][0]
    return default, {path: v for path, v in values.items() if v != default}


def _all_or_none(modules: list[KohyaModule], test: Any, what: str) -> bool:
    flags = {m.path: bool(test(m)) for m in modules}
    if len(set(flags.values())) > 1:
        some = sorted(p for p, f in flags.items() if f)[:3]
        raise CheckpointError(f"{what} is on for some modules only (e.g. {', '.join(some)}): PEFT's config sets "
                              "it for the whole adapter")
    return next(iter(flags.values()))


def config_for(modules: list[KohyaModule]) -> AdapterConfig:
    """The slimtune (= PEFT) config whose adapters have exactly these modules' shapes and scales."""
    layouts = {m.layout.method for m in modules}
    if len(layouts) != 1:
        raise CheckpointError(f"the file mixes methods ({', '.join(sorted(layouts))}); PEFT's format holds one")
    layout = modules[0].layout
    targets = sorted(m.path for m in modules)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if layout is LOKR:
        shapes = {m.path: kron_shape(m) for m in modules}
        both = any(s.rank_w1 is not None for s in shapes.values())
        for m in modules:
            ranks[m.path] = lokr_rank(m.path, shapes[m.path], both)
            full = shapes[m.path].rank_w1 is None and shapes[m.path].rank_w2 is None
            alphas[m.path] = float(ranks[m.path]) if full else stored_alpha(m.alpha, ranks[m.path])
        # Tucker applies to kernels > 1 only, which a flattened w2 does not show: a layer it should have covered
        # fails the shape check on loading into the model.
        extra = dict(decompose_both=both, decompose_factor=lokr_factor(shapes),
                     use_effective_conv2d=any(s.tucker for s in shapes.values()))
    else:
        for m in modules:
            down = m.tensors["lora_down.weight" if layout is LORA else "hada_w1_b"]
            ranks[m.path] = int(down.shape[0])
            alphas[m.path] = stored_alpha(m.alpha, ranks[m.path])
        if layout is LORA:
            for m in modules:
                if m.tensors["lora_up.weight"].shape[1] != ranks[m.path]:
                    raise CheckpointError(f"{m.path}: lora_up has {m.tensors['lora_up.weight'].shape[1]} input "
                                          f"channels for rank {ranks[m.path]} (a grouped LoCon?)")
            extra = dict(use_dora=_all_or_none(modules, lambda m: DORA_SCALE in m.tensors, "DoRA (dora_scale)"))
        else:
            extra = dict(use_effective_conv2d=any("hada_t1" in m.tensors for m in modules))
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    config_class = {"lora": LoraConfig, "loha": LohaConfig, "lokr": LokrConfig}[layout.method]
    return config_class(target_modules=targets, r=r, alpha=alpha, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, **extra)


def kohya_alpha(config: AdapterConfig, path: str) -> float:
    """The alpha kohya stores for ``path`` so that ``alpha / r`` is the adapter's scale (rsLoRA: ``alpha·√r``)."""
    alpha, r = config.alpha_for(path), config.rank_for(path)
    if isinstance(config, LoraConfig) and config.rslora:
        return lora_scaling(alpha, r, True) * r
    return float(alpha)


def layout_for(config: AdapterConfig) -> Layout:
    """The kohya layout of a slimtune config's method; HRA (and any other) has none."""
    if isinstance(config, LoraConfig):
        return LORA
    if isinstance(config, LohaConfig):
        return LOHA
    if isinstance(config, LokrConfig):
        return LOKR
    raise CheckpointError(f"{type(config).__name__} adapters have no kohya / LyCORIS format (kohya files hold "
                          "LoRA/LoCon, DoRA, LoHa and LoKr)")
