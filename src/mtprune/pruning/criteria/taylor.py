"""Taylor-FO on gates, summed loss (Molchanov et al., CVPR 2019).

A gate g = 1 multiplies each channel; per minibatch the score is (Σ a · ∂L/∂a)² with L = Σ_t L_t, the sum taken
over every dimension of the gate's output but its channel dimension (batch and space for a conv, batch and tokens
for a Linear on tokens; ``pruning.stats.gate_statistic``), averaged over the batches of an interval and ranked
globally (as Garg et al. 2023 use it).
"""

from __future__ import annotations

from torch import Tensor

from ..stats import TASK_GATE_TAYLOR, GroupStats
from .base import Criterion


class Taylor(Criterion):
    name = "taylor"
    needs = frozenset({TASK_GATE_TAYLOR})

    def batch_score(self, stats: GroupStats) -> Tensor:
        return sum(stats.task_gate_taylor.values()).pow(2)
