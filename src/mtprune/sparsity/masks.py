"""Unstructured weight masks on Conv and Linear layers (heads included; never biases or normalisation layers).

One mechanism: :mod:`torch.nn.utils.prune` (``custom_from_mask``). A masked layer holds

- ``weight_orig``: the trainable parameter, kept at exactly 0 on pruned entries;
- ``weight_mask``: a 0/1 buffer of the weight's shape;
- ``weight``: ``weight_orig * weight_mask``, recomputed by a forward pre-hook at every forward.

Why ``prune`` rather than ``parametrize``: with ``prune`` the ``weight`` a module used in its last forward is a
plain attribute that *is* the tensor in the autograd graph. So code that reads ``module.weight`` after a forward
gets the dense gradient of the effective weight (pruned entries included, which regrowth needs, Evci et al.
2020) with no special context: the statistics engine (``per_task_gradients``) and ``measure.task_layers`` (which
layers each task uses) work unchanged on masked models. A parametrization recomputes ``weight`` at every access,
so such reads would fall outside the graph unless every caller wrapped itself in ``parametrize.cached()``. The
module classes and the other parameters are untouched.

Lifetime: training updates ``weight_orig`` and the mask multiplies its gradient, so pruned entries get no
gradient (Adam/SGD, with or without weight decay, leave a 0 at 0); Trainer checkpoints hold ``weight_orig`` and
``weight_mask`` and resume into the masked model. The ``.mtp`` file stores the effective ``weight`` plus the
masks bit-packed (:func:`masks_to_file` / :func:`masks_from_file`, used by ``mtprune.io``); loading re-applies
them. Caveat of the mechanism: ``module.weight`` is refreshed at each forward; after an optimizer step read
:func:`effective_weight` instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from ..utils.errors import MTPruneInputError

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
MASK_PREFIX = "__mask__."
MASK_FORMAT = "packbits-uint8-msb-v1"  # numpy.packbits(bool.flatten(C order), bitorder="big"), zero-padded


def param_name(layer: str) -> str:
    """The weight's name of layer ``layer`` (``"<layer>.weight"``)."""
    return f"{layer}.weight" if layer else "weight"


def _layer(param: str) -> str:
    if param != "weight" and not param.endswith(".weight"):
        raise MTPruneInputError(f"{param!r}: masks apply to conv/linear weights only (names end with '.weight')")
    return param[: -len(".weight")] if param != "weight" else ""


