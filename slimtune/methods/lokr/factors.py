"""LoKr's factors ``(s·w1, w2)`` from a layer's parameters in PEFT's forms, and the parameters' gradients back
from ``(dw1, dw2)`` — explicit formulas, shared by every LoKr path."""
from __future__ import annotations

from typing import Sequence

import torch

from ...core.products import Grad, lowrank_grad, tucker_grad, tucker_weight
from ...core.structured import Params


def lokr_factors(names: tuple[str, ...], params: tuple[torch.Tensor, ...], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) in ``dtype`` from the layer's parameters (w2 as PEFT forms it: 2-D when low-rank)."""
    return LokrFactors(names).build([t.to(dtype) for t in params], 1.0)


class LokrFactors:
    """``w1`` (times ``s``) and ``w2`` from a layer's parameters, in PEFT's forms (w2 2-D when low-rank, the
    full / Tucker w2 with its kernel), and the parameters' gradients from ``dw1``, ``dw2`` — explicit formulas.

    ``names`` come in the layer's order: w1's parameters (``lokr_w1``, or ``lokr_w1_a``, ``lokr_w1_b``), then w2's
    (``lokr_w2``; ``lokr_t2``, ``lokr_w2_a``, ``lokr_w2_b``; or ``lokr_w2_a``, ``lokr_w2_b``). The layout is read
    once here, so the per-call methods index the parameter list directly."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.n_w1 = 2 if "lokr_w1_a" in names else 1  # params[:n_w1] make w1, the rest w2
        self.w2_form = "full" if "lokr_w2" in names else "tucker" if "lokr_t2" in names else "lowrank"

    def build(self, params: Params, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = params[0] if self.n_w1 == 1 else params[0] @ params[1]
        p2 = params[self.n_w1:]
        if self.w2_form == "full":
            w2 = p2[0]
        elif self.w2_form == "tucker":
            w2 = tucker_weight(*p2)
        else:
            w2 = p2[0] @ p2[1]
        return (w1 if s == 1.0 else w1 * s), w2

    def needs(self, need: Sequence[bool]) -> tuple[bool, bool]:
        """Whether any w1 parameter, any w2 parameter needs a gradient."""
        return any(need[:self.n_w1]), any(need[self.n_w1:])

    def grads(self, dw1_s: Grad, dw2: Grad, params: Params, s: float, need: Sequence[bool]) -> list[Grad]:
        """The parameters' gradients (in ``names`` order) from those of ``w1 · s`` and ``w2``."""
        n1 = self.n_w1
        out: list[Grad] = [None] * len(params)
        if dw1_s is not None:
            dw1 = dw1_s if s == 1.0 else dw1_s * s
            if n1 == 1:
                out[0] = dw1
            else:
                out[0], out[1] = lowrank_grad(dw1, params[0], params[1], need[0], need[1])
        if dw2 is not None:
            p2, n2 = params[n1:], need[n1:]
            if self.w2_form == "full":
                grads2 = (dw2.reshape(p2[0].shape),)
            elif self.w2_form == "tucker":
                grads2 = tucker_grad(dw2, *p2, n2)
            else:
                a, b = p2
                grads2 = lowrank_grad(dw2.reshape(a.shape[0], -1), a, b, n2[0], n2[1])
            out[n1:] = grads2
        return [g if wanted else None for g, wanted in zip(out, need)]
