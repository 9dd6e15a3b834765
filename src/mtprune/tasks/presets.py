"""Task sets of the standard benchmarks and of the built-in datasets."""

from __future__ import annotations

from collections.abc import Callable

from ..utils.errors import MTPruneInputError
from .base import Task
from .classification import ClassificationTask, MultiLabelTask
from .depth import DepthTask
from .edge import EdgeTask
from .normal import NormalTask
from .segmentation import SegmentationTask


def _nyuv2(num_classes: int = 13) -> dict[str, Task]:
    return {"seg": SegmentationTask("seg", num_classes), "depth": DepthTask(), "normal": NormalTask()}


def _cityscapes(num_classes: int = 7) -> dict[str, Task]:
    return {"seg": SegmentationTask("seg", num_classes), "depth": DepthTask()}


def _celeba(groups: int = 2, attributes: int = 40) -> dict[str, Task]:
    size = attributes // groups
    names = [f"attr_{chr(ord('a') + i)}" for i in range(groups)]
    return {n: MultiLabelTask(n, size) for n in names}


def _synthetic_scenes(num_classes: int = 7) -> dict[str, Task]:
    return {**_nyuv2(num_classes), "edge": EdgeTask()}


def _multidigits() -> dict[str, Task]:
    return {"left": ClassificationTask("left", 10), "right": ClassificationTask("right", 10)}


PRESETS: dict[str, Callable[..., dict[str, Task]]] = {
    "nyuv2": _nyuv2,
    "nyuv2_40": lambda num_classes=40: _nyuv2(num_classes),
    "cityscapes": _cityscapes,
    "celeba": _celeba,
    "synthetic_scenes": _synthetic_scenes,
    "multidigits": _multidigits,
}


def preset(name: str, **overrides) -> dict[str, Task]:
    """``preset("nyuv2")`` → ``{"seg": Task, "depth": Task, "normal": Task}``; keyword overrides such as
    ``num_classes`` are passed on."""
    if name not in PRESETS:
        raise MTPruneInputError(f"unknown task preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**overrides)
