"""Pruning one task's exclusive part of a PAM merged network (He et al., KDD 2021, §3.5), and nothing else.

PAM's merged network (:class:`~.merged_net.MergedNet`) is pruned as one network along a ladder of MAC fractions,
which stops when the first task leaves the accuracy budget. Without merging, each single-task network is pruned
to its own limit. The per-task continuation (``prune.per_task`` in ``mtprune merge``; the loop is
``experiment._Runner.prune_per_task``) gives PAM the same per-task stopping rule with an ordinary pruner: after
the joint ladder, each task in turn walks the ladder again on **its exclusive part only** — the shared trunk and
every other task's branch are protected from pruning (:func:`prune_exclusive`) and frozen during fine-tuning
(:func:`frozen_except`) — so a task with headroom keeps shrinking its own branch while the others stay as they are.

The rungs are fractions of the task's exclusive MACs in the unpruned merged network (:func:`exclusive_macs`: what
serving the task adds to serving all the others), as no merging's rungs are fractions of each network's MACs.

What is He et al.'s and what is ours: the paper merges (relevance, partitions, merged network) and then prunes the
merged network with an existing pruner; the per-task walk, the choice of fine-tuning after each of its steps
(``prune.per_task_finetune``: ``branch``, only the task's exclusive part on its own loss with the rest frozen, or
``joint``, the whole merged network on every task's loss as after a joint rung — the model every task is served
from stays one, and every task is checked against the budget after each step) and the bisection after the first
failed rung (``prune.refine``, which no merging's and naive merging's walks take alike) are ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from mtprune.measure import profile
from mtprune.pruning.prune import PruneReport, prune
from mtprune.utils.errors import MTPruneInputError

from .merged_net import MergedNet
from .subsets import extract_tasks

__all__ = ["exclusive_macs", "frozen_except", "prune_exclusive", "prune_shared", "shared_macs"]


def _check(model: nn.Module, task: str) -> None:
    if not isinstance(model, MergedNet):
        raise MTPruneInputError(f"per-task pruning takes a PAM / naive MergedNet, got {type(model).__name__}")
    if task not in model.task_names:
        raise MTPruneInputError(f"unknown task {task!r}; the merged network has {list(model.task_names)}")


def exclusive_macs(model: MergedNet, task: str, example: Tensor) -> int:
    """MACs per sample that only ``task`` pays: the whole network's minus those of the other tasks' subset."""
    _check(model, task)
    total = profile(model, example, latency=False).macs
    others = [t for t in model.task_names if t != task]
    return total - (profile(extract_tasks(model, others), example, latency=False).macs if others else 0)


def shared_macs(model: MergedNet, example: Tensor) -> int:
    """MACs per sample of what more than one task pays: the whole network's minus every task's exclusive MACs."""
    total = profile(model, example, latency=False).macs
    return total - sum(exclusive_macs(model, t, example) for t in model.task_names)


def _frozen_names(model: MergedNet, task: str) -> list[str]:
    """Every module outside ``heads.<task>`` that holds parameters: the shared trunk and the other branches."""
    names = ["shared"] if len(model.shared) else []
    return names + [f"heads.{t}" for t in model.task_names if t != task]


def prune_exclusive(model: MergedNet, task: str, example: Tensor, target_macs: float, **kwargs: Any
                    ) -> PruneReport:
    """``mtprune.prune(model, example, target_macs=...)`` restricted to ``task``'s exclusive channel groups.

    ``target_macs`` is a fraction of the **whole** network's MACs, as for :func:`~mtprune.pruning.prune.prune`;
    the shared trunk and the other tasks' branches are ``protected`` (their widths never change), and the task's
    output layer is protected as every output is. ``kwargs`` go to ``prune`` (criterion, data, losses, ...).
    """
    _check(model, task)
    if not len(model.heads[task].stages):
        raise MTPruneInputError(f"task {task!r} has no exclusive hidden layer to prune (only its output layer)")
    protected = [*_frozen_names(model, task), *kwargs.pop("protected", ())]
    return prune(model, example, target_macs=target_macs, protected=protected, **kwargs)


def prune_shared(model: MergedNet, example: Tensor, target_macs: float, **kwargs: Any) -> PruneReport:
    """``mtprune.prune(model, example, target_macs=...)`` restricted to the shared trunk: every task's branch is
    ``protected`` (its layers' output widths never change; their input widths follow the trunk's)."""
    if not isinstance(model, MergedNet):
        raise MTPruneInputError(f"shared-trunk pruning takes a PAM / naive MergedNet, got {type(model).__name__}")
    if not len(model.shared):
        raise MTPruneInputError("the merged network has no shared trunk to prune")
    protected = [*(f"heads.{t}" for t in model.task_names), *kwargs.pop("protected", ())]
    return prune(model, example, target_macs=target_macs, protected=protected, **kwargs)


@contextlib.contextmanager
def frozen_except(model: MergedNet, task: str) -> Iterator[nn.Module]:
    """Within the block only ``heads.<task>`` trains: other parameters have ``requires_grad=False`` and other
    BatchNorm layers keep their running statistics (momentum 0; batch counts restored), so the other tasks'
    outputs do not change."""
    _check(model, task)
    saved: list[tuple[Any, str, Any]] = []
    for name in _frozen_names(model, task):
        sub = model.get_submodule(name)
        for p in sub.parameters():
            saved.append((p, "requires_grad", p.requires_grad))
            p.requires_grad_(False)
        for m in sub.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                saved.append((m, "momentum", m.momentum))
                m.momentum = 0.0
                if m.num_batches_tracked is not None:
                    saved.append((m.num_batches_tracked, "count", m.num_batches_tracked.clone()))
    try:
        yield model
    finally:
        for obj, attr, value in saved:
            if attr == "requires_grad":
                obj.requires_grad_(value)
            elif attr == "count":
                obj.copy_(value)
            else:
                setattr(obj, attr, value)
