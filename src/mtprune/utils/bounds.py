"""Bounds checked before anything is allocated: model sizes, JSON depth, ``.npy`` headers, input shapes, images.

Hostile or mistaken inputs (a model file whose metadata asks for width 1e6, a config with ``in_channels: 1e9``,
a ``.npy`` header claiming 120 GB, metadata nested 100,000 deep) are refused with an ``MTPruneInputError`` naming
the file or key, instead of exhausting memory or the stack. The caps:

- ``MAX_MODEL_ELEMENTS``: 2**30 parameter and buffer elements (4 GiB of float32). The model is first built on
  PyTorch's ``meta`` device, which allocates nothing. Raise it with the environment variable
  ``MTPRUNE_MAX_MODEL_ELEMENTS``.
- ``MAX_JSON_DEPTH``: 64 levels of nested JSON objects/arrays in model-file metadata.
- ``MAX_IMAGE_PIXELS``: 2**24 pixels per generated image (e.g. 4096 × 4096).
- ``MAX_INPUT_ELEMENTS``: 2**28 elements in one example input shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MTPruneInputError

MAX_MODEL_ELEMENTS = 2**30
MAX_JSON_DEPTH = 64
MAX_IMAGE_PIXELS = 2**24
MAX_INPUT_ELEMENTS = 2**28


def max_model_elements() -> int:
    """The model-size cap: ``MTPRUNE_MAX_MODEL_ELEMENTS`` when set, else ``MAX_MODEL_ELEMENTS``."""
    raw = os.environ.get("MTPRUNE_MAX_MODEL_ELEMENTS")
    try:
        return int(raw) if raw else MAX_MODEL_ELEMENTS
    except ValueError:
        raise MTPruneInputError(f"MTPRUNE_MAX_MODEL_ELEMENTS={raw!r} is not an integer") from None


def model_elements(model: nn.Module) -> int:
    """Parameter plus buffer elements (each shared tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def check_model_size(build: Callable[[], nn.Module], what: str) -> None:
    """Build the model with ``build()`` on the meta device (no memory) and refuse it when it holds more than
    ``max_model_elements()`` elements. A builder that cannot run on the meta device is not checked here; its
    real build reports its own errors."""
    cap = max_model_elements()
    normal = torch.Tensor.normal_
    try:
        # random init is skipped: on the meta device it draws nothing anyway, and the first ``normal_`` on a meta
        # tensor imports torch's reference kernels (seconds)
        torch.Tensor.normal_ = lambda self, *args, **kwargs: self
        with torch.device("meta"):
            model = build()
    except MTPruneInputError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. a builder that reads values of tensors; the real build decides
        if "overflow" in str(err).lower():  # a tensor size beyond int64: far above any cap
            raise MTPruneInputError(f"{what}: the model's tensor sizes overflow (far above the cap of {cap:,} "
                                    "parameter elements)") from None
        return
    finally:
        torch.Tensor.normal_ = normal
    n = model_elements(model)
    if n > cap:
        raise MTPruneInputError(f"{what}: the model would have {n:,} parameter elements ({n * 4 / 2**30:.1f} GiB "
                                f"as float32), above the cap of {cap:,} (set MTPRUNE_MAX_MODEL_ELEMENTS to allow it)")


def bounded_build(name: str, tasks: Any, what: str, **kwargs: Any) -> nn.Module:
    """``mtprune.build_model(name, tasks, **kwargs)`` after ``check_model_size``."""
    from ..models import build_model

    check_model_size(lambda: build_model(name, tasks, **kwargs), what)
    return build_model(name, tasks, **kwargs)


def json_depth(text: str) -> int:
    """The deepest nesting of objects/arrays in JSON ``text`` (strings are skipped), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_bounded(text: str, source: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses documents nested deeper than ``max_depth`` (never a RecursionError)."""
    depth = json_depth(text)
    if depth > max_depth:
        raise MTPruneInputError(f"{source}: JSON nested {depth} levels deep (the limit is {max_depth})")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise MTPruneInputError(f"{source}: corrupt JSON ({type(err).__name__}: {err})") from None


def check_input_shape(shape: Any, source: str) -> list[int]:
    """An example input shape without the batch: 1 to 4 positive integers (e.g. ``[3, 64, 80]``)."""
    ok = (isinstance(shape, list | tuple) and 1 <= len(shape) <= 4
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape))
    if not ok:
        raise MTPruneInputError(f"{source}: input shape {shape!r} is not 1 to 4 positive integers (e.g. [3, 64, 80])")
    n = shape_product(shape)
    if n > MAX_INPUT_ELEMENTS:
        raise MTPruneInputError(f"{source}: input shape {list(shape)} has {n:,} elements, above the cap of "
                                f"{MAX_INPUT_ELEMENTS:,}")
    return list(shape)


def check_image_size(height: int, width: int, source: str) -> None:
    """Refuse generated images above ``MAX_IMAGE_PIXELS``."""
    if height * width > MAX_IMAGE_PIXELS:
        raise MTPruneInputError(f"{source}: images of {height} × {width} pixels are above the cap of "
                                f"{MAX_IMAGE_PIXELS:,} pixels")


def check_npy_header(path: str | Path) -> None:
    """Refuse a ``.npy`` file whose header claims more data than the file holds (before ``np.load`` allocates
    it). Files that are not ``.npy`` at all are left to ``np.load``'s own error."""
    from numpy.lib import format as npf

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            major, _ = npf.read_magic(fh)
            read = npf.read_array_header_1_0 if major == 1 else npf.read_array_header_2_0
            shape, _, dtype = read(fh, max_header_size=100_000)
            offset = fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError):
        return
    if dtype.hasobject:
        return  # np.load(allow_pickle=False) refuses it with its own message
    need = shape_product(shape) * dtype.itemsize
    have = path.stat().st_size - offset
    if need > have:
        raise MTPruneInputError(f"corrupt .npy file {path}: its header claims shape {tuple(shape)} of {dtype} "
                                f"({need:,} bytes) but the file holds {max(have, 0):,} bytes of data")


def shape_product(shape: Sequence[int]) -> int:
    """The number of elements of ``shape`` (exact, as a Python int)."""
    n = 1
    for v in shape:
        n *= int(v)
    return n
