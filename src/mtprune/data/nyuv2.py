"""NYUv2 loaders: the layout (MTAN/LibMTL ``.npy`` or AdaShare JSON) is detected from the root."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..utils.errors import MTPruneInputError
from .adashare import JSON_NAME, AdaShareNYUv2
from .base import MultiTaskDataset, require_root
from .io import require_dir
from .mtan import MTANDataset
from .transforms import JointTransform

NYUV2_TASKS = {"seg": ("label", "seg"), "depth": ("depth", "depth"), "normal": ("normal", "normal")}


def detect_layout(root: str | Path) -> str:
    """``"adashare"`` when ``root/nyu_v2_3task.json`` exists, ``"mtan"`` when ``root/{train,val}/image``
    exists; otherwise an error that says what was looked for."""
    root = require_dir(Path(root).expanduser(), "dataset root")
    if (root / JSON_NAME).is_file():
        return "adashare"
    if any((root / s / "image").is_dir() for s in ("train", "val")):
        return "mtan"
    raise MTPruneInputError(
        f"cannot tell the NYUv2 layout of {root}: expected {root / JSON_NAME} (AdaShare) "
        f"or {root / 'train' / 'image'} / {root / 'val' / 'image'} with N.npy files (MTAN/LibMTL)"
    )


def load_nyuv2(
    root: str | Path | None,
    split: str = "train",
    *,
    tasks: Sequence[str] | None = None,
    size: int | Sequence[int] | None = None,
    transform: JointTransform | None = None,
) -> MultiTaskDataset:
    """NYUv2 with seg/depth/normal: 13 classes in the MTAN layout, 40 in the AdaShare layout."""
    root = require_root(root, "nyuv2")
    if detect_layout(root) == "adashare":
        return AdaShareNYUv2(root, split, tasks=tasks, size=size, transform=transform)
    return MTANDataset(root, split, NYUV2_TASKS, tasks=tasks, num_classes={"seg": 13}, size=size, transform=transform)


def load_nyuv2_40(
    root: str | Path | None,
    split: str = "train",
    *,
    tasks: Sequence[str] | None = None,
    size: int | Sequence[int] | None = None,
    transform: JointTransform | None = None,
) -> MultiTaskDataset:
    """NYUv2 with 40 classes, AdaShare layout only."""
    root = require_root(root, "nyuv2_40")
    if detect_layout(root) != "adashare":
        raise MTPruneInputError(f"nyuv2_40 needs the AdaShare layout: missing file {Path(root) / JSON_NAME}")
    return AdaShareNYUv2(root, split, tasks=tasks, size=size, transform=transform)
