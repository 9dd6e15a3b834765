"""Mask analysis: sparsity per layer and per part, and the tasks' agreement per layer (the "watershed layer").

Sun et al. (CVPR 2022) compare the tasks' keep-masks B_t layer by layer with the IoU |B_s ∧ B_t| / |B_s ∨ B_t|
and observe a layer where agreement drops sharply. Here the agreement of a shared layer is the **mean pairwise
IoU** over all task pairs, for any number of tasks (the released script handles two). Two empty masks agree
fully (IoU 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .parts import BACKBONE


def iou(a: Tensor, b: Tensor) -> float:
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def mean_pairwise_iou(task_masks: Mapping[str, Mapping[str, Tensor]]) -> dict[str, float]:
    """For each weight that at least two tasks decide on (the shared layers), the mean IoU over task pairs."""
    tasks = list(task_masks)
    params = list(dict.fromkeys(p for t in tasks for p in task_masks[t]))
    out = {}
    for p in params:
        having = [t for t in tasks if p in task_masks[t]]
        pairs = list(itertools.combinations(having, 2))
        if pairs:
            out[p] = sum(iou(task_masks[s][p], task_masks[t][p]) for s, t in pairs) / len(pairs)
    return out


def agreement_falls(agreement: Mapping[str, float]) -> dict[str, float]:
    """Per layer (in order), how far it lowers the running minimum of the agreement (0 for the first layer and
    for any layer agreeing at least as much as one before it: a shortcut projection running beside the main path,
    such as ResNet's ``downsample``, cannot fake a fall right after itself)."""
    falls, lowest = {}, float("inf")
    for name, value in agreement.items():
        falls[name] = max(lowest - value, 0.0) if lowest != float("inf") else 0.0
        lowest = min(lowest, value)
    return falls


def watershed(agreement: Mapping[str, float]) -> str | None:
    """The layer where the tasks' agreement falls most (:func:`agreement_falls`); None if it never falls."""
    falls = agreement_falls(agreement)
    name = max(falls, key=falls.__getitem__, default=None)
    return name if name is not None and falls[name] > 0 else None


def watershed_share(agreement: Mapping[str, float]) -> float:
    """The watershed's fall as a share of the whole fall (first layer to the lowest): 1.0 is one sharp
    watershed, small shares a gradual divergence; 0.0 if agreement never falls."""
    falls = agreement_falls(agreement)
    whole = sum(falls.values())
    return max(falls.values()) / whole if whole > 0 else 0.0


def sparsity_report(masks: Mapping[str, Tensor], parts: Mapping[str, str]) -> tuple[list[dict], dict[str, dict]]:
    """Per layer (in order) and per part (backbone, each head, and "overall"): weights, kept, sparsity."""
    layers, per_part = [], {}
    for p, m in masks.items():
        numel, kept = m.numel(), int(m.sum())
        part = parts.get(p, BACKBONE)
        layers.append({"name": p, "part": part, "shape": list(m.shape), "numel": numel, "kept": kept,
                       "sparsity": 1 - kept / numel})
        for key in (part, "overall"):
            acc = per_part.setdefault(key, {"numel": 0, "kept": 0})
            acc["numel"] += numel
            acc["kept"] += kept
    for acc in per_part.values():
        acc["sparsity"] = 1 - acc["kept"] / acc["numel"]
    return layers, per_part


def plot_watershed(agreement: Mapping[str, float], path: str | Path, title: str | None = None) -> Path:
    """Mean pairwise IoU of the tasks' keep-masks against layer depth; the watershed layer is marked."""
    from ..report.plots import _save, plt

    names, values = list(agreement), list(agreement.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names)), 3.6))
    ax.plot(range(len(names)), values, marker="o", color="#3b6ea5")
    mark = watershed(agreement)
    if mark is not None:
        ax.axvline(names.index(mark), color="#c0392b", linestyle="--", label=f"watershed: {mark}")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mean pairwise IoU of task masks")
    ax.set_xlabel("shared layer (input → output)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Task agreement per layer (DiSparse watershed)")
    return _save(fig, Path(path))


def stack_masks(masks: Mapping[str, Tensor]) -> Tensor:
    """All masks as one flat bool tensor (module order)."""
    return torch.cat([m.reshape(-1).bool() for m in masks.values()])
