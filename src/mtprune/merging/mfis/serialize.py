"""Saving and rebuilding a merged MFIS network (reconstruction of Cheng et al., Cognitive Computation 2021;
METHODS.md §4) without its base models.

An :class:`~.build.MFISNet` is not a zoo model, so ``mtprune.io.load`` cannot rebuild it from a builder name.
Instead :meth:`MFISNet.structure` stores, next to the slot groups, a plain-data description of every stage:
its conv/linear layer (type and constructor arguments) and the parameter-free or per-channel ops around it.
:func:`rebuild_mfis` turns that JSON back into modules through a fixed table of allowed ``torch.nn`` classes
and arguments: nothing is unpickled, imported or evaluated, and anything outside the table is refused.
:func:`load_mfis` reads a ``.mtp`` file written by ``mtprune.io.save(net, path, extra={"mfis":
net.structure()})`` (what ``mtprune merge`` with ``method: mfis`` writes) and loads its weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mtprune.utils.errors import MTPruneInputError

from ..merged_net import MergedStage, TaskBranch
from .build import MFISNet, SlotGroup

__all__ = ["build_stage", "describe_op", "describe_stage", "describe_stages", "load_mfis", "rebuild_mfis"]

FORMAT_VERSION = 1
_POOL = ("kernel_size", "stride", "padding", "ceil_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
# class name → (class, constructor arguments read from the module's attributes of the same name)
_OPS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "bias")),
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "ReLU": (nn.ReLU, ()),
    "ReLU6": (nn.ReLU6, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, ("p",)),
    "Dropout2d": (nn.Dropout2d, ("p",)),
    "MaxPool2d": (nn.MaxPool2d, (*_POOL, "dilation")),
    "AvgPool2d": (nn.AvgPool2d, (*_POOL, "count_include_pad")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "BatchNorm1d": (nn.BatchNorm1d, _BN),
    "BatchNorm2d": (nn.BatchNorm2d, _BN),
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def describe_op(op: nn.Module) -> dict[str, Any]:
    """``{"type": class name, **constructor arguments}`` of a module in the allowed table."""
    name = type(op).__name__
    if name not in _OPS or type(op) is not _OPS[name][0]:
        raise MTPruneInputError(f"cannot describe a {name} in an MFIS network file; supported: {', '.join(_OPS)}")
    args = {}
    for arg in _OPS[name][1]:
        value = getattr(op, arg)
        args[arg] = (value is not None) if arg == "bias" else _plain(value)
    return {"type": name, **args}


def _build_op(desc: Any) -> nn.Module:
    if not isinstance(desc, Mapping) or desc.get("type") not in _OPS:
        kind = desc.get("type") if isinstance(desc, Mapping) else type(desc).__name__
        raise MTPruneInputError(f"unsupported module {kind!r} in an MFIS network description")
    cls, allowed = _OPS[desc["type"]]
    args = {k: v for k, v in desc.items() if k != "type"}
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise MTPruneInputError(f"unexpected argument(s) {unknown} for {desc['type']} in an MFIS network description")
    for k, v in args.items():
        if not isinstance(v, (bool, int, float, list, type(None))):
            raise MTPruneInputError(f"argument {k}={v!r} of {desc['type']} is not a number")
        if isinstance(v, list):
            args[k] = tuple(v)
    return cls(**args)


def describe_stage(stage: MergedStage) -> dict[str, Any]:
    return {"pre": [describe_op(op) for op in stage.pre], "layer": describe_op(stage.layer),
            "post": [describe_op(op) for op in stage.post]}


def build_stage(desc: Any) -> MergedStage:
    if not isinstance(desc, Mapping) or not {"pre", "layer", "post"} <= set(desc):
        raise MTPruneInputError("an MFIS stage description needs 'pre', 'layer' and 'post'")
    layer = _build_op(desc["layer"])
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise MTPruneInputError(f"an MFIS stage computes with a Conv2d or Linear, not {type(layer).__name__}")
    return MergedStage(layer, [_build_op(d) for d in desc["pre"]], [_build_op(d) for d in desc["post"]])


def describe_stages(net: MFISNet) -> dict[str, Any]:
    """Every stage of ``net`` as plain data: ``{group key: stage}`` and ``{"out:<task>": output layer}``."""
    out = {g.key: describe_stage(net.stage(g)) for g in net.groups()}
    out.update({f"out:{t}": describe_stage(net.heads[t].out) for t in net.tasks})
    return out


def _mask(names: Sequence[str], tasks: Sequence[str]) -> int:
    unknown = [t for t in names if t not in tasks]
    if unknown:
        raise MTPruneInputError(f"MFIS group names unknown task(s) {unknown}; the network has {list(tasks)}")
    return sum(1 << tasks.index(t) for t in names)


def rebuild_mfis(structure: Mapping[str, Any]) -> MFISNet:
    """The (untrained) :class:`MFISNet` that ``structure`` (from :meth:`MFISNet.structure`) describes."""
    try:
        if structure.get("version", FORMAT_VERSION) > FORMAT_VERSION:
            raise MTPruneInputError(f"MFIS description version {structure['version']} is newer than this mtprune")
        stages = structure["modules"]
        tasks = [str(t) for t in structure["tasks"]]
        plan: list[list[SlotGroup]] = []
        shared: dict[str, MergedStage] = {}
        exclusive: dict[str, dict[str, MergedStage]] = {t: {} for t in tasks}
        for k, layer in enumerate(structure["layers"]):
            groups = []
            for g in layer:
                users = _mask(g["users"], tasks)
                owner = tasks[users.bit_length() - 1] if users and users & (users - 1) == 0 else None
                group = SlotGroup(k, _mask(g["tasks"], tasks), users, tuple(int(s) for s in g["slots"]),
                                  str(g["key"]), tuple(str(i) for i in g["inputs"]), owner)
                (shared if owner is None else exclusive[owner])[group.key] = build_stage(stages[group.key])
                groups.append(group)
            plan.append(groups)
        heads = {t: TaskBranch(exclusive[t], build_stage(stages[f"out:{t}"])) for t in tasks}
        return MFISNet(tasks, plan, shared, heads, structure["head_inputs"], structure["widths"],
                       structure.get("layer_names", ()))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MTPruneInputError(f"corrupt MFIS network description ({type(err).__name__}: {err})") from None


def load_mfis(path: str | Path) -> MFISNet:
    """Rebuild a saved MFIS network from its ``.mtp`` file alone (weights and metadata; no base model)."""
    from mtprune.io import read

    tensors, meta = read(path)
    structure = (meta.get("extra") or {}).get("mfis")
    if not isinstance(structure, Mapping) or "modules" not in structure:
        raise MTPruneInputError(f"{path}: not an MFIS network saved with its structure (metadata extra.mfis with "
                                "'modules'); rebuild the model yourself and pass it to mtprune.io.load(base=...)")
    from mtprune.utils.bounds import check_model_size
    from mtprune.utils.statedict import check_state_fits

    try:
        check_model_size(lambda: rebuild_mfis(structure), "MFIS network description")
        net = rebuild_mfis(structure)
    except MTPruneInputError as err:
        raise MTPruneInputError(f"{path}: {err}") from None
    check_state_fits(net, tensors, str(path))
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise MTPruneInputError(f"{path}: weights do not fit the MFIS network: {str(err).splitlines()[0]}") from None
    shape = meta.get("input_shape")
    if shape:
        net.mtprune_input_shape = shape
    return net.eval()
