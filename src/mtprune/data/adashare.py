"""The AdaShare / DiSparse NYUv2 layout (Sun et al., NeurIPS 2020): ``root/nyu_v2_3task.json``.

The JSON maps a split to a list of ``[img, seg, normal, depth]`` paths relative to the root, under
``img/``, ``seg/``, ``normal_mask/`` (PNG) and ``depth/`` (.npy). Split ``"val"`` reads the key ``"test"``.
Conversions: RGB uint8 → /255; seg 255 → −1; normal PNG x/127.5 − 1 with (255, 255, 255) → invalid (0);
depth float32 (H, W) → [1, H, W].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from ..utils.errors import MTPruneInputError
from .base import MultiTaskDataset, require_nonempty, select_tasks
from .conventions import check_same_size, dense_to_tensor, image_to_tensor
from .io import read_json, read_label_png, read_npy, read_rgb, require_dir
from .transforms import JointTransform

JSON_NAME = "nyu_v2_3task.json"
SPLIT_KEYS = {"val": "test"}
_TASKS = {"seg": "seg", "depth": "depth", "normal": "normal"}  # task → kind
_COLUMN = {"seg": 1, "normal": 2, "depth": 3}  # task → position in a JSON entry


def decode_seg(raw: np.ndarray, path: Path) -> Tensor:
    """uint8 labels with 255 = ignore → int64 with −1."""
    seg = dense_to_tensor(raw, "seg", path)
    seg[seg == 255] = -1
    return seg


def decode_normal(rgb: np.ndarray, path: Path) -> Tensor:
    """uint8 RGB encoding (n + 1)·127.5 → float32 [3, H, W]; the pixel (255, 255, 255) becomes 0."""
    normal = rgb.astype(np.float32) / 127.5 - 1.0
    normal[(rgb == 255).all(axis=2)] = 0.0
    return dense_to_tensor(normal, "normal", path)


class AdaShareNYUv2(MultiTaskDataset):
    """NYUv2 in the AdaShare JSON + PNG layout (40 classes, 480×640)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        tasks: Sequence[str] | None = None,
        num_classes: int = 40,
        size: int | Sequence[int] | None = None,
        transform: JointTransform | None = None,
    ) -> None:
        self.root = require_dir(Path(root).expanduser(), "dataset root")
        names = select_tasks(_TASKS, tasks, str(self.root))
        super().__init__(
            {n: _TASKS[n] for n in names},
            num_classes={"seg": num_classes} if "seg" in names else {},
            size=size,
            transform=transform,
        )
        self.split = split
        self.entries = self._read_entries(self.root / JSON_NAME, split)

    @staticmethod
    def _read_entries(path: Path, split: str) -> list[list[str]]:
        info = read_json(path)
        key = SPLIT_KEYS.get(split, split)
        if not isinstance(info, dict) or key not in info:
            keys = list(info) if isinstance(info, dict) else type(info).__name__
            raise MTPruneInputError(f"{path}: missing split {split!r} (JSON key {key!r}; found: {keys})")
        entries = info[key]
        bad = not isinstance(entries, list) or any(
            not isinstance(e, (list, tuple)) or len(e) != 4 or not all(isinstance(p, str) for p in e) for e in entries
        )
        if bad:
            raise MTPruneInputError(f"{path}: {key!r} must be a list of [img, seg, normal, depth] paths")
        require_nonempty(len(entries), f"{path} (split key {key!r})")
        return [list(e) for e in entries]

    def _path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def __len__(self) -> int:
        return len(self.entries)

    def load_item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        entry = self.entries[index]
        img_path = self._path(entry[0])
        image = image_to_tensor(np.asarray(read_rgb(img_path)), img_path)
        targets: dict[str, Tensor] = {}
        for task in self.kinds:
            path = self._path(entry[_COLUMN[task]])
            if task == "seg":
                targets[task] = decode_seg(read_label_png(path), path)
            elif task == "normal":
                targets[task] = decode_normal(np.asarray(read_rgb(path)), path)
            else:
                targets[task] = dense_to_tensor(read_npy(path), "depth", path)
        check_same_size(image, targets, self.kinds, f"{self.root / JSON_NAME} entry {index} ({img_path})")
        return image, {t: targets[t] for t in self.kinds}


__all__ = ["AdaShareNYUv2", "JSON_NAME", "decode_normal", "decode_seg"]
