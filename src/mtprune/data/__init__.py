"""Datasets yielding ``(image, {task: target})`` (see ``docs/internals.md``) and joint transforms.

``load(name, root=None, split="train", **kw)`` picks a dataset from the registry: ``nyuv2`` (MTAN .npy or
AdaShare JSON, detected), ``nyuv2_40``, ``cityscapes``, ``celeba``, ``synthetic_scenes``, ``multidigits``.
"""

from .adashare import AdaShareNYUv2
from .base import MultiTaskDataset
from .celeba import PAM_GROUPS, CelebA
from .conventions import DENSE_KINDS, KINDS
from .mtan import MTANDataset
from .multidigits import MultiDigits
from .nyuv2 import detect_layout
from .registry import DATASETS, load
from .synthetic_scenes import SceneParams, SyntheticScenes, generate, load_synthetic_scenes
from .transforms import Compose, RandomCrop, RandomHorizontalFlip, RandomScaleCrop, Resize

__all__ = [
    "DATASETS",
    "DENSE_KINDS",
    "KINDS",
    "PAM_GROUPS",
    "AdaShareNYUv2",
    "CelebA",
    "Compose",
    "MTANDataset",
    "MultiDigits",
    "MultiTaskDataset",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScaleCrop",
    "Resize",
    "SceneParams",
    "SyntheticScenes",
    "detect_layout",
    "generate",
    "load",
    "load_synthetic_scenes",
]
