"""CelebA in the torchvision folder layout: ``img_align_celeba/``, ``list_attr_celeba.txt``,
``list_eval_partition.txt``.

Tasks are groups of the 40 binary attributes, each a ``multilabel`` target in {0, 1}. The default is the
split of PAM (attributes 0–19 vs 20–39). Images are centre-cropped to the target aspect and resized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..utils.errors import MTPruneInputError
from .base import MultiTaskDataset, require_nonempty, select_tasks
from .conventions import image_to_tensor
from .io import read_lines, read_rgb, require_dir
from .transforms import JointTransform, as_size

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
NUM_ATTRS = 40
PAM_GROUPS: dict[str, tuple[int, ...]] = {"attr_a": tuple(range(20)), "attr_b": tuple(range(20, 40))}
SPLITS = {"train": 0, "val": 1, "valid": 1, "test": 2}


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Attribute names and ``{filename: int8 array of ±1}``."""
    lines = read_lines(path)
    if len(lines) < 2:
        raise MTPruneInputError(f"{path}: expected a count line and a line of {NUM_ATTRS} attribute names")
    names = lines[1].split()
    if len(names) != NUM_ATTRS:
        raise MTPruneInputError(f"{path} line 2: expected {NUM_ATTRS} attribute names, got {len(names)}")
    table: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        try:
            values = np.array([int(v) for v in fields[1:]], dtype=np.int8)
        except ValueError as e:
            raise MTPruneInputError(f"{path} line {lineno}: {e}") from e
        if len(values) != NUM_ATTRS or not np.isin(values, (-1, 1)).all():
            raise MTPruneInputError(f"{path} line {lineno}: expected a filename and {NUM_ATTRS} values of ±1")
        table[fields[0]] = values
    return names, table


def read_partition(path: Path, split: str) -> list[str]:
    """Filenames of ``split`` (train 0, val/valid 1, test 2)."""
    if split not in SPLITS:
        raise MTPruneInputError(f"unknown CelebA split {split!r}; known: {', '.join(SPLITS)}")
    files = []
    for lineno, line in enumerate(read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise MTPruneInputError(f"{path} line {lineno}: expected 'filename 0|1|2', got {line!r}")
        if int(fields[1]) == SPLITS[split]:
            files.append(fields[0])
    return files


def resolve_groups(groups: Mapping[str, Sequence[int | str]], names: list[str]) -> dict[str, list[int]]:
    """Group → attribute indices; attributes may be given by index or by name."""
    out: dict[str, list[int]] = {}
    for task, members in groups.items():
        idx = []
        for m in members:
            if isinstance(m, str):
                if m not in names:
                    raise MTPruneInputError(f"CelebA group {task!r}: unknown attribute {m!r}")
                m = names.index(m)
            if not 0 <= int(m) < NUM_ATTRS:
                raise MTPruneInputError(f"CelebA group {task!r}: attribute index {m} not in 0..{NUM_ATTRS - 1}")
            idx.append(int(m))
        if not idx:
            raise MTPruneInputError(f"CelebA group {task!r} is empty")
        out[task] = idx
    if not out:
        raise MTPruneInputError("CelebA: groups must name at least one task")
    return out


class CelebA(MultiTaskDataset):
    """CelebA attribute groups as multi-label tasks; images resized to ``size`` (default 64×64).

    ``groups`` maps task → attribute indices or names (default ``PAM_GROUPS``); ``tasks`` picks a subset.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        groups: Mapping[str, Sequence[int | str]] | None = None,
        tasks: Sequence[str] | None = None,
        size: int | Sequence[int] = 64,
        transform: JointTransform | None = None,
    ) -> None:
        root = require_dir(Path(root).expanduser(), "dataset root")
        if not (root / ATTR_FILE).exists() and (root / "celeba" / ATTR_FILE).exists():
            root = root / "celeba"  # torchvision's CelebA(root) keeps its files under root/celeba
        self.root = root
        self.split = split
        self.out_size = as_size(size)
        self.attr_names, table = read_attributes(root / ATTR_FILE)
        self.files = read_partition(root / PARTITION_FILE, split)
        require_nonempty(len(self.files), f"{root / PARTITION_FILE} (split {split!r})")
        missing = [f for f in self.files if f not in table]
        if missing:
            raise MTPruneInputError(f"{root / ATTR_FILE}: no attributes for {missing[0]} ({len(missing)} missing)")
        self.image_dir = require_dir(root / IMAGE_DIR, "image folder")
        groups = resolve_groups(PAM_GROUPS if groups is None else groups, self.attr_names)
        self.groups = {g: groups[g] for g in select_tasks(groups, tasks, str(root))}
        self.attrs = torch.from_numpy((np.stack([table[f] for f in self.files]) > 0).astype(np.float32))
        super().__init__(
            {g: "multilabel" for g in self.groups},
            num_classes={g: len(i) for g, i in self.groups.items()},
            transform=transform,
        )

    def __len__(self) -> int:
        return len(self.files)

    def load_item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        path = self.image_dir / self.files[index]
        im = read_rgb(path)
        h, w = self.out_size
        image = im.resize((w, h), Image.BILINEAR, box=_centre_box(im.width, im.height, w / h))
        row = self.attrs[index]
        return image_to_tensor(np.asarray(image), path), {g: row[i] for g, i in self.groups.items()}


def _centre_box(width: int, height: int, aspect: float) -> tuple[float, float, float, float]:
    """The largest centred box of the given width/height ratio."""
    if width / height > aspect:
        cw = height * aspect
        return ((width - cw) / 2, 0.0, (width + cw) / 2, float(height))
    ch = width / aspect
    return (0.0, (height - ch) / 2, float(width), (height + ch) / 2)
