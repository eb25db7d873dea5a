"""LoHa's cost counts for :func:`slimtune.core.costs.choose_path` (structured vs folded, per layer and call)."""
from __future__ import annotations

from ...core.costs import Cost, Path, folded_cost


def loha_costs(tokens: int, d_in: int, d_out: int, r: int, itemsize: int, backward: bool,
               fused_fold: bool = False) -> dict[Path, Cost]:
    """LoHa on a Linear (a convolution: ``d_in = c_in·kernel``, tokens = output positions).

    Structured is LoRA at rank ``R = r²``: forward ``2·N·R·(d_in + d_out)``; backward (``x·downᵀ``
    recomputed) ``2·N·R·(3·d_in + 2·d_out)``; 4 + 12 launches. Folded: two rank-r GEMMs build ``W1``, ``W2``
    (``4·r·d_out·d_in``) and ``addcmul`` forms ``W + W1 ⊙ W2`` (6 dense passes, 3 + 10 launches), or with
    ``fused_fold`` (:mod:`.triton_kernels`) one kernel reads W and writes ``W + ΔW`` (2 passes) and
    one more maps ``dW`` to the factors (2 passes over it): 1 + 3 launches."""
    rr = r * r
    flops = 2 * tokens * rr * (d_in + d_out)
    moved = rr * (d_in + d_out) + 2 * tokens * rr
    if backward:
        flops += 2 * tokens * rr * (3 * d_in + 2 * d_out)
        moved += 3 * rr * (d_in + d_out) + 6 * tokens * rr
    structured = Cost(flops, moved * itemsize, 4 + (12 if backward else 0))
    if fused_fold:
        folded = folded_cost(tokens, d_in, d_out, 4 * r * d_in * d_out, 2, 2, itemsize, backward, (1, 3))
    else:
        folded = folded_cost(tokens, d_in, d_out, 4 * r * d_in * d_out, 6, 10, itemsize, backward, (3, 10))
    return {"structured": structured, "folded": folded}


def loha_tucker_costs(tokens_in: int, tokens: int, c_in: int, c_out: int, kernel: int, r: int, itemsize: int,
                      backward: bool) -> dict[Path, Cost]:
    """Tucker LoHa on a convolution: structured = 1x1 down to ``R = r²`` channels at the input positions, the
    ``[R, R, *k]`` core convolution, 1x1 up; its backward recomputes the chain (about 3x the forward)."""
    rr = r * r
    flops = 2 * rr * (tokens_in * c_in + tokens * rr * kernel + tokens * c_out)
    moved = 2 * rr * (tokens_in + 2 * tokens) + rr * rr * kernel
    if backward:
        flops, moved = 4 * flops, 4 * moved
    structured = Cost(flops, moved * itemsize)
    folded = folded_cost(tokens, c_in * kernel, c_out, 4 * r * c_in * kernel * c_out, 6, 10, itemsize, backward)
    return {"structured": structured, "folded": folded}
