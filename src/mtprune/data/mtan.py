"""The MTAN / LibMTL ``.npy`` layout (Liu et al., CVPR 2019): ``root/{split}/{image,<task>...}/{i}.npy``.

One reader, parameterised by a task table ``{task: (folder, kind)}``, serves NYUv2, Cityscapes and the
synthetic scenes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from ..utils.errors import MTPruneInputError
from .base import MultiTaskDataset, require_nonempty, select_tasks
from .conventions import check_same_size, dense_to_tensor, image_to_tensor
from .io import read_npy, require_dir
from .transforms import JointTransform

_ITEM = re.compile(r"^(\d+)\.npy$")


def split_dir(root: str | Path, split: str) -> Path:
    """``root/split``, with errors that name what is missing."""
    root = require_dir(Path(root).expanduser(), "dataset root")
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise MTPruneInputError(f"missing split {split!r}: {folder} is not a folder (found: {found})")
    return folder


def count_items(folder: Path) -> int:
    """Number of ``{i}.npy`` files; the indices must run 0..N−1 without gaps."""
    ids = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ITEM.match(p.name)))
    require_nonempty(len(ids), f"{folder} (expected files 0.npy, 1.npy, ...)")
    if ids[-1] != len(ids) - 1:
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))[0]
        raise MTPruneInputError(f"missing file: {folder / f'{missing}.npy'} (indices must run 0..N-1)")
    return len(ids)


class MTANDataset(MultiTaskDataset):
    """``root/{split}/image/{i}.npy`` (float HWC in [0, 1]) plus one folder per task.

    ``task_table`` maps task name → ``(folder, kind)``; ``tasks`` picks a subset (default: all).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        task_table: Mapping[str, tuple[str, str]],
        *,
        tasks: Sequence[str] | None = None,
        num_classes: Mapping[str, int] | None = None,
        size: int | Sequence[int] | None = None,
        transform: JointTransform | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        folder = split_dir(self.root, split)
        names = select_tasks(task_table, tasks, str(self.root))
        kinds = {n: task_table[n][1] for n in names}
        super().__init__(
            kinds,
            num_classes={n: c for n, c in (num_classes or {}).items() if n in kinds},
            size=size,
            transform=transform,
        )
        self.image_dir = require_dir(folder / "image", "image folder")
        self.task_dirs = {n: require_dir(folder / task_table[n][0], f"{n} folder") for n in names}
        self._len = count_items(self.image_dir)

    def __len__(self) -> int:
        return self._len

    def load_item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        name = f"{index}.npy"
        image = image_to_tensor(read_npy(self.image_dir / name), self.image_dir / name)
        targets = {t: dense_to_tensor(read_npy(d / name), self.kinds[t], d / name) for t, d in self.task_dirs.items()}
        check_same_size(image, targets, self.kinds, f"{self.root / self.split} item {index}")
        return image, targets
