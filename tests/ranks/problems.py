"""Constructed problems with a known answer, shared by the rank-allocation tests."""
from __future__ import annotations

import torch
from torch import nn


class TwoLayers(nn.Module):
    """Two parallel bias-free Linears ``a`` and ``b`` of width ``d`` (a model whose layers do not interact)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d, bias=False)
        self.b = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def low_rank(d: int, rank: int, gen: torch.Generator, norm: float = 3.0) -> torch.Tensor:
    """A ``[d, d]`` matrix of rank ``rank`` and Frobenius norm ``norm``."""
    m = torch.randn(d, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
    return m * (norm / m.norm())


def regression_problem(d: int = 64, ranks: tuple[int, int] = (2, 30), batches: int = 3, tokens: int = 256,
                       seed: int = 0):
    """``(model, batches, loss_fn)``: layer ``a`` must learn a rank-``ranks[0]`` update, ``b`` one of rank
    ``ranks[1]`` (same norm); the loss is half the squared error of both, so each layer's gradient is
    ``-ΔW·C`` at the start (C the input covariance)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TwoLayers(d)
    targets = {"a": model.a.weight.detach() + low_rank(d, ranks[0], gen),
               "b": model.b.weight.detach() + low_rank(d, ranks[1], gen)}
    data = [torch.randn(tokens, d, generator=gen) for _ in range(batches)]

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ya, yb = m(x)
        ta, tb = x @ targets["a"].to(x.dtype).T, x @ targets["b"].to(x.dtype).T
        return 0.5 * ((ya - ta) ** 2).sum(-1).mean() + 0.5 * ((yb - tb) ** 2).sum(-1).mean()

    return model, data, loss_fn
