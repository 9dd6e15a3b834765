"""The ``.mtp`` model file: one safetensors file, JSON metadata, no pickle anywhere.

Metadata (a JSON string under the key ``mtprune``): format version, the zoo builder and its arguments,
the task names, the example input shape used for tracing, and every conv/linear layer's width. A pruned
architecture is rebuilt by shrinking a fresh model to the stored tensor shapes, then the weights are loaded.
Sparse (masked) models store each masked layer's effective ``weight`` plus its mask bit-packed as a uint8 tensor
``__mask__.<layer>.weight``; the metadata key ``masks`` names the format and the shapes, and ``load`` re-applies
them (``mtprune.sparsity.masks``). Dense models have no ``masks`` key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .utils.atomic import atomic_save
from .utils.errors import MTPruneInputError

FORMAT = "mtprune"
VERSION = 1


def _layer_widths(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, int]:
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in state:
            widths[name] = int(state[f"{name}.weight"].shape[0])
    return widths


def save(model: nn.Module, path: str | Path, *, example_inputs: torch.Tensor | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write weights and buffers plus metadata atomically. Tensors that share memory are stored once each."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    from .sparsity.masks import masks_to_file  # masked layers: effective weight + bit-packed mask

    state, masks = masks_to_file(model, state)
    shape = list(example_inputs.shape[1:]) if example_inputs is not None else getattr(
        model, "mtprune_input_shape", None)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "spec": getattr(model, "mtprune_spec", None),
        "tasks": list(getattr(model, "task_names", []) or []),
        "input_shape": shape,
        "widths": _layer_widths(state, model),
        "extra": extra or {},
    }
    if masks:  # sparse models only: the masks' format and shapes
        meta["masks"] = masks
    atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata={"mtprune": json.dumps(meta)}))
    return path


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a ``.mtp`` file; a missing, truncated or foreign file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise MTPruneInputError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("mtprune")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise MTPruneInputError(f"{path}: not a readable mtprune model file ({err})") from None
    if raw is None:
        raise MTPruneInputError(f"{path}: safetensors file without mtprune metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise MTPruneInputError(f"{path}: corrupt metadata ({err})") from None
    if not isinstance(meta, dict):
        raise MTPruneInputError(f"{path}: corrupt metadata (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int):
        raise MTPruneInputError(f"{path}: not an mtprune model file (format {meta.get('format')!r})")
    if meta["version"] > VERSION:
        raise MTPruneInputError(f"{path}: format version {meta['version']} is newer than this mtprune ({VERSION})")
    return tensors, meta


def load(path: str | Path, base: nn.Module | None = None, *, strict: bool = True) -> nn.Module:
    """Rebuild a model from a ``.mtp`` file: zoo models from their builder, user models from ``base``
    (a fresh instance of the unpruned class), shrunk to the stored widths, then loaded with the weights."""
    from .models import build_model
    from .pruning.graph import PruningGraph, apply_widths
    from .sparsity.masks import apply_masks, masks_from_file, remove_masks

    tensors, meta = read(path)
    if base is None and isinstance((meta.get("extra") or {}).get("mfis"), dict):  # a merged MFIS network
        from .merging.mfis.serialize import load_mfis

        return load_mfis(path)
    tensors, masks = masks_from_file(tensors, meta.get("masks"), str(path))
    if base is not None:
        model = base
    elif meta.get("spec"):
        spec = meta["spec"]
        try:
            model = build_model(spec["builder"], **spec["kwargs"])
        except (MTPruneInputError, KeyError, TypeError) as err:
            raise MTPruneInputError(f"{path}: cannot rebuild the model from its metadata ({err!r})") from None
    else:
        raise MTPruneInputError(f"{path}: not a zoo model; pass base=<a fresh instance of the model class>")
    remove_masks(model)  # a masked base takes the file's weights and masks (none for a dense file)
    current = model.state_dict()
    if any(k in current and tuple(current[k].shape) != tuple(v.shape) for k, v in tensors.items()):
        if not meta.get("input_shape"):
            raise MTPruneInputError(f"{path}: the stored weights do not have the shapes of the model to load them "
                                    "into, and no input_shape was saved to rebuild pruned widths")
        try:
            x = torch.zeros(1, *meta["input_shape"])
            graph = PruningGraph(model, x)
            widths = {g.root: int(tensors[f"{g.root}.weight"].shape[0]) for g in graph.groups
                      if f"{g.root}.weight" in tensors}
            apply_widths(model, x, widths)
        except (MTPruneInputError, TypeError, ValueError, RuntimeError) as err:
            raise MTPruneInputError(f"{path}: cannot rebuild the pruned widths ({err})") from None
        model.mtprune_input_shape = meta["input_shape"]
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as err:
        raise MTPruneInputError(f"{path}: weights do not fit the model: {str(err).splitlines()[0]}") from None
    if masks:
        apply_masks(model, masks)
    return model
