"""Which part of a multi-task model each maskable weight belongs to: the shared backbone or one task's head.

A layer belongs to task t's head if its name is under ``heads.<t>`` (``MultiTaskModel``) or, for any other model
returning a dict, if only task t's output depends on it (read from the autograd graph of one forward). Every
other layer is shared ("backbone"). DiSparse scores each task over the backbone plus its own head only
(Sun et al., CVPR 2022).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..measure import eval_mode, part_of, task_layers
from ..models.validate import check_multitask_output
from ..utils.inputs import call_model, first_samples
from .masks import maskable_layers, param_name

BACKBONE = "backbone"


def _tasks_of(model: nn.Module) -> list[str]:
    names = getattr(model, "task_names", None)
    return list(names) if names else []


def layer_parts(model: nn.Module, example_inputs: Tensor | tuple | Mapping | None = None,
                tasks: Sequence[str] | None = None) -> dict[str, str]:
    """``{"<layer>.weight": "backbone" | task}`` for every maskable weight, in module order."""
    layers = maskable_layers(model)
    names = list(tasks) if tasks is not None else _tasks_of(model)
    used: dict[str, set[str]] = {}
    if example_inputs is not None:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            with eval_mode(model), torch.enable_grad():
                out = check_multitask_output(call_model(model, first_samples(example_inputs)))
                names = names or list(out)
                used = task_layers(model, {t: out[t] for t in names if t in out})
        finally:
            for p in frozen:
                p.requires_grad_(False)
    parts = {}
    for layer in layers:
        part = part_of(layer, names)
        if part == BACKBONE and used:
            reached = [t for t in names if layer in used.get(t, set())]
            if len(reached) == 1:
                part = reached[0]
        parts[param_name(layer)] = part
    return parts


def task_params(parts: dict[str, str], task: str) -> list[str]:
    """The weights task ``task`` is scored over: the backbone's and its own head's, in order."""
    return [p for p, part in parts.items() if part in (BACKBONE, task)]
