"""Per-task Taylor-FO: each task's (Σ a · ∂L_t/∂a)², normalised per task, then aggregated.

Each task's scores are divided by that task's mean over all candidate channels it touches, so that tasks
with large losses do not dominate. ``aggregate="max"`` keeps a filter that matters to any one task;
``"min"`` keeps only filters that matter to all; ``"mean"`` is in between.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import TASK_GATE_TAYLOR, GroupStats
from .base import Criterion

AGGREGATES = {"mean": lambda s: s.mean(0), "max": lambda s: s.max(0).values, "min": lambda s: s.min(0).values}


class TaskTaylor(Criterion):
    name = "task_taylor"
    needs = frozenset({TASK_GATE_TAYLOR})

    def __init__(self, seed: int = 0, aggregate: str = "max") -> None:
        super().__init__(seed)
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {sorted(AGGREGATES)}, got {aggregate!r}")
        self.aggregate = aggregate

    def batch_score(self, stats: GroupStats) -> dict[str, Tensor]:
        return {t: s.pow(2) for t, s in stats.task_gate_taylor.items()}

    def finalize(self, averaged: dict[int, dict[str, Tensor]]) -> dict[int, Tensor]:
        tasks = sorted({t for v in averaged.values() for t in v})
        scale = {}
        for t in tasks:
            touched = [v[t] for v in averaged.values() if v[t].abs().sum() > 0]
            scale[t] = torch.cat(touched).mean().clamp_min(1e-30) if touched else torch.tensor(1.0)
        out = {}
        for k, v in averaged.items():
            touching = [v[t] / scale[t] for t in tasks if v[t].abs().sum() > 0]
            if not touching:
                touching = [torch.zeros_like(next(iter(v.values())))]
            out[k] = AGGREGATES[self.aggregate](torch.stack(touching))
        return out
