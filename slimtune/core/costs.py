"""What a structured update's two training paths cost, and the choice between them (LoHa, LoKr).

A path's :class:`Cost` counts FLOPs, bytes moved and kernel launches beyond the base layer's own GEMM /
convolution; :func:`choose_path` takes the cheaper, the way :func:`slimtune.core.lowrank.choose_backward` picks
LoRA's backward. Each method supplies its own counts (``methods/loha/costs.py``, ``methods/lokr/math.py``) built
on :func:`folded_cost` for the folded side.
"""
from __future__ import annotations

import dataclasses

Path = str  # "structured" | "folded"
PATHS = ("structured", "folded")

#: A byte moved to or from memory costs about as much time as this many FLOPs (H100 bf16: ~990 TFLOP/s over
#: ~3.35 TB/s ≈ 300 at peak; lower for what GEMMs and elementwise kernels actually reach). Module-level so a
#: benchmark can tune it.
FLOPS_PER_BYTE = 200.0
#: A kernel launch costs the host ~10-70 µs on the lent machines (``benchmarks/host_cost.py``), and a training step
#: at a few thousand tokens is host-bound there; counted as this many FLOPs (~5 µs of an H100's matrix units).
FLOPS_PER_LAUNCH = 4e9


# -- the chooser ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cost:
    """Work beyond the base layer's own GEMM / convolution (and its input gradient)."""

    flops: float
    bytes: float
    launches: int = 0

    def score(self) -> float:
        return self.flops + FLOPS_PER_BYTE * self.bytes + FLOPS_PER_LAUNCH * self.launches


def choose_path(costs: dict[Path, Cost]) -> Path:
    """The cheaper path (ties go to ``"structured"``, which allocates less). A plain comparison, which
    ``torch.compile`` traces (it cannot trace ``min`` with a ``key``)."""
    return "folded" if costs["folded"].score() < costs["structured"].score() else "structured"


def folded_cost(tokens: int, d_in: int, d_out: int, build_flops: float, build_passes: int, grad_passes: int,
                itemsize: int, backward: bool, launches: tuple[int, int] = (0, 0)) -> Cost:
    """Folded path: build ``W + ΔW`` (``build_passes`` passes over a dense ``[d_out, d_in]``); the GEMM with it
    replaces the base's. Backward builds it again, adds ``dW = dyᵀx`` (``2·N·d_in·d_out``) and maps ``dW`` to
    the factors (about twice the build's FLOPs, ``grad_passes`` dense passes). ``launches``: kernels beyond the
    base layer's own, (forward, backward)."""
    dense = d_in * d_out
    flops, passes, count = build_flops, build_passes, launches[0]
    if backward:
        flops += 3 * build_flops + 2 * tokens * dense
        passes += build_passes + 1 + grad_passes
        count += launches[1]
    return Cost(flops, passes * dense * itemsize, count)
