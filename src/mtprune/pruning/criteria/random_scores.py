"""Random scores: the floor every criterion must beat. Seeded, so decisions are reproducible."""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import GroupStats
from .base import Criterion


class Random(Criterion):
    name = "random"

    def score(self, stats: GroupStats) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + stats.group.index)
        return torch.rand(stats.group.channels, generator=gen)
