"""Image-level tasks: single-label classification (cross-entropy) and multi-label attributes (BCE).

Accuracy is in percent; for attributes it is the mean accuracy over attributes (CelebA convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Meter, Task


class AccuracyMeter(Meter):
    """Correct and total counts over the split."""

    def __init__(self) -> None:
        super().__init__(2)

    def update(self, pred: Tensor, target: Tensor) -> None:
        if target.dtype.is_floating_point:  # multi-label logits
            correct = ((pred > 0) == (target > 0.5)).sum()
            total = target.numel()
        else:
            valid = target >= 0
            correct = (pred.argmax(1)[valid] == target[valid]).sum()
            total = int(valid.sum())
        self._add(torch.stack([correct.double(), torch.tensor(float(total), dtype=torch.float64)]))

    def compute(self) -> dict[str, float]:
        correct, total = self.stats.tolist()
        return {"acc": 100.0 * correct / total if total else 0.0}


class ClassificationTask(Task):
    kind = "class"
    metrics = {"acc": True}

    def __init__(self, name: str = "class", num_classes: int = 10) -> None:
        super().__init__(name, num_classes)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        target = self.check_labels(target)
        return F.cross_entropy(pred, target, ignore_index=-1)

    def new_meter(self) -> AccuracyMeter:
        return AccuracyMeter()


class MultiLabelTask(Task):
    kind = "multilabel"
    metrics = {"acc": True}

    def __init__(self, name: str = "attributes", num_labels: int = 40) -> None:
        super().__init__(name, num_labels)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(pred, target.float())

    def new_meter(self) -> AccuracyMeter:
        return AccuracyMeter()
