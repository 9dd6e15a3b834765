"""From scores to masks: per-task top-k, the unanimous decision, and the search for the keep ratio.

DiSparse (Sun et al., CVPR 2022):

1. each task t normalises its scores S_t by their sum over the backbone plus head t, and keeps the global top-k,
   k = round(keep_ratio · N_t) with N_t the number of weights in backbone + head t: the keep-mask B_t;
2. unanimous decision: a shared weight is pruned only if every task prunes it (backbone mask = OR_t B_t);
   head t keeps B_t;
3. the OR makes the backbone denser than keep_ratio, so the keep ratio is found by bisection until the
   *overall* sparsity equals the target (the released code hard-codes ratios per target instead).

Ties are broken by position (stable sort), so every decision is deterministic and the kept sets are nested
as the ratio grows (the overall density is monotone in the ratio).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..utils.errors import MTPruneInputError
from .parts import BACKBONE, task_params

Masks = dict[str, Tensor]


def _flat(scores: Mapping[str, Tensor], params: list[str]) -> Tensor:
    flat = torch.cat([scores[p].detach().reshape(-1).double().cpu() for p in params])
    if not torch.isfinite(flat).all():
        raise MTPruneInputError("the scores contain NaN/Inf: refusing to prune on them")
    return flat


def _ranks(flat: Tensor) -> Tensor:
    """Position of each entry in the descending, stable order (0 = kept first)."""
    order = torch.sort(flat, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel())
    return ranks


def _unflatten(flat: Tensor, shapes: Mapping[str, torch.Size], params: list[str]) -> Masks:
    out, start = {}, 0
    for p in params:
        n = shapes[p].numel()
        out[p] = flat[start:start + n].reshape(shapes[p])
        start += n
    return out


def topk_mask(scores: Mapping[str, Tensor], k: int) -> Masks:
    """Keep the ``k`` highest scores over all given weights together (global top-k)."""
    params = list(scores)
    flat = _flat(scores, params)
    keep = _ranks(flat) < k
    return _unflatten(keep, {p: scores[p].shape for p in params}, params)


def global_masks(scores: Mapping[str, Tensor], sparsity: float) -> Masks:
    """One global ranking (single-loss baselines): exactly round((1 - sparsity) · N) weights kept."""
    total = sum(s.numel() for s in scores.values())
    return topk_mask(scores, round((1 - sparsity) * total))


def unanimous(task_masks: Mapping[str, Masks], parts: Mapping[str, str]) -> Masks:
    """Backbone: OR over tasks of B_t. Head t: B_t. (Weights a task does not score are absent from its B_t.)"""
    out: Masks = {}
    for param, part in parts.items():
        if part == BACKBONE:
            votes = [m[param] for m in task_masks.values() if param in m]
            if not votes:
                raise MTPruneInputError(f"no task scored the shared weight {param!r}")
            out[param] = torch.stack(votes).any(0)
        elif part in task_masks:
            out[param] = task_masks[part][param]
    return out


def sparsity_of(masks: Mapping[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


class TaskRanking:
    """Per-task rankings over backbone + head t, computed once; ``masks(ratio)`` is then cheap."""

    def __init__(self, task_scores: Mapping[str, Mapping[str, Tensor]], parts: Mapping[str, str]) -> None:
        self.parts = dict(parts)
        heads = sorted({p for p in self.parts.values() if p != BACKBONE} - set(task_scores))
        if heads:
            raise MTPruneInputError(f"heads {heads} have no task scores; tasks scored: {sorted(task_scores)}")
        self.shapes = {p: next(iter(task_scores.values()))[p].shape for p in self.parts}
        self.total = sum(s.numel() for s in self.shapes.values())
        self.params: dict[str, list[str]] = {}
        self.ranks: dict[str, Tensor] = {}
        for task, scores in task_scores.items():
            params = task_params(self.parts, task)
            flat = _flat(scores, params)
            flat = flat / flat.sum() if flat.sum() > 0 else flat  # DiSparse normalises S_t (rank-invariant)
            self.params[task], self.ranks[task] = params, _ranks(flat)

    def task_masks(self, ratio: float) -> dict[str, Masks]:
        """B_t for every task: its top round(ratio · N_t) weights over backbone + head t."""
        out = {}
        for task, params in self.params.items():
            ranks = self.ranks[task]
            keep = ranks < round(ratio * ranks.numel())
            out[task] = _unflatten(keep, self.shapes, params)
        return out

    def masks(self, ratio: float) -> tuple[Masks, dict[str, Masks]]:
        task_masks = self.task_masks(ratio)
        return unanimous(task_masks, self.parts), task_masks


@dataclass
class Decision:
    masks: Masks
    task_masks: dict[str, Masks]
    keep_ratio: float
    sparsity: float  # achieved, overall
    trials: int


def search_keep_ratio(task_scores: Mapping[str, Mapping[str, Tensor]], parts: Mapping[str, str], sparsity: float,
                      tolerance: float = 1e-3, max_trials: int = 60) -> Decision:
    """Bisection on the keep ratio until |overall sparsity − target| ≤ tolerance/4 (the best trial otherwise)."""
    if not 0 < sparsity < 1:
        raise MTPruneInputError(f"sparsity must be in (0, 1), got {sparsity}")
    ranking = TaskRanking(task_scores, parts)
    lo, hi, best = 0.0, 1.0, None
    for trial in range(1, max_trials + 1):
        mid = (lo + hi) / 2
        masks, task_masks = ranking.masks(mid)
        achieved = sparsity_of(masks)
        if best is None or abs(achieved - sparsity) < abs(best.sparsity - sparsity):
            best = Decision(masks, task_masks, mid, achieved, trial)
        if abs(achieved - sparsity) <= tolerance / 4:
            break
        if achieved > sparsity:  # too sparse: keep more
            lo = mid
        else:
            hi = mid
    best.trials = trial
    return best
