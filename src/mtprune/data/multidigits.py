"""MultiMNIST-style pairs of digits built from scikit-learn's bundled ``load_digits`` (8×8, no download).

Two digits are drawn on a 14×14 canvas, one on the left and one on the right with random offsets, so that
they overlap by 2–6 columns (as in MultiMNIST, Sabour et al. 2017); the canvas is upsampled bilinearly to
``size`` (default 28×28, the LeNet-5 input) and repeated to 3 channels to keep the image contract.
Train and val draw from disjoint pools of source digits, fixed by ``seed``.

Tasks (``tasks=`` picks them): ``left`` and ``right`` (class, 10), ``parity`` (multilabel [left odd,
right odd]), ``sum_parity`` (class, 2: (left + right) mod 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.errors import MTPruneInputError
from .base import MultiTaskDataset, select_tasks
from .transforms import JointTransform, as_size

CANVAS = 14
DIGIT = 8
LEFT_X, RIGHT_X, MAX_Y = (0, 2), (4, 6), 6  # inclusive offset ranges on the canvas

# task → (kind, number of classes, labels(left, right) → target array)
DIGIT_TASKS: dict[str, tuple[str, int, Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "left": ("class", 10, lambda l, r: l),
    "right": ("class", 10, lambda l, r: r),
    "parity": ("multilabel", 2, lambda l, r: np.stack([l % 2, r % 2], axis=1).astype(np.float32)),
    "sum_parity": ("class", 2, lambda l, r: (l + r) % 2),
}
SPLITS = ("train", "val")


def _paste(canvas: np.ndarray, digits: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> None:
    """``canvas[n, dy:dy+8, dx:dx+8] = max(canvas, digit)`` for every n at once."""
    n = np.arange(len(canvas))[:, None, None]
    rows = dy[:, None, None] + np.arange(DIGIT)[None, :, None]
    cols = dx[:, None, None] + np.arange(DIGIT)[None, None, :]
    canvas[n, rows, cols] = np.maximum(canvas[n, rows, cols], digits)


def compose_pairs(
    images: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` composites of digits drawn from ``pool``: (canvases [n, 14, 14], left indices, right indices)."""
    left, right = rng.choice(pool, n), rng.choice(pool, n)
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.float32)
    _paste(canvas, images[left], rng.integers(0, MAX_Y + 1, n), rng.integers(LEFT_X[0], LEFT_X[1] + 1, n))
    _paste(canvas, images[right], rng.integers(0, MAX_Y + 1, n), rng.integers(RIGHT_X[0], RIGHT_X[1] + 1, n))
    return canvas, left, right


def digit_pool(split: str, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits scaled to [0, 1], their labels, and the indices of ``split``'s pool: a
    seeded split of the digits themselves, so no validation digit is ever drawn in training."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng([seed, 0]).permutation(len(images))
    n_val_pool = int(round(val_fraction * len(images)))
    return images, labels, (order[:n_val_pool] if split == "val" else order[n_val_pool:])


class DigitCanvases(MultiTaskDataset):
    """What the digit composites share: grey canvases resized to ``size`` and served as 3-channel images."""

    images: Tensor
    targets: dict[str, Tensor]

    @staticmethod
    def split_size(name: str, split: str, n_train: int, n_val: int, val_fraction: float) -> int:
        """The number of composites of ``split``, after checking the split arguments (errors name ``name``)."""
        if split not in SPLITS:
            raise MTPruneInputError(f"unknown {name} split {split!r}; known: {', '.join(SPLITS)}")
        n = n_train if split == "train" else n_val
        if n <= 0:
            raise MTPruneInputError(f"empty dataset: {name} {split} size is {n}")
        if not 0.0 < val_fraction < 1.0:
            raise MTPruneInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        return n

    def set_canvases(self, canvas: np.ndarray, size: int | Sequence[int]) -> None:
        h, w = as_size(size)
        x = torch.from_numpy(canvas)[:, None]
        self.images = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)

    def __len__(self) -> int:
        return len(self.images)

    def load_item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[index].repeat(3, 1, 1), {t: v[index].clone() for t, v in self.targets.items()}


class MultiDigits(DigitCanvases):
    """Left/right digit pairs; see the module docstring."""

    def __init__(
        self,
        split: str = "train",
        *,
        n_train: int = 6000,
        n_val: int = 1000,
        tasks: Sequence[str] = ("left", "right"),
        size: int | Sequence[int] = 28,
        seed: int = 0,
        val_fraction: float = 0.3,
        transform: JointTransform | None = None,
    ) -> None:
        n = self.split_size("multidigits", split, n_train, n_val, val_fraction)
        names = select_tasks(DIGIT_TASKS, tasks, "multidigits")
        super().__init__(
            {t: DIGIT_TASKS[t][0] for t in names},
            num_classes={t: DIGIT_TASKS[t][1] for t in names},
            transform=transform,
        )
        self.split = split
        images, labels, pool = digit_pool(split, seed, val_fraction)
        rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
        canvas, self.left_index, self.right_index = compose_pairs(images, pool, n, rng)
        self.left, self.right = labels[self.left_index], labels[self.right_index]
        self.set_canvases(canvas, size)
        self.targets = {t: torch.from_numpy(np.asarray(DIGIT_TASKS[t][2](self.left, self.right))) for t in names}
