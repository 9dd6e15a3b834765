"""Structured DiSparse (ours, after Sun et al., CVPR 2022): per-task SNIP scores per filter, per-task top-k,
union over tasks on shared layers.

S_t(i) = Σ |∂L_t/∂W_i ⊙ W_i| over filter i's weights. A task only ranks the filters it reaches (the backbone
and its own head). Keeping the per-task top-k and taking the union over tasks is the same as keeping the
filters whose best per-task percentile rank is highest, so the finalized score is max_t percentile_t(i):
ranking by it under any budget reproduces the union rule, and the budget search finds k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import TASK_WEIGHT_GRADS, GroupStats
from .base import Criterion


class DiSparseStructured(Criterion):
    name = "disparse_structured"
    needs = frozenset({TASK_WEIGHT_GRADS})

    def batch_score(self, stats: GroupStats) -> dict[str, Tensor]:
        w = stats.weight
        return {t: (g * w).abs().sum(1) for t, g in stats.task_weight_grads.items()}

    def finalize(self, averaged: dict[int, dict[str, Tensor]]) -> dict[int, Tensor]:
        keys = sorted(averaged)
        tasks = sorted({t for v in averaged.values() for t in v})
        best = {k: torch.zeros_like(next(iter(averaged[k].values()))) for k in keys}
        for t in tasks:
            reached = [k for k in keys if averaged[k][t].sum() > 0]
            if not reached:
                continue
            flat = torch.cat([averaged[k][t] for k in reached])
            ranks = torch.empty_like(flat)
            ranks[flat.argsort()] = torch.arange(1, len(flat) + 1, dtype=flat.dtype) / len(flat)
            for k, part in zip(reached, ranks.split([averaged[k][t].numel() for k in reached]), strict=True):
                best[k] = torch.maximum(best[k], part)
        return best
