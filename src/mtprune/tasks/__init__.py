"""Tasks: losses, metrics with directions, presets and Δm."""

from .base import Meter, Task, match_size
from .classification import ClassificationTask, MultiLabelTask
from .delta_m import delta_m, task_deltas
from .depth import DepthTask
from .edge import EdgeTask
from .normal import NormalTask
from .presets import PRESETS, preset
from .segmentation import SegmentationTask

__all__ = [
    "PRESETS", "ClassificationTask", "DepthTask", "EdgeTask", "Meter", "MultiLabelTask", "NormalTask",
    "SegmentationTask", "Task", "delta_m", "match_size", "task_deltas", "preset",
]