def is_masked(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight_mask", None), Tensor) and hasattr(module, "weight_orig")


def maskable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and Linear layers with a weight, in module order; masked or not."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and (is_masked(m) or isinstance(getattr(m, "weight", None), nn.Parameter))}


def maskable_params(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{"<layer>.weight": shape}`` of every maskable weight, in module order."""
    return {param_name(n): tuple(trainable_weight(m).shape) for n, m in maskable_layers(model).items()}


def trainable_weight(module: nn.Module) -> nn.Parameter:
    """The parameter an optimizer updates: ``weight_orig`` on a masked layer, else ``weight``."""
    return module.weight_orig if is_masked(module) else module.weight


@torch.no_grad()
def effective_weight(module: nn.Module) -> Tensor:
    """The weight the next forward will use (``weight_orig * weight_mask``), detached."""
    if is_masked(module):
        return module.weight_orig * module.weight_mask
    return module.weight.detach()


def _refresh(module: nn.Module) -> None:
    module.weight = module.weight_orig * module.weight_mask  # what the pre-hook computes at each forward


def set_mask(module: nn.Module, mask: Tensor) -> None:
    """Mask ``module``'s weight with the boolean ``mask`` (replacing any mask it has); pruned entries are zeroed."""
    weight = trainable_weight(module)
    if tuple(mask.shape) != tuple(weight.shape):
        raise MTPruneInputError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    if not is_masked(module):
        prune.custom_from_mask(module, "weight", mask)
    else:
        module.weight_mask.copy_(mask)
    with torch.no_grad():
        module.weight_orig.mul_(mask)
    _refresh(module)


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Apply ``{"<layer>.weight": bool mask}`` in place; only conv/linear weights are accepted."""
    layers = maskable_layers(model)
    for param, mask in masks.items():
        name = _layer(param)
        if name not in layers:
            raise MTPruneInputError(f"{param!r} is not the weight of a Conv or Linear layer of this model")
        set_mask(layers[name], mask)


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """``{"<layer>.weight": bool mask}`` of the masked layers (on the CPU)."""
    layers = maskable_layers(model)
    return {param_name(n): m.weight_mask.detach().bool().cpu() for n, m in layers.items() if is_masked(m)}


def remove_masks(model: nn.Module) -> None:
    """Make the masks permanent: each masked layer gets a plain ``weight`` parameter = weight_orig * mask."""
    for m in maskable_layers(model).values():
        if is_masked(m):
            prune.remove(m, "weight")


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of a (possibly masked) model. After a forward with gradients a masked layer's ``weight`` is a
    non-leaf tensor that ``copy.deepcopy`` refuses, so it is recomputed without a graph first."""
    with torch.no_grad():
        for m in maskable_layers(model).values():
            if is_masked(m):
                _refresh(m)
    return copy.deepcopy(model)


def dense_copy_of_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each masked layer's ``weight_orig``/``weight_mask`` replaced by its effective ``weight``."""
    state = dict(model.state_dict())
    for name, m in maskable_layers(model).items():
        if is_masked(m):
            prefix = f"{name}." if name else ""
            state.pop(prefix + "weight_orig")
            state.pop(prefix + "weight_mask")
            state[prefix + "weight"] = effective_weight(m)
    return state


# ------------------------------------------------------------------------------------------- the .mtp encoding
def pack(mask: Tensor) -> Tensor:
    """A boolean mask as ``ceil(numel / 8)`` uint8 bytes (C order, most significant bit first)."""
    bits = mask.detach().cpu().numpy().astype(bool).reshape(-1)
    return torch.from_numpy(np.packbits(bits, bitorder="big"))


def unpack(packed: Tensor, shape: tuple[int, ...] | list[int]) -> Tensor:
    numel = int(np.prod(shape)) if len(shape) else 1
    raw = packed.detach().cpu().numpy()
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != (numel + 7) // 8:
        raise MTPruneInputError(f"a packed mask of {raw.size} bytes ({raw.dtype}) cannot hold shape {list(shape)}")
    bits = np.unpackbits(raw, count=numel, bitorder="big").astype(bool)
    return torch.from_numpy(bits.reshape(tuple(shape)))


def masks_to_file(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict | None]:
    """Tensors for a ``.mtp`` file from a (CPU, detached) state dict of ``model``: each masked layer's
    ``weight_orig``/``weight_mask`` become the effective ``weight`` plus ``__mask__.<layer>.weight`` (bit-packed);
    the metadata entry names the format and each mask's shape. ``None`` when nothing is masked."""
    layers = {n: m for n, m in maskable_layers(model).items() if is_masked(m)}
    if not layers:
        return state, None
    out = dict(state)
    shapes = {}
    for name in layers:
        prefix = f"{name}." if name else ""
        orig, mask = out.pop(prefix + "weight_orig"), out.pop(prefix + "weight_mask").bool()
        out[prefix + "weight"] = (orig * mask).contiguous()
        out[MASK_PREFIX + param_name(name)] = pack(mask)
        shapes[param_name(name)] = list(mask.shape)
    return out, {"format": MASK_FORMAT, "prefix": MASK_PREFIX, "shapes": shapes}


def masks_from_file(tensors: dict[str, Tensor], meta: Mapping | None, source: str = "file"
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a file's tensors into (model tensors, ``{param: bool mask}``); a mask without a known format is refused."""
    keys = [k for k in tensors if k.startswith(MASK_PREFIX)]
    if not keys and not meta:
        return tensors, {}
    if not isinstance(meta, Mapping) or meta.get("format") != MASK_FORMAT or not isinstance(meta.get("shapes"), dict):
        raise MTPruneInputError(f"{source}: masks stored in an unknown format ({meta!r}); expected {MASK_FORMAT!r}")
    shapes = meta["shapes"]
    if sorted(k[len(MASK_PREFIX):] for k in keys) != sorted(shapes):
        raise MTPruneInputError(f"{source}: the stored masks do not match the masks named in the metadata")
    rest = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    out = {}
    for p, shape in shapes.items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise MTPruneInputError(f"{source}: mask of layer {p!r}: shape {shape!r} is not a list of sizes")
        want = tuple(rest[p].shape) if isinstance(rest.get(p), Tensor) else None
        if want is not None and tuple(shape) != want:
            raise MTPruneInputError(f"{source}: mask of layer {p!r}: shape {shape} differs from the weight's "
                                    f"{list(want)}")
        try:
            out[p] = unpack(tensors[MASK_PREFIX + p], shape)
        except MTPruneInputError as err:
            raise MTPruneInputError(f"{source}: mask of layer {p!r}: {err}") from None
    return rest, out
