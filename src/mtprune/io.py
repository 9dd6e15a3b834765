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
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .utils.atomic import atomic_save
from .utils.bounds import bounded_build, check_input_shape, loads_bounded
from .utils.errors import MTPruneInputError
from .utils.inputs import example_from_spec, input_spec
from .utils.statedict import check_state_fits

FORMAT = "mtprune"
VERSION = 1
# model kinds that are not zoo models: metadata ``extra`` key → "module:function" rebuilding one from its file
# path alone; resolved only when such a file is loaded, so this module imports none of them
MODEL_KINDS: dict[str, str] = {
    "mfis": "mtprune.merging.mfis.serialize:load_mfis",  # MFIS (merging.mfis)
    "merged": "mtprune.merging.subsets:load_merged",  # PAM / naive merging (merging.merged_net)
}


def register_model_kind(key: str, loader: str) -> None:
    """Let ``load`` rebuild files whose metadata ``extra`` has ``key`` with ``loader`` ("module:function")."""
    if ":" not in loader:
        raise MTPruneInputError(f"a model-kind loader is 'module:function', got {loader!r}")
    MODEL_KINDS[key] = loader


def _kind_loader(meta: dict[str, Any]) -> Any:
    """The registered loader of this file's model kind, or None for a zoo / user model."""
    import importlib

    extra = meta.get("extra") or {}
    for key, target in MODEL_KINDS.items():
        if isinstance(extra, dict) and isinstance(extra.get(key), dict):
            module, _, name = target.partition(":")
            return getattr(importlib.import_module(module), name)
    return None


def _layer_widths(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, int]:
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in state:
            widths[name] = int(state[f"{name}.weight"].shape[0])
    return widths


def _module_versions(model: nn.Module) -> dict[str, int]:
    """``{module prefix: version}`` of the modules whose state-dict version is not 1 (``state_dict._metadata``;
    e.g. torchvision's MNASNet refuses weights without its version 2)."""
    meta = getattr(model.state_dict(), "_metadata", None) or {}
    return {k: int(v["version"]) for k, v in meta.items() if isinstance(v.get("version"), int) and v["version"] != 1}


def _with_versions(tensors: dict[str, torch.Tensor], model: nn.Module,
                   versions: dict[str, int] | None) -> OrderedDict[str, torch.Tensor]:
    """``tensors`` carrying the saved module versions as ``_metadata``, as ``load_state_dict`` expects (files
    written before versions were stored take the model's own versions)."""
    own = getattr(model.state_dict(), "_metadata", None) or {}
    out = OrderedDict(tensors)
    if versions is None:
        out._metadata = own  # type: ignore[attr-defined]
    else:
        out._metadata = {k: {"version": int(versions.get(k, 1))} for k in own}  # type: ignore[attr-defined]
    return out


def save(model: nn.Module, path: str | Path, *, example_inputs: torch.Tensor | tuple | dict | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write weights and buffers plus metadata atomically. Tensors that share memory are stored once each."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    from .sparsity.masks import masks_to_file  # masked layers: effective weight + bit-packed mask

    state, masks = masks_to_file(model, state)
    shape = input_spec(example_inputs) if example_inputs is not None else getattr(model, "mtprune_input_shape", None)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "spec": getattr(model, "mtprune_spec", None),
        "tasks": list(getattr(model, "task_names", []) or []),
        "input_shape": shape if isinstance(shape, list) else None,
        "widths": _layer_widths(state, model),
        "module_versions": _module_versions(model),
        "extra": extra or {},
    }
    from .pruning.attention import head_layout

    heads = head_layout(model)
    if heads:  # attention heads: the weights' shapes do not tell 3 heads of 8 from 4 heads of 6
        meta["heads"] = heads
    if masks:  # sparse models only: the masks' format and shapes
        meta["masks"] = masks
    if isinstance(shape, dict):  # a tuple or dict of inputs (utils.inputs.input_spec)
        meta["inputs"] = shape
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
    meta = loads_bounded(raw, f"{path}: metadata")
    if not isinstance(meta, dict):
        raise MTPruneInputError(f"{path}: corrupt metadata (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int):
        raise MTPruneInputError(f"{path}: not an mtprune model file (format {meta.get('format')!r})")
    if meta["version"] > VERSION:
        raise MTPruneInputError(f"{path}: format version {meta['version']} is newer than this mtprune ({VERSION})")
    if meta.get("input_shape") is not None:
        check_input_shape(meta["input_shape"], f"{path}: metadata input_shape")
    return tensors, meta


def load(path: str | Path, base: nn.Module | None = None, *, strict: bool = True) -> nn.Module:
    """Rebuild a model from a ``.mtp`` file: zoo models from their builder, user models from ``base``
    (a fresh instance of the unpruned class), shrunk to the stored widths, then loaded with the weights."""
    from .pruning.graph import PruningGraph, apply_widths
    from .sparsity.masks import apply_masks, masks_from_file, remove_masks

    tensors, meta = read(path)
    kind_loader = _kind_loader(meta) if base is None else None
    if kind_loader is not None:  # a merged network (MODEL_KINDS)
        return kind_loader(path)
    tensors, masks = masks_from_file(tensors, meta.get("masks"), str(path))
    if base is not None:
        model = base
    elif meta.get("spec"):
        spec = meta["spec"]
        try:
            model = bounded_build(spec["builder"], what=f"{path}: metadata", **spec["kwargs"])
        except (MTPruneInputError, KeyError, TypeError) as err:
            raise MTPruneInputError(f"{path}: cannot rebuild the model from its metadata ({err!r})") from None
    else:
        raise MTPruneInputError(f"{path}: not a zoo model; pass base=<a fresh instance of the model class>")
    remove_masks(model)  # a masked base takes the file's weights and masks (none for a dense file)
    current = model.state_dict()
    if any(k in current and tuple(current[k].shape) != tuple(v.shape) for k, v in tensors.items()):
        spec = meta.get("inputs") or meta.get("input_shape")
        if not spec:
            raise MTPruneInputError(f"{path}: the stored weights do not have the shapes of the model to load them "
                                    "into, and no input_shape was saved to rebuild pruned widths")
        try:
            x = example_from_spec(spec)
            graph = PruningGraph(model, x)
            widths = {g.root: int(tensors[f"{g.root}.weight"].shape[0]) for g in graph.groups
                      if f"{g.root}.weight" in tensors}
            apply_widths(model, x, widths, heads=meta.get("heads") if isinstance(meta.get("heads"), dict) else None)
        except (MTPruneInputError, TypeError, ValueError, RuntimeError) as err:
            raise MTPruneInputError(f"{path}: cannot rebuild the pruned widths ({err})") from None
        model.mtprune_input_shape = spec
    check_state_fits(model, tensors, str(path), strict=strict)
    try:
        model.load_state_dict(_with_versions(tensors, model, meta.get("module_versions")), strict=strict)
    except RuntimeError as err:
        raise MTPruneInputError(f"{path}: weights do not fit the model: {str(err).splitlines()[0]}") from None
    if masks:
        apply_masks(model, masks)
    return model
