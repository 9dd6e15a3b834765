"""Edge detection: weighted binary cross-entropy (edges are sparse); F1 at a fixed 0.5 threshold.

The class-balancing weight follows the common practice in multi-task dense prediction
(Vandenhende et al., MTI-Net, ECCV 2020): positives weighted by ``pos_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Meter, Task, match_size


class EdgeMeter(Meter):
    """Counts of true positives, predicted positives and actual positives over valid pixels."""

    def __init__(self) -> None:
        super().__init__(3)

    def update(self, pred: Tensor, target: Tensor) -> None:
        pred = match_size(pred, target)
        valid = target >= 0
        hit = (pred > 0)[valid]
        gt = (target > 0.5)[valid]
        self._add(torch.stack([(hit & gt).sum(), hit.sum(), gt.sum()]).double())

    def compute(self) -> dict[str, float]:
        tp, pp, ap = self.stats.tolist()
        precision = tp / pp if pp else 0.0
        recall = tp / ap if ap else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": 100.0 * f1}


class EdgeTask(Task):
    kind = "edge"
    metrics = {"f1": True}

    def __init__(self, name: str = "edge", pos_weight: float = 4.0) -> None:
        super().__init__(name, 1)
        self.pos_weight = pos_weight

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = match_size(pred, target)
        valid = target >= 0
        weight = torch.where(target > 0.5, self.pos_weight, 1.0)
        loss = F.binary_cross_entropy_with_logits(pred, target.clamp(min=0), weight=weight, reduction="none")
        return loss[valid].mean() if valid.any() else pred.sum() * 0.0

    def new_meter(self) -> EdgeMeter:
        return EdgeMeter()
