"""Surface normals: 1 − cosine loss; angular error statistics in degrees over valid pixels.

The median is read from a histogram of 0.01° bins, so the state stays a sum that DDP can reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Meter, Task, match_size

BIN = 0.01  # degrees
NBINS = int(round(180 / BIN))
THRESHOLDS = (11.25, 22.5, 30.0)


def _cosine_and_valid(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    pred = F.normalize(match_size(pred, target), dim=1)
    valid = target.abs().sum(1) > 0
    return (pred * target).sum(1), valid


class AngleMeter(Meter):
    """State: [sum of angles, count, count within each threshold, histogram of angles]."""

    def __init__(self) -> None:
        super().__init__(2 + len(THRESHOLDS) + NBINS)

    def update(self, pred: Tensor, target: Tensor) -> None:
        cos, valid = _cosine_and_valid(pred.float(), target.float())
        angle = torch.rad2deg(torch.acos(cos[valid].clamp(-1.0, 1.0))).double()
        within = [(angle < t).sum() for t in THRESHOLDS]
        bins = (angle / BIN).long().clamp_(0, NBINS - 1)
        hist = torch.bincount(bins, minlength=NBINS).double()
        head = torch.stack([angle.sum(), torch.tensor(float(angle.numel()), dtype=torch.float64), *within])
        self._add(torch.cat([head.double(), hist]))

    def compute(self) -> dict[str, float]:
        n = float(self.stats[1])
        if n == 0:
            return {"mean": 0.0, "median": 0.0, **{f"within_{t:g}": 0.0 for t in THRESHOLDS}}
        hist = self.stats[2 + len(THRESHOLDS) :]
        median_bin = int(torch.searchsorted(hist.cumsum(0), torch.tensor(n / 2, dtype=torch.float64)))
        out = {"mean": float(self.stats[0]) / n, "median": (median_bin + 0.5) * BIN}
        for i, t in enumerate(THRESHOLDS):
            out[f"within_{t:g}"] = 100.0 * float(self.stats[2 + i]) / n
        return out


class NormalTask(Task):
    kind = "normal"
    metrics = {"mean": False, "median": False, "within_11.25": True, "within_22.5": True, "within_30": True}

    def __init__(self, name: str = "normal") -> None:
        super().__init__(name, 3)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        cos, valid = _cosine_and_valid(pred, target)
        if not valid.any():
            return pred.sum() * 0.0
        return 1.0 - cos[valid].mean()

    def new_meter(self) -> AngleMeter:
        return AngleMeter()
