"""The engine's side of the data and model contracts (docs/internals.md): batches in, task outputs out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..models.validate import check_multitask_output
from ..utils.errors import MTPruneInputError


def unpack_batch(batch: Any, tasks: Sequence[str], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """``(images, {task: target})`` from a collated ``(image, targets)`` batch, moved to ``device``."""
    if not (isinstance(batch, list | tuple) and len(batch) == 2 and isinstance(batch[1], Mapping)):
        raise MTPruneInputError("a data batch must be (images, {task: target}), as a Dataset item is")
    images, targets = batch
    missing = [t for t in tasks if t not in targets]
    if missing:
        raise MTPruneInputError(f"the data has no targets for tasks {missing} (it has {sorted(targets)})")
    non_blocking = device.type == "cuda"
    return (
        images.to(device, non_blocking=non_blocking),
        {t: targets[t].to(device, non_blocking=non_blocking) for t in tasks},
    )


def task_outputs(out: Any, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Check that a model returned a dict of tensors holding every task; return those tasks' outputs.

    Extra outputs (heads of tasks not being trained or evaluated) are allowed and dropped.
    """
    out = check_multitask_output(out)
    missing = [t for t in tasks if t not in out]
    if missing:
        raise MTPruneInputError(f"the model's output lacks tasks {missing} (it returned {sorted(out)})")
    return {t: out[t] for t in tasks}
