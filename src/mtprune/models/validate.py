"""Checks that any model, zoo or user-written, honours the multi-task contract (docs/internals.md).

A multi-task model's forward returns ``dict[str, Tensor]``: one output per task. Everything else in mtprune
(training, pruning, evaluation, profiling) relies on that, so a model returning a tensor, a list or a tuple is
refused here with one clear :class:`~mtprune.utils.errors.MTPruneInputError`.

:func:`find_predictors` names each head's output layers (its "predictors"), which pruning never touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError


def _describe(obj: Any) -> str:
    name = type(obj).__name__
    if isinstance(obj, Tensor):
        return f"{name} of shape {list(obj.shape)}"
    if isinstance(obj, list | tuple):
        return f"{name} of {len(obj)} items"
    return name


def check_task_names(names: Iterable[str], expected: Iterable[str], what: str = "model outputs") -> None:
    """Raise if ``names`` and ``expected`` differ, naming the missing and the extra ones."""
    names, expected = list(names), list(expected)
    missing = [t for t in expected if t not in names]
    extra = [t for t in names if t not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise MTPruneInputError(f"{what} do not match the tasks {expected}: " + "; ".join(parts))


def check_multitask_output(out: Any, expected_tasks: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Return ``out`` as a ``dict[str, Tensor]``, or raise a clear error saying what is wrong with it.

    ``expected_tasks``, when given, must equal the output keys exactly (the mismatches are named).
    """
    if not isinstance(out, Mapping):
        raise MTPruneInputError(f"model must return a dict of task outputs, got {_describe(out)}")
    for key, value in out.items():
        if not isinstance(key, str):
            raise MTPruneInputError(
                f"model must return a dict of task outputs keyed by task name (str), got key {key!r}"
            )
        if not isinstance(value, Tensor):
            raise MTPruneInputError(
                f"model must return a dict of task outputs (Tensors), got {_describe(value)} for task {key!r}"
            )
    if expected_tasks is not None:
        check_task_names(out.keys(), expected_tasks)
    return dict(out)


@torch.no_grad()
def validate_model(
    model: nn.Module, example_inputs: Any, expected_tasks: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """Run ``model`` once on ``example_inputs`` and check its output with :func:`check_multitask_output`.

    ``example_inputs`` is a tensor, or a tuple/list of positional arguments. The forward runs in eval mode
    without gradients (BatchNorm statistics are left untouched); the model's train/eval mode is restored.
    """
    if not isinstance(model, nn.Module):
        raise MTPruneInputError(f"model must be a torch.nn.Module, got {_describe(model)}")
    args = tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    try:
        out = model(*args)
    finally:
        model.train(was_training)
    return check_multitask_output(out, expected_tasks)


def find_predictors(head: nn.Module) -> list[nn.Module]:
    """The output layers of one task head: what pruning must protect.

    Zoo heads say so themselves through their ``predictor`` property (a list of modules: the four final 1x1
    convs of a branch-sum ASPP, one layer otherwise). For any other head, the last ``nn.Conv2d`` or
    ``nn.Linear`` in registration order is taken; a head whose last-registered layer is not its output layer
    should define ``predictor``.
    """
    declared = getattr(head, "predictor", None)
    if declared is not None:
        found = [declared] if isinstance(declared, nn.Module) else list(declared)
        if not found or not all(isinstance(m, nn.Module) for m in found):
            raise MTPruneInputError(f"{type(head).__name__}.predictor must be a module or a list of modules")
        return found
    layers = [m for m in head.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise MTPruneInputError(f"head {type(head).__name__} has no Conv2d or Linear layer to act as predictor")
    return [layers[-1]]
