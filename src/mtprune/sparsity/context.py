"""What every sparsification method receives (``Context``) and returns (``Outcome``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from .dynamic import DynamicSchedule
from .training import SparseTrainConfig


@dataclass
class Context:
    model: nn.Module
    method: str
    sparsity: float
    tasks: list[str]
    parts: dict[str, str]  # "<layer>.weight" → "backbone" | task
    data: Iterable | None
    losses: dict | None  # task → loss fn
    batches: int | None
    score: str | None
    tolerance: float
    seed: int
    train: SparseTrainConfig
    schedule: DynamicSchedule
    rounds: int
    rewind: bool | int
    on_update: Callable | None = None
    score_init: str = "model"  # disparse_static: "xavier_normal" scores a re-initialised copy (released code)


@dataclass
class Outcome:
    masks: dict[str, Tensor]
    task_masks: dict[str, dict[str, Tensor]] | None = None
    keep_ratio: float | None = None
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
