"""Object presence in ``synthetic_scenes``: a CelebA-like testbed for PAM's VGG-16, with no download.

PAM (He et al., KDD 2021; code: MrDavidG/PruneFramework, ``rdnet``) merges VGG-16 networks trained on CelebA's
40 binary attributes split into two tasks (attributes 0–19 and 20–39), with ±1 labels, tanh outputs and an MSE
loss. This builds the same kind of task from the procedural scenes of :mod:`.synthetic_scenes`. Their generator and
cache make the images (:func:`~.synthetic_scenes.load_synthetic_scenes`), and the labels are the generator's
``objects`` attribute: an object class is present when it covers at least ``ATTR_MIN_FRACTION`` (1 %) of the
image.

Object classes are the scene classes after wall and ground, numbered 0 .. K − 1 here (scene class k + 2), with
K = ``num_classes`` − 2. The tasks (``tasks=`` picks them) are multi-label with targets in {-1, +1}
(``signed_targets``):

- ``objects_a``: the presence of the first half of the classes, 0 .. K//2 − 1;
- ``objects_b``: the second half, K//2 .. K − 1;
- ``objects``: all K classes.

With the defaults (``num_classes=12``, so K = 10) ``objects_a`` covers object classes 0–4 (scene classes 2–6) and
``objects_b`` covers 5–9 (scene classes 7–11), as PAM's digit split of :mod:`.presence`. Train them with
:class:`mtprune.merging.tasks.PresenceTask` (tanh + MSE). ``mtprune merge`` picks it for datasets with
``signed_targets``.

Defaults: 3000 train and 1000 val scenes of 32×40 (the smallest input VGG-16's five pools take), each with 5 to
10 objects, every object class present in 34–44 % of the scenes (seed 0, train and val; 3.9 of the 10 per scene
on average). The generator's confusers are off by default: no colour, shape or texture borrowed from another class,
colour jitter 0.05, no small objects. With the generator's confusers and 3 to 8 objects (28–33 % presence), a
VGG-16 at 1/8 width stayed at the all-absent accuracy after 5–8 epochs, and a 3-conv CNN reached only 72 % after 8
(measured 2026-12-03). Without them, a class's presence follows from the image. Other ``SceneParams`` fields
pass through as keyword arguments. Scenes that another process already generated are read from the cache. The
pool is fixed: it is read into memory once, and ``fresh`` scenes are not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.errors import MTPruneInputError
from .base import MultiTaskDataset, select_tasks
from .synthetic_scenes import load_synthetic_scenes
from .transforms import JointTransform

SPLITS = ("train", "val")


def object_groups(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Task → the object classes (0 .. K − 1, K = ``num_classes`` − 2) whose presence it predicts."""
    k = num_classes - 2
    if k < 2:
        raise MTPruneInputError(f"scene_presence needs num_classes >= 4 (two object classes), got {num_classes}")
    return {"objects_a": tuple(range(k // 2)), "objects_b": tuple(range(k // 2, k)), "objects": tuple(range(k))}


class ScenePresence(MultiTaskDataset):
    """Synthetic scenes with ±1 presence labels of their object classes, split into tasks (module docstring)."""

    signed_targets = True  # targets are −1 (absent) / +1 (present): tanh + MSE, as in PAM's code

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        *,
        n_train: int = 3000,
        n_val: int = 1000,
        tasks: Sequence[str] = ("objects_a", "objects_b"),
        height: int = 32,
        width: int = 40,
        num_classes: int = 12,
        min_objects: int = 5,
        max_objects: int = 10,
        small_fraction: float = 0.0,
        color_swap: float = 0.0,
        shape_swap: float = 0.0,
        texture_swap: float = 0.0,
        color_jitter: float = 0.05,
        seed: int = 0,
        size: int | Sequence[int] | None = None,
        transform: JointTransform | None = None,
        **params: Any,
    ) -> None:
        if split not in SPLITS:
            raise MTPruneInputError(f"scene_presence: unknown split {split!r}; known: {', '.join(SPLITS)}")
        groups = object_groups(num_classes)
        names = select_tasks(groups, tasks, "scene_presence")
        super().__init__({t: "multilabel" for t in names}, num_classes={t: len(groups[t]) for t in names},
                         size=size, transform=transform)
        self.split = split
        self.groups = {t: groups[t] for t in names}
        scenes = load_synthetic_scenes(root, split, tasks=["objects"], fresh=False, n_train=n_train, n_val=n_val,
                                       height=height, width=width, num_classes=num_classes,
                                       min_objects=min_objects, max_objects=max_objects, small_fraction=small_fraction,
                                       color_swap=color_swap, shape_swap=shape_swap, texture_swap=texture_swap,
                                       color_jitter=color_jitter, seed=seed, **params)
        if scenes.scene_classes != num_classes:
            raise MTPruneInputError(f"scene_presence: the scenes at {scenes.root} have {scenes.scene_classes} classes, "
                                    f"not num_classes={num_classes}")
        self.root = scenes.root
        items = [scenes.load_item(i) for i in range(len(scenes))]
        self.images = torch.stack([image for image, _ in items])
        self.presence = torch.stack([targets["objects"] for _, targets in items])  # [N, K] in {0, 1}
        signed = self.presence * 2.0 - 1.0
        self.targets = {t: signed[:, list(self.groups[t])].contiguous() for t in names}

    def __len__(self) -> int:
        return len(self.images)

    def load_item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[index], {t: v[index] for t, v in self.targets.items()}
