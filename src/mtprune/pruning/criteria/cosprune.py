"""CosPrune (Garg, Zhang, Guan, arXiv 2304.06840, 2023).

Per iteration, for each filter i: the per-task gradient rows ĝ_t,i = ∂L_t/∂W_i / ‖·‖, and
c(i) = mean over task pairs t < s of ⟨ĝ_t,i, ĝ_s,i⟩, averaged over the interval. Filters whose task gradients
conflict most (lowest c) are pruned first. As in the paper, only shared (backbone) filters are candidates:
a head's filter receives the gradient of one task only, so it has no pairwise cosine.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import ChannelGroup
from ..stats import TASK_WEIGHT_GRADS, GroupStats
from .base import Criterion


def mean_pairwise_cosine(grads: list[Tensor]) -> Tensor:
    """grads: T tensors [C, D] → [C], the mean cosine over task pairs, row by row."""
    unit = [F.normalize(g.float(), dim=1) for g in grads]
    pairs = [(a * b).sum(1) for a, b in itertools.combinations(unit, 2)]
    return torch.stack(pairs).mean(0)


class CosPrune(Criterion):
    name = "cosprune"
    requirement = "only shared backbone filters have two tasks' gradients to compare, and no group is in the backbone"
    needs = frozenset({TASK_WEIGHT_GRADS})
    stable_samples = 2048  # noisy per-batch cosines: rho 0.75-0.83 from 512 samples, 0.91-0.96 from 2,048

    def applies_to(self, group: ChannelGroup) -> bool:
        return group.part == "backbone"

    def batch_score(self, stats: GroupStats) -> Tensor | None:
        if not self.applies_to(stats.group) or len(stats.task_weight_grads) < 2:
            return None
        return mean_pairwise_cosine(list(stats.task_weight_grads.values()))
