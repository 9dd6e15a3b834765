"""Digit-presence composites from scikit-learn's bundled ``load_digits`` (8×8, no download): PAM's LeNet testbed.

PAM's authors (He et al., KDD 2021; code: MrDavidG/PruneFramework, ``rdnet``) merge LeNet-5 networks trained on
composites of several Fashion-MNIST items with 10 presence labels (±1), task A = labels 0–4 and task B = 5–9,
tanh outputs and a mean-squared-error loss. This is the same construction with the bundled digits: a 16×16
canvas of four 8×8 slots (2×2), ``digits`` of them filled with digits drawn at random (repeats allowed), every
digit shifted by up to ``jitter`` pixels inside its slot; upsampled bilinearly to ``size`` (default 28, the
LeNet-5 input) and repeated to 3 channels. Train and val draw from disjoint pools of source digits (``seed``).

Tasks (``tasks=`` picks them), each multi-label with targets in {-1, +1} (``signed_targets``):
``low`` = presence of digits 0–4, ``high`` = presence of digits 5–9, ``all`` = presence of 0–9.
Train them with :class:`mtprune.merging.tasks.PresenceTask` (tanh + MSE), which ``mtprune merge`` picks for
datasets with ``signed_targets``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..utils.errors import MTPruneInputError
from .base import select_tasks
from .multidigits import SPLITS, DigitCanvases, digit_pool
from .transforms import JointTransform

SLOTS = 2  # slots per side: 2×2 of them
DIGIT = 8
# task → the digits whose presence it predicts
PRESENCE_TASKS: dict[str, tuple[int, ...]] = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9),
                                              "all": tuple(range(10))}


def compose_presence(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int, digits: int, jitter: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases ``[n, H, W]`` (H = W = 2·(8 + jitter)) and their presence matrix ``[n, 10]`` in {0, 1}."""
    cell = DIGIT + jitter
    canvas = np.zeros((n, SLOTS * cell, SLOTS * cell), dtype=np.float32)
    present = np.zeros((n, 10), dtype=np.float32)
    chosen = rng.choice(pool, (n, digits))
    slots = np.argsort(rng.random((n, SLOTS * SLOTS)), axis=1)[:, :digits]
    shift = rng.integers(0, jitter + 1, (n, digits, 2))
    rows = np.arange(n)
    for k in range(digits):
        y0 = (slots[:, k] // SLOTS) * cell + shift[:, k, 0]
        x0 = (slots[:, k] % SLOTS) * cell + shift[:, k, 1]
        ys = y0[:, None, None] + np.arange(DIGIT)[None, :, None]
        xs = x0[:, None, None] + np.arange(DIGIT)[None, None, :]
        canvas[rows[:, None, None], ys, xs] = images[chosen[:, k]]
        present[rows, labels[chosen[:, k]]] = 1.0
    return canvas, present


class DigitPresence(DigitCanvases):
    """Several digits per canvas, ±1 presence labels split into tasks; see the module docstring."""

    signed_targets = True  # targets are −1 (absent) / +1 (present): tanh + MSE, as in PAM's code

    def __init__(
        self,
        split: str = "train",
        *,
        n_train: int = 6000,
        n_val: int = 1000,
        tasks: Sequence[str] = ("low", "high"),
        digits: int = 3,
        jitter: int = 2,
        size: int | Sequence[int] = 28,
        seed: int = 0,
        val_fraction: float = 0.3,
        transform: JointTransform | None = None,
    ) -> None:
        n = self.split_size("presence", split, n_train, n_val, val_fraction)
        if not 1 <= digits <= SLOTS * SLOTS:
            raise MTPruneInputError(f"digits must be in 1..{SLOTS * SLOTS} (one per slot), got {digits}")
        if not 0 <= jitter <= DIGIT:
            raise MTPruneInputError(f"jitter must be in 0..{DIGIT} pixels, got {jitter}")
        names = select_tasks(PRESENCE_TASKS, tasks, "presence")
        super().__init__({t: "multilabel" for t in names},
                         num_classes={t: len(PRESENCE_TASKS[t]) for t in names}, transform=transform)
        self.split = split
        images, labels, pool = digit_pool(split, seed, val_fraction)
        rng = np.random.default_rng([seed, 11 + SPLITS.index(split)])
        canvas, present = compose_presence(images, labels, pool, n, digits, jitter, rng)
        self.presence = torch.from_numpy(present)
        self.set_canvases(canvas, size)
        signed = self.presence * 2.0 - 1.0
        self.targets = {t: signed[:, list(PRESENCE_TASKS[t])].contiguous() for t in names}
