"""Cityscapes in the MTAN / LibMTL ``.npy`` layout: seg (7 or 19 classes, −1 ignore) and inverse depth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .base import require_root
from .mtan import MTANDataset
from .transforms import JointTransform


def load_cityscapes(
    root: str | Path | None,
    split: str = "train",
    *,
    num_classes: int = 7,
    tasks: Sequence[str] | None = None,
    size: int | Sequence[int] | None = None,
    transform: JointTransform | None = None,
) -> MTANDataset:
    """``root/{train,val}/{image,label,depth}/{i}.npy``. Original MTAN folders ``label_7``/``label_19``
    are used when ``label`` is absent."""
    root = require_root(root, "cityscapes")
    label = "label"
    if not (root / split / "label").is_dir() and (root / split / f"label_{num_classes}").is_dir():
        label = f"label_{num_classes}"
    table = {"seg": (label, "seg"), "depth": ("depth", "depth")}
    return MTANDataset(
        root, split, table, tasks=tasks, num_classes={"seg": num_classes}, size=size, transform=transform
    )
