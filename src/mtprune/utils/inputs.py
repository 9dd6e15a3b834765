"""Model inputs that are a tensor, a tuple of positional tensors, or a dict of keyword tensors.

Every entry point that takes ``example_inputs`` (prune, profile, save/load, sparsify) goes through these
helpers, so a two-input model (e.g. RGB + depth) or a model called with keyword arguments works everywhere a
single image tensor does. The batch dimension is the first dimension of every tensor.

The JSON description of an input (:func:`input_spec`) is a list of per-sample dimensions for a plain tensor (the
``input_shape`` of ``.mtp`` files), else ``{"args": [...]}`` or ``{"kwargs": {name: ...}}`` with one
``{"shape": [...], "dtype": "float32"}`` entry per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MTPruneInputError

__all__ = ["batch_size", "call_model", "example_from_spec", "first_samples", "input_spec", "leaves", "map_tensors",
           "to_device"]

def call_model(model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, list | tuple):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def map_tensors(inputs: Any, fn: Any) -> Any:
    """``inputs`` with ``fn`` applied to every tensor (dicts, tuples and lists keep their structure)."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(map_tensors(v, fn) for v in inputs)
    return inputs  # non-tensor arguments (flags, None) pass through unchanged


def leaves(inputs: Any) -> list[Tensor]:
    """Every tensor in ``inputs``, in order."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for v in inputs.values() for t in leaves(v)]
    if isinstance(inputs, list | tuple):
        return [t for v in inputs for t in leaves(v)]
    return []


def first_samples(inputs: Any, n: int = 1) -> Any:
    """The first ``n`` samples of every tensor in ``inputs`` (the batch dimension is dimension 0)."""
    return map_tensors(inputs, lambda t: t[:n] if t.dim() else t)


def to_device(inputs: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``inputs`` with every tensor moved to ``device``."""
    return map_tensors(inputs, lambda t: t.to(device, non_blocking=non_blocking))


def batch_size(inputs: Any) -> int:
    """The batch size: dimension 0 of the first tensor; an input without tensors is an input error."""
    found = leaves(inputs)
    if not found or found[0].dim() == 0:
        raise MTPruneInputError(f"example_inputs must hold batched tensors, got {type(inputs).__name__}")
    return int(found[0].shape[0])


def _tensor_spec(t: Tensor) -> dict[str, Any]:
    return {"shape": [int(d) for d in t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}


def input_spec(inputs: Any) -> list[int] | dict[str, Any]:
    """A JSON description of one sample of ``inputs`` (see the module docstring)."""
    if isinstance(inputs, Tensor):
        return [int(d) for d in inputs.shape[1:]]
    if isinstance(inputs, Mapping):
        return {"kwargs": {str(k): _tensor_spec(v) for k, v in inputs.items() if isinstance(v, Tensor)}}
    if isinstance(inputs, list | tuple) and all(isinstance(v, Tensor) for v in inputs):
        return {"args": [_tensor_spec(v) for v in inputs]}
    raise MTPruneInputError("example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
                            f"{type(inputs).__name__}")


def _zeros(spec: Any, batch: int) -> Tensor:
    if not (isinstance(spec, Mapping) and isinstance(spec.get("shape"), list)):
        raise MTPruneInputError(f"not an input description: {spec!r}")
    dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise MTPruneInputError(f"unknown input dtype {spec.get('dtype')!r}")
    return torch.zeros(batch, *[int(d) for d in spec["shape"]], dtype=dtype)


def example_from_spec(spec: Any, batch: int = 1) -> Any:
    """Zero inputs of batch ``batch`` matching :func:`input_spec`'s description."""
    if isinstance(spec, list | tuple) and all(isinstance(d, int) for d in spec):
        return torch.zeros(batch, *spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("args"), list):
        return tuple(_zeros(s, batch) for s in spec["args"])
    if isinstance(spec, Mapping) and isinstance(spec.get("kwargs"), Mapping):
        return {k: _zeros(s, batch) for k, s in spec["kwargs"].items()}
    raise MTPruneInputError(f"not an input description: {spec!r}")
