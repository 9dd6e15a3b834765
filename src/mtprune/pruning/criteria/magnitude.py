"""Weight-magnitude baselines: L1 / L2 norm of each filter (Li et al., ICLR 2017)."""

from __future__ import annotations

from torch import Tensor

from ..stats import GroupStats
from .base import Criterion


class L1(Criterion):
    name = "l1"
    normalize = "mean"
    p = 1

    def score(self, stats: GroupStats) -> Tensor:
        return stats.weight.norm(p=self.p, dim=1)


class L2(L1):
    name = "l2"
    p = 2
