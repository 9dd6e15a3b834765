"""The ``Task`` contract: a name, a loss, and metrics that accumulate over a whole split.

Metric definitions follow LibMTL / MTAN (Liu et al., CVPR 2019), see DATA.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.errors import MTPruneInputError


def match_size(pred: Tensor, target: Tensor) -> Tensor:
    """Upsample a dense prediction ``[N, C, h, w]`` bilinearly to the target's spatial size."""
    size = tuple(target.shape[-2:])
    if pred.dim() == 4 and tuple(pred.shape[-2:]) != size:
        return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
    return pred


_LABEL_KINDS = ("seg", "class")  # targets are class indices: one dimension fewer than the prediction
_MATCHED_KINDS = ("depth", "normal", "edge", "multilabel")  # targets have the prediction's batch and channels
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


class Meter(ABC):
    """Accumulates sufficient statistics over a split in one float64 vector.

    Because the state is a plain sum, distributed evaluation reduces it with one ``all_reduce(SUM)``.
    """

    def __init__(self, size: int) -> None:
        self.stats = torch.zeros(size, dtype=torch.float64)

    @abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...

    def state(self) -> Tensor:
        return self.stats

    def load_state(self, stats: Tensor) -> None:
        if stats.shape != self.stats.shape:
            raise ValueError(f"meter state has shape {tuple(stats.shape)}, expected {tuple(self.stats.shape)}")
        self.stats = stats.detach().to(dtype=torch.float64, device="cpu").clone()

    def _add(self, values: Tensor) -> None:
        self.stats += values.detach().to(dtype=torch.float64, device="cpu")


class Task(ABC):
    """One task: ``loss(pred, target)`` and ``new_meter()``; ``metrics`` maps metric → higher is better."""

    kind: str = ""
    metrics: dict[str, bool] = {}

    def __init__(self, name: str, out_channels: int) -> None:
        self.name = name
        self.out_channels = int(out_channels)

    @abstractmethod
    def loss(self, pred: Tensor, target: Tensor) -> Tensor: ...

    @abstractmethod
    def new_meter(self) -> Meter: ...

    def check_prediction(self, pred: Tensor) -> None:
        """Refuse a prediction whose channel count does not match the task."""
        if not isinstance(pred, Tensor):
            raise MTPruneInputError(f"task {self.name!r}: the model output is {type(pred).__name__}, not a Tensor")
        if pred.dim() < 2 or pred.shape[1] != self.out_channels:
            raise MTPruneInputError(
                f"task {self.name!r}: expected {self.out_channels} output channels, got shape {tuple(pred.shape)}"
            )

    def check_target(self, pred: Tensor, target: Tensor) -> None:
        """Refuse a target that does not fit this task's prediction (docs/internals.md, the sample contract).

        Every target must be finite (invalid pixels are marked with the data's fill value, not NaN). Class labels
        (``seg``: ``[N, H, W]``, ``class``: ``[N]``) are integers; the other built-in kinds have the prediction's
        batch and channel sizes (``[N, C, H, W]`` or ``[N, C]``; dense targets may have another resolution).
        """
        where = f"task {self.name!r}"
        if not isinstance(target, Tensor):
            raise MTPruneInputError(f"{where}: the target is a {type(target).__name__}, not a Tensor")
        if target.is_complex() or not (target.is_floating_point() or target.dtype in _INTEGER_DTYPES):
            raise MTPruneInputError(f"{where}: the target has dtype {target.dtype}; expected real numbers")
        if target.is_floating_point() and not bool(torch.isfinite(target).all()):
            raise MTPruneInputError(f"{where}: the target contains NaN or Inf values (mark invalid pixels "
                                    "with the data's fill value instead)")
        if self.kind in _LABEL_KINDS:
            want = pred.dim() - 1
            if target.dim() != want or target.shape[:1] != pred.shape[:1]:
                layout = "[N, H, W]" if self.kind == "seg" else "[N]"
                raise MTPruneInputError(f"{where}: class labels of shape {tuple(target.shape)} do not fit the "
                                        f"prediction of shape {tuple(pred.shape)}; expected {layout} labels")
            if target.is_floating_point() and bool((target != target.round()).any()):
                raise MTPruneInputError(f"{where}: class labels must be integers, got fractional values")
        elif self.kind in _MATCHED_KINDS and (target.dim() != pred.dim() or target.shape[:2] != pred.shape[:2]):
            raise MTPruneInputError(f"{where}: a target of shape {tuple(target.shape)} does not fit the prediction "
                                    f"of shape {tuple(pred.shape)} (batch and channel sizes must match)")

    def check_labels(self, target: Tensor) -> Tensor:
        """Class labels as int64; a label at or above the class count is refused (−1 means ignore)."""
        target = target.long()
        if target.numel() and int(target.min()) < -1:
            raise MTPruneInputError(f"task {self.name!r}: label {int(target.min())} is negative (only -1, "
                                    "meaning ignore, is allowed)")
        if target.numel() and int(target.max()) >= self.out_channels:
            raise MTPruneInputError(
                f"task {self.name!r}: label {int(target.max())} is out of range for {self.out_channels} classes"
            )
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, out_channels={self.out_channels})"
