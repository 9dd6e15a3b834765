"""Check that stored tensors fit a model before ``load_state_dict``, and name the first key that does not.

``load_state_dict`` casts silently (an ``int8`` or ``bool`` tensor becomes a float weight) and its error starts
with "Error(s) in loading state_dict" without the key; ``check_state_fits`` refuses both with one line.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import MTPruneInputError


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "integer"


def _task_of(key: str) -> str | None:
    bits = key.split(".")
    return bits[1] if len(bits) > 2 and bits[0] == "heads" else None


def check_state_fits(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, strict: bool = True) -> None:
    """Refuse ``state`` for ``model`` naming the first problem: a key the model lacks (a task it lacks), a key the
    state lacks, a shape, or a dtype of another kind (integer or bool in place of floating point, complex)."""
    current = model.state_dict()
    if strict:
        unexpected = [k for k in state if k not in current]
        if unexpected:
            tasks = sorted({t for k in unexpected if (t := _task_of(k)) is not None}
                           - {t for k in current if (t := _task_of(k)) is not None})
            lacks = f" (the model has no task {', '.join(map(repr, tasks))})" if tasks else ""
            raise MTPruneInputError(f"{source}: tensor {unexpected[0]!r} is not in the model{lacks}"
                                    + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        missing = [k for k in current if k not in state]
        if missing:
            raise MTPruneInputError(f"{source}: tensor {missing[0]!r} of the model is missing"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, value in state.items():
        if key not in current:
            continue
        if not isinstance(value, torch.Tensor):
            raise MTPruneInputError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor")
        want = current[key]
        if tuple(value.shape) != tuple(want.shape):
            raise MTPruneInputError(f"{source}: tensor {key!r} has shape {list(value.shape)}, the model's has "
                                    f"{list(want.shape)}")
        if _kind(value) != _kind(want):
            raise MTPruneInputError(f"{source}: tensor {key!r} has dtype {str(value.dtype).removeprefix('torch.')}, "
                                    f"the model's is {str(want.dtype).removeprefix('torch.')} (refused, not cast)")


def check_input_dtype(model: nn.Module, inputs: object, where: str = "example_inputs") -> None:
    """Refuse floating-point inputs whose dtype differs from the model's floating-point parameters (a float32
    image into a float64 model would otherwise fail deep inside a layer)."""
    want = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if want is None:
        return
    stack, found = [inputs], []
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    for t in found:
        if t.is_floating_point() and t.dtype != want:
            name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
            raise MTPruneInputError(f"{where} have dtype {name(t.dtype)} but the model's parameters are "
                                    f"{name(want)}; convert one of them (e.g. x.to({name(want)}) or "
                                    f"model.to({name(t.dtype)}))")
