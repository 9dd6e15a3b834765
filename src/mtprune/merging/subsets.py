"""Deployable task subsets of a merged network (PAM, He et al., KDD 2021, §4; MFIS, Cheng et al. 2021).

A merged network serves a subset S of its tasks with ``model(x, tasks=S)``: it runs the shared part and the
exclusive parts of the tasks in S. :func:`extract_tasks` makes that a model of its own, holding only those
modules (copies), so it can be saved (``mtprune.io.save``), shipped and loaded without the other tasks' weights;
its MACs are those of ``model(x, tasks=S)``, the subset cost the merge reports claim.

:class:`~.merged_net.MergedNet` (PAM, naive merging) is saved with its structure under the metadata key
``merged`` (:func:`merged_structure`), and :func:`load_merged` rebuilds it from the file alone through
``mtprune.io.load``'s model-kind registry; MFIS networks use ``mfis`` (:mod:`.mfis.serialize`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError

from .merged_net import MergedNet, TaskBranch
from .mfis.build import MFISNet
from .mfis.serialize import build_stage, describe_stage, rebuild_mfis

__all__ = ["deploy_costs", "extract_tasks", "load_merged", "merged_structure", "rebuild_merged"]

FORMAT_VERSION = 1


def _names(model: nn.Module, tasks: Sequence[str] | str) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
    have = list(model.task_names)
    unknown = [t for t in names if t not in have]
    if unknown or not names:
        raise MTPruneInputError(f"cannot extract task(s) {names}: unknown or empty; the model has {have}")
    return names


def _extract_mfis(net: MFISNet, names: list[str]) -> MFISNet:
    s = net.structure()
    keep_groups, modules = [], {}
    for layer in s["layers"]:
        kept = []
        for g in layer:
            users = [t for t in g["users"] if t in names]
            if users:
                kept.append({**g, "users": users, "tasks": [t for t in g["tasks"] if t in names]})
                modules[g["key"]] = s["modules"][g["key"]]
        keep_groups.append(kept)
    modules.update({f"out:{t}": s["modules"][f"out:{t}"] for t in names})
    sub = rebuild_mfis({**s, "tasks": names, "layers": keep_groups, "modules": modules,
                        "head_inputs": {t: s["head_inputs"][t] for t in names}})
    old = {g.key: g for g in net.groups()}
    for g in sub.groups():
        sub.stage(g).load_state_dict(net.stage(old[g.key]).state_dict())
    for t in names:
        sub.heads[t].out.load_state_dict(net.heads[t].out.state_dict())
    return sub


def extract_tasks(model: nn.Module, tasks: Sequence[str] | str) -> nn.Module:
    """A copy of the merged ``model`` (PAM / naive :class:`MergedNet` or :class:`MFISNet`) that holds and runs
    only what ``tasks`` need; ``extract_tasks(m, S)(x)`` equals ``m(x, tasks=S)`` and costs the same MACs."""
    if isinstance(model, MergedNet):
        names = _names(model, tasks)
        sub: nn.Module = MergedNet(copy.deepcopy(dict(model.shared)),
                                   {t: copy.deepcopy(model.heads[t]) for t in names}, model.depth)
    elif isinstance(model, MFISNet):
        sub = _extract_mfis(model, _names(model, tasks))
    else:
        raise MTPruneInputError(f"extract_tasks takes a merged network (MergedNet or MFISNet), got "
                                f"{type(model).__name__}")
    shape = getattr(model, "mtprune_input_shape", None)
    if shape is not None:
        sub.mtprune_input_shape = shape
    return sub.train(model.training)


def deploy_costs(model: nn.Module, example: Tensor, claimed: Mapping[str, Any], *, latency: bool = True,
                 warmup: int = 3, repeats: int = 10) -> dict[str, dict[str, Any]]:
    """For every subset key of ``claimed`` (``{"a+b": SubsetCost}``, e.g. ``cost.merged_costs(model, ...)``),
    the MACs and latency of the model :func:`extract_tasks` makes for it, beside the claimed ones. A MAC count
    that differs from the claim is a bug, and raises."""
    from mtprune.measure import profile

    out = {}
    for key, cost in claimed.items():
        sub = extract_tasks(model, key.split("+")).eval()
        prof = profile(sub, example, latency=latency, warmup=warmup, repeats=repeats, subsets=False)
        if prof.macs != cost.macs:
            raise RuntimeError(f"the extracted model of {key} costs {prof.macs} MACs, the subset cost says "
                               f"{cost.macs}")
        out[key] = {"macs": prof.macs, "latency_ms": prof.latency_ms, "claimed_macs": cost.macs,
                    "claimed_latency_ms": cost.latency_ms}
    return out


def merged_structure(net: MergedNet) -> dict[str, Any]:
    """A JSON-able description of a :class:`MergedNet`'s stages, saved as ``extra={"merged": ...}``."""
    return {"version": FORMAT_VERSION, "depth": net.depth, "tasks": list(net.task_names),
            "shared": {k: describe_stage(v) for k, v in net.shared.items()},
            "heads": {t: {"stages": {k: describe_stage(v) for k, v in b.stages.items()},
                          "out": describe_stage(b.out)} for t, b in net.heads.items()}}


def rebuild_merged(structure: Mapping[str, Any]) -> MergedNet:
    """The (untrained) :class:`MergedNet` that ``structure`` (from :func:`merged_structure`) describes."""
    try:
        if int(structure.get("version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise MTPruneInputError(f"merged-network description version {structure['version']} is newer than "
                                    "this mtprune")
        shared = {str(k): build_stage(v) for k, v in structure["shared"].items()}
        heads = {str(t): TaskBranch({str(k): build_stage(v) for k, v in h["stages"].items()}, build_stage(h["out"]))
                 for t, h in structure["heads"].items()}
        return MergedNet(shared, heads, int(structure["depth"]))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MTPruneInputError(f"corrupt merged-network description ({type(err).__name__}: {err})") from None


def load_merged(path: str | Path) -> MergedNet:
    """Rebuild a saved PAM / naive merged network from its ``.mtp`` file alone (``extra.merged``)."""
    from mtprune.io import read

    tensors, meta = read(path)
    structure = (meta.get("extra") or {}).get("merged")
    if not isinstance(structure, Mapping):
        raise MTPruneInputError(f"{path}: not a merged network saved with its structure (metadata extra.merged)")
    try:
        net = rebuild_merged(structure)
        net.load_state_dict(tensors, strict=True)
    except MTPruneInputError as err:
        raise MTPruneInputError(f"{path}: {err}") from None
    except RuntimeError as err:
        raise MTPruneInputError(f"{path}: weights do not fit the merged network: {str(err).splitlines()[0]}") from None
    if meta.get("input_shape"):
        net.mtprune_input_shape = meta["input_shape"]
    return net.eval()
