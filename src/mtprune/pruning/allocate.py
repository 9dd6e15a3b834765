"""Budget allocation: turn per-channel scores into a removal plan.

- ``global``: one ranking across all candidate groups (lowest first), as in Molchanov et al. 2019 and
  Garg et al. 2023;
- ``layer``: the same fraction removed from every group;
- ``plan_for_cost``: the most importance kept per unit of a cost (HALP, Shen et al., NeurIPS 2022: a greedy
  knapsack over channel blocks against a latency table; any per-layer cost of ``pruning/cost.py`` works).

All respect a minimum width per group (Garg et al.: no layer below 5 filters), an optional ``round_to`` for
hardware-friendly widths (one number, or one per group: ``group_round_to`` resolves per-layer-kind settings such
as ``{"depthwise": 16, "pointwise": 8}``), and per-part channel ratios given by name (``{"backbone": 0.3}``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ..utils.errors import MTPruneInputError
from .attention import HeadSpec, select_heads
from .cost import Tracker
from .graph import ChannelGroup

Plan = dict[int, list[int]]
RoundTo = int | Mapping[int, int]
KINDS = ("conv", "pointwise", "depthwise", "grouped", "linear", "conv_transpose", "default")


def _normalized(scores: Tensor, how: str) -> Tensor:
    if how == "mean":
        return scores / scores.abs().mean().clamp_min(1e-30)
    return scores


def removed_importance(scores: Mapping[int, Tensor], plan: Plan, normalize: str = "none") -> float:
    """The importance a plan removes: the sum of its channels' scores, normalized per group as the global
    ranking compares them (``normalize``)."""
    return float(sum(_normalized(scores[g].float(), normalize)[idx].sum() for g, idx in plan.items() if idx))


def _cap(group: ChannelGroup, min_channels: int) -> int:
    return max(group.channels - max(min_channels, 1), 0)


def _round(group: ChannelGroup, remove: int, round_to: RoundTo) -> int:
    if isinstance(round_to, Mapping):
        round_to = round_to.get(group.index, 1)
    if round_to <= 1 or remove == 0:
        return remove
    keep = group.channels - remove
    keep = min(group.channels, math.ceil(keep / round_to) * round_to)
    return group.channels - keep


def _lowest(scores: Tensor, k: int) -> list[int]:
    # numpy's stable sort: the same order as torch.argsort(stable=True), several times faster on one group's scores
    # (each bisection trial sorts every group)
    values = scores.detach().cpu()
    values = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values  # exact; numpy has no bf16
    return sorted(np.argsort(values.numpy(), kind="stable")[:k].tolist())


def plan_removal(groups: list[ChannelGroup], scores: Mapping[int, Tensor], fraction: float, *,
                 mode: str = "global", normalize: str = "none", min_channels: int = 5, round_to: RoundTo = 1,
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
            if k > 0 and g.heads is not None:  # attention: whole heads, or as many channels from every head
                plan[g.index] = select_heads(g.heads, scores[g.index], k, max(min_channels, 1))
            elif k > 0:
                plan[g.index] = _lowest(scores[g.index], k)
    return {gi: idxs for gi, idxs in plan.items() if idxs}


def _global_counts(pool: list[ChannelGroup], scores: Mapping[int, Tensor], fraction: float, normalize: str,
                   min_channels: int) -> dict[int, int]:
    total = sum(g.channels for g in pool)
    target = int(round(fraction * total))
    if target <= 0:
        return {}
    values = torch.cat([_normalized(scores[g.index].float(), normalize) for g in pool]).detach().cpu().numpy()
    owner = np.repeat(np.arange(len(pool)), [g.channels for g in pool])
    caps = np.array([_cap(g, min_channels) for g in pool])
    # lowest first (a stable sort, ties in order), skipping a channel once its group has lost its cap: a channel
    # goes iff its rank within its group (in the global order) is below the cap, and it is among the first
    # ``target`` such channels
    own = owner[np.argsort(values, kind="stable")]
    by_group = np.argsort(own, kind="stable")  # positions grouped by owner, each group in global order
    sizes = np.bincount(own, minlength=len(pool))
    rank = np.empty_like(own)
    rank[by_group] = np.arange(len(own)) - (np.cumsum(sizes) - sizes)[own[by_group]]
    taken = own[rank < caps[own]][:target]
    counts = np.bincount(taken, minlength=len(pool)).tolist()
    return {g.index: c for g, c in zip(pool, counts, strict=True)}


def group_round_to(groups: list[ChannelGroup], kinds: Mapping[str, str], spec: int | Mapping[str, int]) -> RoundTo:
    """``round_to`` per group from a per-layer-kind spec (``{"depthwise": 16, "pointwise": 8, "default": 1}``;
    kinds as in ``cost.layer_kind``): a group takes the largest value of the layers it touches. An int is kept."""
    if isinstance(spec, bool) or not isinstance(spec, int | Mapping):
        raise MTPruneInputError(f"round_to must be an int, a dict of layer kinds to ints, 'auto' or 'measured', "
                                f"got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise MTPruneInputError(f"round_to must be >= 1, got {spec}")
        return spec
    bad = {k: v for k, v in spec.items() if k not in KINDS or isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise MTPruneInputError(f"round_to: layer kinds must be among {list(KINDS)} with ints >= 1, got {bad}")
    default = spec.get("default", 1)
    return {g.index: max([spec.get(kinds.get(n, ""), default) for n in g.producers + g.consumers] or [default])
            for g in groups}


def _keeps(group: ChannelGroup, cap: int, step: int) -> list[int]:
    """The widths a group passes through, widest first: multiples of ``step`` below its width, down to the cap."""
    floor = group.channels - cap
    out, keep = [], (group.channels - 1) // step * step
    while keep >= max(floor, 1):
        out.append(keep)
        keep -= step
    return out


class _HeadWalk:
    """A head group's removals in ``plan_for_cost``: nested head-consistent sets ``(n, r)``, the ``n`` heads of
    lowest summed score whole and the ``r`` lowest channels of every other head (``attention.select_heads``'s
    removals, ranked the same way), so that every step keeps the group valid and costs what the pruned model
    costs. A step adds one whole head (``n + 1``) or one channel per remaining head (``r + 1``)."""

    def __init__(self, spec: HeadSpec, scores: Tensor, keep_at_least: int) -> None:
        self.spec, self.keep_at_least = spec, max(keep_at_least, 1)
        s = scores.detach().double().reshape(spec.num_heads, spec.head_dim)
        self.rank = s.sum(1).argsort(stable=True).tolist()
        self.order = s.argsort(dim=1, stable=True).tolist()
        self.state = (0, 0)

    def channels(self, n: int, r: int) -> list[int]:
        d = self.spec.head_dim
        gone = [h * d + j for h in self.rank[:n] for j in range(d)]
        return sorted(gone + [h * d + self.order[h][j] for h in self.rank[n:] for j in range(r)])

    def moves(self) -> list[tuple[list[int], tuple[int, int]]]:
        """``(channels added, next state)`` of each allowed step."""
        n, r = self.state
        nxt = [(n + 1, r)] + ([] if self.spec.whole_heads_only else [(n, r + 1)])
        now = set(self.channels(n, r))
        return [([c for c in self.channels(*st) if c not in now], st) for st in nxt
                if (self.spec.num_heads - st[0]) * (self.spec.head_dim - st[1]) >= self.keep_at_least]


def plan_for_cost(groups: list[ChannelGroup], scores: Mapping[int, Tensor], tracker: Tracker, goal: float, *,
                  normalize: str = "none", min_channels: int = 5, round_to: RoundTo = 1,
                  part_ratios: Mapping[str, float] | None = None, mode: str = "global",
                  tolerance: float = 0.005) -> Plan:
    """Remove channels until the tracked cost (e.g. predicted latency) is at most ``goal``, keeping the most
    importance per unit of cost (HALP, Shen et al., NeurIPS 2022).

    Each group's channels leave lowest score first, in blocks that keep its width a multiple of its
    ``round_to``; a group holding attention heads (``ChannelGroup.heads``) loses a whole head or one channel of
    every remaining head at a time (``_HeadWalk``; its ``round_to`` does not apply), so the plan is one that
    ``PruningGraph.prune`` applies unchanged and the tracked cost is the pruned model's. The block removed next
    is the one with the least importance (sum of its normalized scores)
    per unit of cost it saves, given the widths of the moment: the cost of a layer depends on both the groups
    of its inputs and of its outputs, so a block's saving is re-evaluated when it comes up (lazy greedy) and
    re-queued if it changed. Groups of parts with a fixed ratio in ``part_ratios`` are pruned first, at that
    ratio (``plan_removal``), and left out of the knapsack. Near the goal, a block that would overshoot it by
    more than ``tolerance`` (relative) is set aside for smaller ones; if none is left, the block that reaches the
    goal with the least importance finishes. The tracker is left at the returned plan's cost.
    """
    ratios = dict(part_ratios or {})
    fixed_groups = [g for g in groups if g.index in scores and g.part in ratios]
    plan: Plan = {}
    for part, frac in ratios.items():
        pool = [g for g in fixed_groups if g.part == part]
        plan.update(plan_removal(pool, scores, frac, mode=mode, normalize=normalize, min_channels=min_channels,
                                 round_to=round_to))
    for gi, idxs in plan.items():
        tracker.apply(gi, idxs)
    free = [g for g in groups if g.index in scores and g.part not in ratios]
    order = {g.index: torch.argsort(scores[g.index].float(), stable=True).tolist() for g in free}
    value = {g.index: _normalized(scores[g.index].float(), normalize) for g in free}
    widths = {g.index: g.channels for g in free}
    walks = {g.index: _HeadWalk(g.heads, scores[g.index], min_channels) for g in free if g.heads is not None}
    steps = {g.index: _keeps(g, _cap(g, min_channels),
                             round_to.get(g.index, 1) if isinstance(round_to, Mapping) else max(round_to, 1))
             for g in free}
    scale = max(abs(tracker.value), 1e-30) * 1e-12

    def moves(gi: int) -> list[tuple[list[int], object]]:
        if gi in walks:
            return walks[gi].moves()
        if not steps[gi]:
            return []
        n, keep = len(order[gi]), steps[gi][0]
        return [(order[gi][n - widths[gi]:n - keep], keep)]

    def entry(gi: int, limit: float = math.inf) -> tuple | None:
        """The group's best next block that saves at most ``limit``: (key, group, block, importance, saving,
        next state)."""
        best = None
        for block, state in moves(gi):
            importance = float(value[gi][block].sum())
            saving = -tracker.delta(gi, block)
            if saving > limit:
                continue
            key = (0, importance / saving) if saving > scale else (1, importance)
            if best is None or key < best[0]:
                best = (key, gi, block, importance, saving, state)
        return best

    def advance(gi: int, block: list[int], state: object) -> None:
        tracker.apply(gi, block)
        if gi in walks:
            walks[gi].state = state
        else:
            widths[gi] = state
            steps[gi].pop(0)

    def last_block() -> tuple | None:
        """Among the blocks that alone bring the cost down to ``goal``, the one that loses the least importance."""
        gap = tracker.value - goal
        done = [(float(value[g.index][block].sum()), g.index, block, state) for g in free
                for block, state in moves(g.index) if -tracker.delta(g.index, block) >= gap]
        return min(done, key=lambda e: e[:2])[1:] if done else None

    heap = [e for e in (entry(g.index) for g in free) if e is not None]
    heapq.heapify(heap)
    while heap and tracker.value > goal:
        gi = heapq.heappop(heap)[1]
        # the widths around this group may have changed since it was queued; a block that would overshoot the
        # goal by more than the tolerance is left out: smaller blocks first
        fresh = entry(gi, tracker.value - goal + tolerance * goal)
        if fresh is None:
            continue
        if heap and fresh[0] > heap[0][0]:
            heapq.heappush(heap, fresh)
            continue
        advance(gi, fresh[2], fresh[5])
        nxt = entry(gi)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    finish = last_block() if tracker.value > goal else None
    if finish is not None:  # only blocks that overshoot are left: the one losing the least importance
        advance(*finish)
    for g in free:
        if g.index in walks and walks[g.index].state != (0, 0):
            plan[g.index] = walks[g.index].channels(*walks[g.index].state)
        elif g.index not in walks and widths[g.index] < g.channels:
            plan[g.index] = sorted(order[g.index][:g.channels - widths[g.index]])
    return plan


def plan_near_ties(groups: list[ChannelGroup], scores: Mapping[int, Tensor], plan: Plan, latency: Tracker,
                   macs: Tracker, goal: float, *, band: float = 0.25, normalize: str = "none", min_channels: int = 5,
                   round_to: RoundTo = 1, part_ratios: Mapping[str, float] | None = None, mode: str = "global",
                   tolerance: float = 0.005) -> Plan:
    """The plan with the MACs of ``plan`` (the importance ranking's, ``plan_removal`` at a MACs target) that runs
    fastest on the device, among those that only reorder near-ties of the importance ranking.

    The global ranking (normalized scores, lowest first) removes n channels. Those ranked below n × (1 - band) are
    removed as the ranking says, those ranked at or above n × (1 + band) are kept; within the band, where the
    criterion's scores are close to the cut and their order is the least certain, channel blocks leave by the
    most predicted latency saved per MAC saved (``latency`` and ``macs``: trackers of ``cost.CostModel``) until
    ``macs`` meets ``goal`` (within ``tolerance``, blocks that would overshoot more wait for smaller ones). If the
    band runs out first, the ranking's order continues past it (among blocks that do not overshoot; if all do, the
    one that reaches the goal overshooting least). Channels leave each group lowest score first, in
    blocks that keep widths multiples of ``round_to``, never below ``min_channels``; groups of parts with a fixed
    ratio and groups of attention heads (whose removals must stay head-consistent) keep their removals in
    ``plan``. The trade of importance for latency, as in HALP (Shen et al., NeurIPS
    2022), but confined to the ranking's near-ties, so that the MACs and, outside the band, the channels removed
    are those of the importance ranking. ``mode`` must be "global" (the band is one of a global ranking)."""
    if mode != "global":
        raise MTPruneInputError(f"plan_near_ties ranks channels globally; allocator {mode!r} has no global cut")
    ratios = dict(part_ratios or {})
    free = [g for g in groups if g.index in scores and g.part not in ratios and g.heads is None]
    fixed = {gi: idxs for gi, idxs in plan.items() if gi not in {g.index for g in free}}
    for gi, idxs in fixed.items():
        latency.apply(gi, idxs)
        macs.apply(gi, idxs)
    values = torch.cat([_normalized(scores[g.index].float(), normalize) for g in free]).detach().cpu().numpy()
    rank = np.empty(len(values), dtype=np.int64)
    rank[np.argsort(values, kind="stable")] = np.arange(len(values))
    starts = np.cumsum([0] + [g.channels for g in free])
    removed = sum(len(plan.get(g.index, ())) for g in free)
    lo, hi = math.floor(removed * (1 - band)), math.ceil(removed * (1 + band))
    order, ranks, widths, keeps = {}, {}, {}, {}
    for g, start in zip(free, starts[:-1], strict=True):
        r = rank[start:start + g.channels]
        order[g.index] = np.argsort(r, kind="stable").tolist()  # the group's channels, lowest score first
        ranks[g.index] = r[order[g.index]].tolist()
        cap = _cap(g, min_channels)
        step = round_to.get(g.index, 1) if isinstance(round_to, Mapping) else max(round_to, 1)
        widths[g.index], keeps[g.index] = g.channels, _keeps(g, cap, step)
        target = g.channels - min(sum(1 for v in ranks[g.index] if v < lo), cap)
        keep = g.channels
        while keeps[g.index] and keeps[g.index][0] >= target:  # the ranking's removals, width rounded up
            keep = keeps[g.index].pop(0)
        if keep < g.channels:
            block = order[g.index][:g.channels - keep]
            latency.apply(g.index, block)
            macs.apply(g.index, block)
            widths[g.index] = keep

    def block(gi: int) -> list[int]:
        n = len(order[gi])
        return order[gi][n - widths[gi]:n - keeps[gi][0]]

    def in_band(gi: int) -> bool:
        return bool(keeps[gi]) and ranks[gi][len(order[gi]) - keeps[gi][0] - 1] < hi

    def key(gi: int) -> tuple[float, int] | None:
        b = block(gi)
        saved = -macs.delta(gi, b)
        return None if saved <= 0 else (latency.delta(gi, b) / saved, gi)  # most ms saved per MAC first

    def advance(gi: int) -> None:
        b = block(gi)
        latency.apply(gi, b)
        macs.apply(gi, b)
        widths[gi] = keeps[gi].pop(0)

    heap = [k for k in (key(gi) for gi in order if in_band(gi)) if k is not None]
    heapq.heapify(heap)
    while heap and macs.value > goal:
        gi = heapq.heappop(heap)[1]
        fresh = key(gi) if in_band(gi) else None
        if fresh is None:
            continue
        if heap and fresh > heap[0]:  # the widths around it changed since it was queued
            heapq.heappush(heap, fresh)
            continue
        if -macs.delta(gi, block(gi)) > macs.value - goal + tolerance * goal:
            continue  # it would overshoot: smaller blocks first
        advance(gi)
        nxt = key(gi) if in_band(gi) else None
        if nxt is not None:
            heapq.heappush(heap, nxt)
    while macs.value > goal:  # the band ran out (or only overshooting blocks were left): the ranking's order,
        saved = {gi: -macs.delta(gi, block(gi)) for gi in order if keeps[gi]}  # among blocks that do not overshoot
        if not saved:
            break
        fits = [gi for gi, v in saved.items() if v <= macs.value - goal + tolerance * goal]
        advance(min(fits, key=lambda gi: ranks[gi][len(order[gi]) - widths[gi]]) if fits else
                min(saved, key=lambda gi: (saved[gi] < macs.value - goal, abs(saved[gi] - (macs.value - goal)))))
    out = dict(fixed)
    for g in free:
        if widths[g.index] < g.channels:
            out[g.index] = sorted(order[g.index][:g.channels - widths[g.index]])
    return out
