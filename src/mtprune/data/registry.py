"""The dataset registry: name → loader ``(root, split, **kw) -> MultiTaskDataset``.

Adding a dataset means adding its module and one line here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..utils.errors import MTPruneInputError
from .base import MultiTaskDataset, require_root
from .celeba import CelebA
from .cityscapes import load_cityscapes
from .multidigits import MultiDigits
from .nyuv2 import load_nyuv2, load_nyuv2_40
from .presence import DigitPresence
from .scene_presence import ScenePresence
from .synthetic_scenes import load_synthetic_scenes


def load_celeba(root: str | Path | None, split: str = "train", **kw: Any) -> CelebA:
    return CelebA(require_root(root, "celeba"), split, **kw)


def load_multidigits(root: str | Path | None = None, split: str = "train", **kw: Any) -> MultiDigits:
    """Built in memory from scikit-learn's bundled digits; ``root`` is not used."""
    return MultiDigits(split, **kw)


def load_presence(root: str | Path | None = None, split: str = "train", **kw: Any) -> DigitPresence:
    """Built in memory from scikit-learn's bundled digits; ``root`` is not used."""
    return DigitPresence(split, **kw)


def load_scene_presence(root: str | Path | None = None, split: str = "train", **kw: Any) -> ScenePresence:
    """Read from (or generated into) the synthetic_scenes cache, or ``root``."""
    return ScenePresence(root, split, **kw)


DATASETS: dict[str, Callable[..., MultiTaskDataset]] = {
    "nyuv2": load_nyuv2,
    "nyuv2_40": load_nyuv2_40,
    "cityscapes": load_cityscapes,
    "celeba": load_celeba,
    "synthetic_scenes": load_synthetic_scenes,
    "multidigits": load_multidigits,
    "presence": load_presence,
    "scene_presence": load_scene_presence,
}


def _target(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The callable whose signature documents ``fn``'s keyword arguments (the class for thin wrappers)."""
    return {load_celeba: CelebA, load_multidigits: MultiDigits, load_presence: DigitPresence,
            load_scene_presence: ScenePresence}.get(fn, fn)


def load(name: str, root: str | Path | None = None, split: str = "train", **kw: Any) -> MultiTaskDataset:
    """``load("nyuv2", root=PATH, split="val")``: the dataset ``name`` (see ``DATASETS``).

    Unknown names, unknown keyword arguments and unreadable data raise ``MTPruneInputError``.
    """
    if name not in DATASETS:
        raise MTPruneInputError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    target = _target(DATASETS[name])
    sig = inspect.signature(target)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    accepted = [p for p, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(accepted)) if not has_var_kw else []
    if unknown:
        raise MTPruneInputError(
            f"dataset {name!r}: unknown argument(s) {unknown}; accepted: {', '.join(accepted) or 'none'}"
        )
    return DATASETS[name](root, split, **kw)
