"""The order rows are seen in, as a function of the run's seed and a position: nothing to save but the position.

Epoch ``e`` visits the ``n`` rows in the permutation ``torch.randperm(n)`` drawn from a generator seeded with
``(seed, e)``; position ``p`` (rows consumed so far, over all processes) is row ``perm_{p // n}[p % n]``. A batch
that runs past the end of an epoch continues into the next. Without rows (an endless stream of generated samples)
position ``p`` is sample ``p``. A resumed run, whatever its number of processes, continues from the saved position.
"""
from __future__ import annotations

import torch


class DataOrder:
    """Row indices by position; ``rows``: the number of rows, or ``None`` for an endless stream."""

    def __init__(self, rows: int | None, seed: int) -> None:
        self.rows, self.seed = rows, seed
        self._epoch: int | None = None
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(int(self.rows or 0), generator=gen).tolist(), epoch
        return self._perm

    def take(self, position: int, count: int) -> list[int]:
        """The ``count`` row indices from ``position`` on."""
        if self.rows is None:
            return list(range(position, position + count))
        return [self._permutation(p // self.rows)[p % self.rows] for p in range(position, position + count)]

    def epoch(self, position: int) -> float:
        """Epochs completed at ``position`` (fractional); 0 for a stream."""
        return position / self.rows if self.rows else 0.0
