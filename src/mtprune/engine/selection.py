"""Model selection on the validation split.

The score of an epoch is Δm (percent; Maninis et al., CVPR 2019) of its validation metrics against a
reference: ``TrainConfig.reference`` when given, else the first epoch's validation metrics (so epoch 1 scores
0). Where Δm is undefined because a reference metric is 0, the score is minus the summed validation loss
instead (fixed for the whole run, since the reference is). Higher is better; ties keep the earlier epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..tasks.base import Task
from ..tasks.delta_m import delta_m
from ..utils.errors import MTPruneInputError
from .evaluate import Metrics


@dataclass
class RunState:
    """What model selection remembers across epochs (stored in every checkpoint)."""

    epoch: int = 0
    best_epoch: int = 0
    best_score: float = -math.inf
    best_metrics: Metrics = field(default_factory=dict)
    last_metrics: Metrics = field(default_factory=dict)
    reference: Metrics | None = None

    def update(self, epoch: int, val: Metrics, tasks: Mapping[str, Task]) -> tuple[float, bool]:
        """Record epoch ``epoch``'s validation metrics; return its score and whether it is the new best."""
        self.epoch, self.last_metrics = epoch, val
        if self.reference is None:
            self.reference = {t: {m: val[t][m] for m in tasks[t].metrics} for t in tasks}
        score = selection_score(val, self.reference, tasks)
        improved = score > self.best_score  # False for NaN
        if improved:
            self.best_epoch, self.best_score, self.best_metrics = epoch, score, val
        return score, improved


def selection_score(val: Metrics, reference: Metrics, tasks: Mapping[str, Task]) -> float:
    """Δm of ``val`` against ``reference``; minus the summed validation loss where Δm is undefined."""
    if any(reference.get(t, {}).get(m) == 0 for t in tasks for m in tasks[t].metrics):
        return -sum(val[t]["loss"] for t in tasks)
    return delta_m(val, reference, tasks)


def check_reference(reference: Metrics, tasks: Mapping[str, Task]) -> None:
    """Refuse a user-given reference that lacks any task metric (before any training is spent)."""
    missing = [f"{t}/{m}" for t in tasks for m in tasks[t].metrics if m not in reference.get(t, {})]
    if missing:
        raise MTPruneInputError(f"the model-selection reference lacks the metrics {missing}")
