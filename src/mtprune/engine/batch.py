"""The engine's side of the data and model contracts (docs/internals.md): batches in, task outputs out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from ..models.validate import check_multitask_output
from ..tasks.base import Task
from ..utils.errors import MTPruneInputError
from ..utils.inputs import to_device


def unpack_batch(batch: Any, tasks: Sequence[str], device: torch.device) -> tuple[Any, dict[str, Tensor]]:
    """``(images, {task: target})`` from a collated ``(image, targets)`` batch, moved to ``device``. ``images`` is
    a tensor, or for a model with several inputs a tuple/list or dict of tensors (call the model with
    ``utils.inputs.call_model``; its batch size is ``utils.inputs.batch_size``)."""
    if not (isinstance(batch, list | tuple) and len(batch) == 2 and isinstance(batch[1], Mapping)):
        raise MTPruneInputError("a data batch must be (images, {task: target}), as a Dataset item is")
    images, targets = batch
    missing = [t for t in tasks if t not in targets]
    if missing:
        raise MTPruneInputError(f"the data has no targets for tasks {missing} (it has {sorted(targets)})")
    check_images(images)
    wrong = {t: type(targets[t]).__name__ for t in tasks if not isinstance(targets[t], Tensor)}
    if wrong:
        raise MTPruneInputError(f"the data's targets must be tensors, got {wrong}")
    non_blocking = device.type == "cuda"
    return (
        to_device(images, device, non_blocking=non_blocking),
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


def check_images(images: Any) -> None:
    """Images must be a floating-point tensor without NaN or Inf (the sample contract, docs/internals.md); a model
    with several inputs takes a tuple or dict of such tensors (``utils.inputs``)."""
    parts = list(images.values()) if isinstance(images, Mapping) else images
    if isinstance(parts, list | tuple) and parts and all(isinstance(p, Tensor) for p in parts):
        for part in parts:
            check_images(part)
        return
    if not isinstance(images, Tensor):
        raise MTPruneInputError(f"the data's images must be a tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise MTPruneInputError(f"the data's images have dtype {images.dtype}; expected floating point "
                                "(e.g. float32 in [0, 1])")
    if not bool(torch.isfinite(images).all()):
        raise MTPruneInputError(f"the data's images contain NaN or Inf values (a batch of shape "
                                f"{list(images.shape)})")


def check_targets(tasks: Mapping[str, Task], outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
    """Every task's target must fit its prediction (``Task.check_target``): shape, dtype, finite values."""
    for name, task in tasks.items():
        task.check_target(outputs[name], targets[name])


def collate(samples: Sequence[Any]) -> Any:
    """``default_collate``, but samples that cannot be batched (shapes or types differ) are an input error that
    names the differing entries."""
    if all(isinstance(s, list | tuple) and len(s) == 2 and isinstance(s[0], Tensor) for s in samples):
        dtypes = list(dict.fromkeys(str(s[0].dtype) for s in samples))
        if len(dtypes) > 1:  # stacking would silently promote, e.g. a uint8 image in 0..255 among floats in [0, 1]
            raise MTPruneInputError(f"the images of a batch have different dtypes ({', '.join(dtypes)}); every "
                                    "sample must have a floating-point image")
    try:
        return default_collate(samples)
    except (RuntimeError, TypeError) as err:
        raise MTPruneInputError(f"cannot batch the data's samples: {_differences(samples) or err}; every sample "
                                "must have the same image and target shapes") from err


def _differences(samples: Sequence[Any]) -> str:
    """``"depth: shapes (1, 8, 8), (8, 8)"`` for ``(image, {task: target})`` samples whose entries differ."""
    if not all(isinstance(s, list | tuple) and len(s) == 2 and isinstance(s[1], Mapping) for s in samples):
        return ""
    entries = {"image": [s[0] for s in samples]}
    for task in samples[0][1]:
        entries[task] = [s[1].get(task) for s in samples]
    out = []
    for name, values in entries.items():
        kinds = list(dict.fromkeys(tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in values))
        if len(kinds) > 1:
            out.append(f"{name}: {', '.join(map(str, kinds[:3]))}")
    return "; ".join(out)
