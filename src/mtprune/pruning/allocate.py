"""Budget allocation: turn per-channel scores into a removal plan.

- ``global``: one ranking across all candidate groups (lowest first), as in Molchanov et al. 2019 and
  Garg et al. 2023;
- ``layer``: the same fraction removed from every group.

Both respect a minimum width per group (Garg et al.: no layer below 5 filters), an optional ``round_to`` for
hardware-friendly widths, and per-part channel ratios given by name (``{"backbone": 0.3, "seg": 0.5}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .graph import ChannelGroup

Plan = dict[int, list[int]]


def _normalized(scores: Tensor, how: str) -> Tensor:
    if how == "mean":
        return scores / scores.abs().mean().clamp_min(1e-30)
    return scores


def _cap(group: ChannelGroup, min_channels: int) -> int:
    return max(group.channels - max(min_channels, 1), 0)


def _round(group: ChannelGroup, remove: int, round_to: int) -> int:
    if round_to <= 1 or remove == 0:
        return remove
    keep = group.channels - remove
    keep = min(group.channels, math.ceil(keep / round_to) * round_to)
    return group.channels - keep


def _lowest(scores: Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


def plan_removal(groups: list[ChannelGroup], scores: Mapping[int, Tensor], fraction: float, *,
                 mode: str = "global", normalize: str = "none", min_channels: int = 5, round_to: int = 1,
                 part_ratios: Mapping[str, float] | None = None) -> Plan:
    """Remove ``fraction`` of the candidate channels (those with a score), lowest scores first."""
    part_ratios = dict(part_ratios or {})
    pools: dict[float, list[ChannelGroup]] = {}
    for g in groups:
        if g.index in scores:
            pools.setdefault(part_ratios.get(g.part, fraction), []).append(g)
    plan: Plan = {}
    for frac, pool in pools.items():
        counts = _global_counts(pool, scores, frac, normalize, min_channels) if mode == "global" else {
            g.index: min(math.floor(frac * g.channels + 1e-9), _cap(g, min_channels)) for g in pool}
        for g in pool:
            k = _round(g, counts.get(g.index, 0), round_to)
            if k > 0:
                plan[g.index] = _lowest(scores[g.index], k)
    return plan


def _global_counts(pool: list[ChannelGroup], scores: Mapping[int, Tensor], fraction: float, normalize: str,
                   min_channels: int) -> dict[int, int]:
    total = sum(g.channels for g in pool)
    target = int(round(fraction * total))
    if target <= 0:
        return {}
    values = torch.cat([_normalized(scores[g.index].float(), normalize) for g in pool])
    owner = torch.cat([torch.full((g.channels,), i) for i, g in enumerate(pool)])
    caps = [_cap(g, min_channels) for g in pool]
    counts = [0] * len(pool)
    taken = 0
    for pos in torch.argsort(values, stable=True).tolist():
        i = int(owner[pos])
        if counts[i] < caps[i]:
            counts[i] += 1
            taken += 1
            if taken >= target:
                break
    return {g.index: c for g, c in zip(pool, counts, strict=True)}
