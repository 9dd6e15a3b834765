"""Depth regression: L1 over valid pixels (depth 0 is invalid); absolute and relative error."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Meter, Task, match_size


class DepthMeter(Meter):
    """Sums of |p − g| and |p − g| / g over the valid pixels of the whole split."""

    def __init__(self) -> None:
        super().__init__(3)

    def update(self, pred: Tensor, target: Tensor) -> None:
        pred = match_size(pred, target)
        valid = target > 0
        err = (pred - target).abs()[valid]
        self._add(torch.stack([err.sum(), (err / target[valid]).sum(), valid.sum().to(err.dtype)]))

    def compute(self) -> dict[str, float]:
        abs_sum, rel_sum, n = self.stats.tolist()
        n = max(n, 1.0)
        return {"abs_err": abs_sum / n, "rel_err": rel_sum / n}


class DepthTask(Task):
    kind = "depth"
    metrics = {"abs_err": False, "rel_err": False}

    def __init__(self, name: str = "depth") -> None:
        super().__init__(name, 1)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = match_size(pred, target)
        valid = target > 0
        if not valid.any():
            return pred.sum() * 0.0
        return (pred - target).abs()[valid].mean()

    def new_meter(self) -> DepthMeter:
        return DepthMeter()
