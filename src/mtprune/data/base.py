"""``MultiTaskDataset``: the base of every mtprune dataset (see ``docs/internals.md``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from ..utils.errors import MTPruneInputError
from .conventions import check_kinds
from .transforms import JointTransform, Resize, Sample


class MultiTaskDataset(Dataset, ABC):
    """Item ``i`` is ``(image float32 [3, H, W] in [0, 1], {task: target})``.

    ``kinds`` maps each task to its kind; ``num_classes`` gives the class (or attribute) count of the
    seg / class / multilabel tasks. An optional ``size`` resizes every sample (bilinear image, nearest
    targets), then the optional joint ``transform(image, targets, kinds)`` runs.
    """

    def __init__(
        self,
        kinds: Mapping[str, str],
        *,
        num_classes: Mapping[str, int] | None = None,
        size: int | Sequence[int] | None = None,
        transform: JointTransform | None = None,
    ) -> None:
        self.kinds: dict[str, str] = check_kinds(dict(kinds))
        self.num_classes: dict[str, int] = dict(num_classes or {})
        self.resize = Resize(size) if size is not None else None
        self.transform = transform

    @property
    def tasks(self) -> list[str]:
        return list(self.kinds)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load_item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The raw sample at ``index`` in contract form, before resize and transform."""

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        image, targets = self.load_item(index)
        if self.resize is not None:
            image, targets = self.resize(image, targets, self.kinds)
        if self.transform is not None:
            image, targets = self.transform(image, targets, self.kinds)
        return image, targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, kinds={self.kinds})"


def select_tasks(available: Mapping[str, object], tasks: Sequence[str] | None, where: str) -> list[str]:
    """The requested task names (all when ``None``), checked against ``available``."""
    if tasks is None:
        return list(available)
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in available]
    if unknown or not tasks:
        raise MTPruneInputError(
            f"{where}: unknown or empty task selection {list(tasks)}; available: {', '.join(available)}"
        )
    return list(dict.fromkeys(tasks))


def require_nonempty(n: int, where: str) -> None:
    if n == 0:
        raise MTPruneInputError(f"empty dataset: no samples found in {where}")


def require_root(root: str | Path | None, name: str) -> Path:
    """The root of a dataset that is read from disk; ``None`` is an input error."""
    if root is None:
        raise MTPruneInputError(f"dataset {name!r} is read from disk: pass root=PATH (see DATA.md)")
    return Path(root).expanduser()
