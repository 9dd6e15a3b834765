"""The sample contract of ``docs/internals.md``: task kinds, their invalid values, array → tensor conversions.

Every reader turns raw arrays into contract tensors through these functions, so the value conventions
(NYUv2 MTAN layout, Liu et al., CVPR 2019) live in one place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..utils.errors import MTPruneInputError

KINDS = ("seg", "depth", "normal", "edge", "class", "multilabel")
DENSE_KINDS = frozenset({"seg", "depth", "normal", "edge"})
# The value that marks a pixel invalid (also used to pad dense targets).
FILL: dict[str, float] = {"seg": -1, "depth": 0.0, "normal": 0.0, "edge": -1.0}
_CHANNELS = {"depth": 1, "normal": 3, "edge": 1}


def check_kinds(kinds: dict[str, str]) -> dict[str, str]:
    """Return ``kinds`` after checking that every value is a known kind."""
    bad = {t: k for t, k in kinds.items() if k not in KINDS}
    if bad:
        raise MTPruneInputError(f"unknown task kind(s) {bad}; known kinds: {', '.join(KINDS)}")
    return dict(kinds)


def image_to_tensor(arr: np.ndarray, path: str | Path) -> Tensor:
    """HWC image (uint8 0..255, or float in [0, 1]; grey allowed) → float32 ``[3, H, W]`` in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise MTPruneInputError(f"{path}: expected an image of shape (H, W, 3), got shape {arr.shape}")
    if np.iscomplexobj(arr):
        raise MTPruneInputError(f"{path}: image has complex dtype {arr.dtype}; expected real numbers")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.number):
        out = arr.astype(np.float32, copy=False)
    else:
        raise MTPruneInputError(f"{path}: image has non-numeric dtype {arr.dtype}")
    if not np.isfinite(out).all():
        raise MTPruneInputError(f"{path}: the image contains NaN or Inf values")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def dense_to_tensor(arr: np.ndarray, kind: str, path: str | Path) -> Tensor:
    """A dense target array in HW or HWC layout → the contract tensor of ``kind``.

    seg: int64 ``[H, W]`` (−1 kept); depth/edge: float32 ``[1, H, W]``; normal: float32 ``[3, H, W]``.
    Non-finite depth or normal values become the invalid value 0; in edges and label maps they are refused.
    """
    if (not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_) or np.iscomplexobj(arr):
        raise MTPruneInputError(f"{path}: {kind} target has non-real dtype {arr.dtype}")
    if kind == "seg":
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2:
            raise MTPruneInputError(f"{path}: expected a label map of shape (H, W), got shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise MTPruneInputError(f"{path}: a label map must hold integer class indices (-1: ignore), "
                                    "found NaN, Inf or fractional values")
        return torch.from_numpy(arr.astype(np.int64))
    channels = _CHANNELS[kind]
    if arr.ndim == 2 and channels == 1:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] != channels:
        raise MTPruneInputError(f"{path}: expected a {kind} array of shape (H, W, {channels}), got shape {arr.shape}")
    out = arr.astype(np.float32)
    if kind in ("depth", "normal"):
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    elif not np.isfinite(out).all():
        raise MTPruneInputError(f"{path}: the {kind} target contains NaN or Inf values (-1 marks invalid pixels)")
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def check_same_size(image: Tensor, targets: dict[str, Tensor], kinds: dict[str, str], where: str) -> None:
    """Every dense target must have the image's height and width."""
    size = tuple(image.shape[-2:])
    for name, t in targets.items():
        if kinds[name] in DENSE_KINDS and tuple(t.shape[-2:]) != size:
            raise MTPruneInputError(f"{where}: {name} target is {tuple(t.shape[-2:])} but the image is {size} (H, W)")
