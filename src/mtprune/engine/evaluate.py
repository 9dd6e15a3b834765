"""Evaluation over a whole split: each task's Meter accumulates sufficient statistics (never an average of
per-batch values); under DDP the statistics of all ranks are summed with one ``all_reduce``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..tasks.base import Meter, Task
from ..utils.errors import MTPruneInputError
from ..utils.inputs import batch_size as samples_in
from ..utils.inputs import call_model
from ..utils.runtime import eval_mode as restoring_modes
from .batch import check_targets, collate, task_outputs, unpack_batch
from .distributed import ShardSampler, all_reduce_sum, is_distributed, rank_device

Metrics = dict[str, dict[str, float]]


@contextmanager
def eval_mode(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode on ``device``; afterwards restore every submodule's mode and the device."""
    first = next(model.parameters(), None)
    home = first.device if first is not None else device
    try:
        with restoring_modes(model.to(device)):
            yield model
    finally:
        model.to(home)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, shard: bool = False) -> DataLoader:
    """An ordered loader; with ``shard`` each rank takes every W-th sample, without padding.

    It has its own generator, so iterating it never draws from the global RNG.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(dataset) if shard else None,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator(),
        collate_fn=collate,
    )


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    tasks: Mapping[str, Task],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    amp: bool = False,
    distributed: bool | None = None,
    with_loss: bool = False,
    num_workers: int = 0,
) -> Metrics:
    """``{task: {metric: value}}`` over the whole of ``data``.

    - ``data``: a Dataset (batched here) or a DataLoader (used as given).
    - ``distributed``: ``None`` reduces across ranks when torch.distributed is initialised; ``False``
      evaluates only what this process sees. When reducing, a Dataset is sharded across ranks without
      padding; a DataLoader must yield this rank's share of the split.
    - ``with_loss``: adds ``"loss"`` to each task, the mean task loss over the split (per-batch losses
      weighted by batch size).
    - ``amp``: autocast on CUDA only. Runs under ``no_grad``; the model's train/eval modes and device are
      restored afterwards. A model output lacking a task raises ``MTPruneInputError`` naming it, and so do
      empty data, non-finite or non-float images, and targets that do not fit the predictions.
    """
    names = list(tasks)
    dev = rank_device(device)
    reduce = is_distributed() if distributed is None else distributed and is_distributed()
    if not isinstance(data, DataLoader) and hasattr(data, "__len__") and len(data) == 0:
        raise MTPruneInputError("evaluate: the data is empty")
    loader = data if isinstance(data, DataLoader) else eval_loader(data, batch_size, num_workers, shard=reduce)
    meters = {t: tasks[t].new_meter() for t in names}
    losses = torch.zeros(len(names) + 1, dtype=torch.float64)  # per-task loss·n, then n
    with eval_mode(model, dev), torch.no_grad():
        for batch in loader:
            images, targets = unpack_batch(batch, names, dev)
            with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                outputs = task_outputs(call_model(model, images), names)
            check_targets(tasks, outputs, targets)
            n = samples_in(images)
            for i, t in enumerate(names):
                pred = outputs[t].float()
                meters[t].update(pred, targets[t])
                if with_loss:
                    losses[i] += float(tasks[t].loss(pred, targets[t])) * n
            losses[-1] += n
    if reduce:
        _reduce_meters(meters, losses)
    elif losses[-1] == 0:
        raise MTPruneInputError("evaluate: the data yielded no samples")
    results: Metrics = {t: dict(meters[t].compute()) for t in names}
    if with_loss:
        count = max(float(losses[-1]), 1.0)
        for i, t in enumerate(names):
            results[t]["loss"] = float(losses[i]) / count
    return results


def _reduce_meters(meters: Mapping[str, Meter], losses: torch.Tensor) -> None:
    """Sum every meter's state and the loss sums over ranks with a single ``all_reduce``."""
    states = [meters[t].state().to(torch.float64).cpu() for t in meters]
    sizes = [s.numel() for s in states]
    total = all_reduce_sum(torch.cat([*states, losses]))
    parts = torch.split(total, [*sizes, losses.numel()])
    for t, part in zip(meters, parts[:-1], strict=True):
        meters[t].load_state(part.clone())
    losses.copy_(parts[-1])
