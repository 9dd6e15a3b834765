"""Semantic segmentation: cross-entropy; mIoU and pixel accuracy from one confusion matrix per split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Meter, Task, match_size

IGNORE = -1


class ConfusionMeter(Meter):
    """Confusion matrix over pixels with ``0 <= gt < C`` (ignore pixels are skipped)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes * num_classes)
        self.num_classes = num_classes

    def update(self, pred: Tensor, target: Tensor) -> None:
        labels = match_size(pred, target).argmax(1)
        target = target.long()
        valid = (target >= 0) & (target < self.num_classes)
        idx = target[valid] * self.num_classes + labels[valid]
        self._add(torch.bincount(idx, minlength=self.num_classes**2).to(torch.float64))

    def compute(self) -> dict[str, float]:
        cm = self.stats.view(self.num_classes, self.num_classes)  # rows: gt, columns: prediction
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        total = cm.sum()
        miou = (tp[present] / union[present]).mean().item() if present.any() else 0.0
        acc = (tp.sum() / total).item() if total > 0 else 0.0
        return {"miou": 100.0 * miou, "pixel_acc": 100.0 * acc}


class SegmentationTask(Task):
    kind = "seg"
    metrics = {"miou": True, "pixel_acc": True}

    def __init__(self, name: str = "seg", num_classes: int = 13) -> None:
        super().__init__(name, num_classes)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        target = self.check_labels(target)
        return F.cross_entropy(match_size(pred, target), target, ignore_index=IGNORE)

    def new_meter(self) -> ConfusionMeter:
        return ConfusionMeter(self.out_channels)
