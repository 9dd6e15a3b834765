"""PAGCP's allocation within a round (Ye et al., TPAMI 2023): order the layers, search each layer's ratio on the
model masked so far under its θ, keep the top-P layers, and fit the selection to the MACs target.

1. The candidate groups (scored by the criterion, with room above ``min_channels``) are ordered by the MACs
   saved when ``probe_ratio`` of their channels (the lowest-scoring ones) is removed: ascending when λ > 1,
   descending otherwise, so the groups saving the most get the largest θ (``theta.py``, as the authors' code).
2. In that order, on the model with every earlier group of the round masked at its kept ratio, group ``i`` is
   masked at the trial ratios (0.05 … 0.95) and every task's mean loss is measured on the held-out batches
   (``probe.py``). The search stops at the first ratio where some task's loss ratio (masked / the reference,
   i.e. the same model without group ``i``'s mask) exceeds ``1 + θ`` and keeps the previous ratio (0 when the
   first ratio already violates). θ advances only after a group keeps a nonzero ratio.
3. Top-P (``select_top``) by ``settings.ranking``; the selection is checked again, masked, against the round's
   start: while some task exceeds ``budget``, the selected group ranked last is dropped (our choice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..attention import select_heads, snap_to_heads
from ..graph import ChannelGroup, PruningGraph
from .macs import MacsModel
from .probe import Losses, LossProbe, check_reference
from .settings import PAGCPSettings
from .theta import Thresholds, probe_order, theta_schedule

Plan = dict[int, list[int]]


@dataclass
class RatioSearch:
    """The outcome of one group's ratio search."""

    ratio: float  # the kept trial ratio (0.0 when the first ratio already violates)
    removed: int  # channels removed at that ratio
    losses: Losses  # task losses at the kept ratio (the reference when nothing is kept)
    trials: list[dict[str, Any]] = field(default_factory=list)  # evaluated trials: ratio, removed, loss_ratio
    stopped: str = "end"  # "violation", "min_channels" (the next ratio leaves too few channels) or "end"


def loss_ratios(losses: Mapping[str, float], reference: Mapping[str, float]) -> Losses:
    return {t: losses[t] / reference[t] for t in reference}


def search_ratio(ratios: Sequence[float], channels: int, cap: int, trial: Callable[[int], Losses],
                 reference: Mapping[str, float], bound: float) -> RatioSearch:
    """Ye et al. 2023's stopping rule: try ``ratios`` in order; stop at the first one where some task's loss
    ratio ``trial(k)[t] / reference[t]`` exceeds ``bound`` (= 1 + θ_i) and keep the previous one.

    ``k = floor(ratio · channels)`` channels are removed; a ratio needing more than ``cap`` stops the search;
    a ratio removing as many channels as the previous one is not re-evaluated.
    """
    kept = RatioSearch(0.0, 0, dict(reference))
    last_k, last = 0, dict(reference)
    for r in ratios:
        k = math.floor(r * channels + 1e-9)
        if k > cap:
            kept.stopped = "min_channels"
            break
        if k != last_k:
            last = trial(k)
            kept.trials.append({"ratio": r, "removed": k, "loss_ratio": loss_ratios(last, reference)})
            last_k = k
        if any(v > bound for v in loss_ratios(last, reference).values()):
            kept.stopped = "violation"
            break
        kept.ratio, kept.removed, kept.losses = r, k, last
    return kept



@dataclass
class LayerProbe:
    """One group's probe in a round (Ye et al. 2023, sequential greedy step)."""

    root: str
    part: str
    channels: int
    order: int  # position in the round's order
    probe_macs_saved: int  # MACs saved at probe_ratio (what orders the groups); with a latency target ms, as
    # delta_macs and sequence_macs (the round's cost: MacsModel or LatencyCost)
    theta: float  # the group's bound is 1 + theta
    ratio: float  # kept trial ratio
    removed: int  # channels removed at that ratio (before top-P selection and target fitting)
    loss_ratio: Losses  # per task, at the kept ratio, against the group's reference
    delta_loss: float  # max_t (loss_ratio_t - 1)
    delta_macs: int  # MACs this group alone saves at its kept ratio
    trials: int
    stopped: str
    selected: bool = False
    delta_total_loss: float = 0.0  # Σ_t (loss_t - reference_t) at the kept ratio, absolute (the authors' ranking)
    sequence_macs: int = 0  # MACs saved at the kept ratio on top of the earlier groups' kept ratios
    index: int = field(default=-1, repr=False)  # group index in the round's graph
    order_of_removal: list[int] = field(default_factory=list, repr=False)  # channels, lowest score first

    @property
    def efficiency(self) -> float:
        """Δloss / ΔMACs: the worst task's relative loss increase per MAC (or ms: ``LatencyCost``) saved alone
        (lower is better); nothing saved counts as 1."""
        return self.delta_loss / (self.delta_macs if self.delta_macs > 0 else 1)

    @property
    def total_loss_per_mac(self) -> float:
        """The authors' ranking: the summed losses' absolute increase per MAC saved in sequence (lower first)."""
        return self.delta_total_loss / (self.sequence_macs + 1e-20)

    def rank_key(self, ranking: str) -> tuple:
        """Sort key for top-P under ``ranking`` (see ``PAGCPSettings``): lower ranks first."""
        if ranking == "total_loss":
            return (self.total_loss_per_mac, self.order)
        return (self.efficiency, -self.delta_macs, self.order)


def removal(group: ChannelGroup, scores: Tensor, lowest: Sequence[int], k: int, min_channels: int) -> list[int]:
    """The channels a trial of ``k`` removes from ``group``: its ``k`` lowest-scoring ones, or for a group holding
    attention heads the head-consistent removal nearest ``k`` (``attention.select_heads``, as the global
    allocator), so that every trial and plan is what ``PruningGraph.prune`` applies, unsnapped."""
    if group.heads is None or k <= 0:
        return list(lowest[:k])
    chosen = set(select_heads(group.heads, scores, k, max(min_channels, 1)))
    return [c for c in lowest if c in chosen]  # lowest score first, as the other groups' lists


def _candidates(graph: PruningGraph, scores: Mapping[int, Tensor], macs: MacsModel, probe_ratio: float,
                min_channels: int) -> list[tuple[ChannelGroup, list[int], int]]:
    """Candidate groups, their channels by ascending score, and the MACs saved at ``probe_ratio``."""
    out = []
    for g in graph.groups:
        if g.index not in scores or g.channels - min_channels < 1:
            continue
        lowest = torch.argsort(scores[g.index], stable=True).tolist()
        k = max(1, math.floor(probe_ratio * g.channels + 1e-9))
        probe = removal(g, scores[g.index], lowest, k, min_channels)
        out.append((g, lowest, macs.saved(graph.groups, {g.index: probe})))
    return out


def probe_round(graph: PruningGraph, scores: Mapping[int, Tensor], probe: LossProbe, macs: MacsModel,
                settings: PAGCPSettings, min_channels: int) -> tuple[list[LayerProbe], Losses, float]:
    """Steps 1–2 of a round (Ye et al. 2023): order, then masked ratio search group by group on the model with
    the earlier groups' masks. Only masks are used: the model's weights are not modified.

    Returns the per-group probes, the round's reference losses (no mask) and λ.
    """
    candidates = _candidates(graph, scores, macs, settings.probe_ratio, min_channels)
    thetas, lam = theta_schedule(settings.theta0, len(candidates), settings.budget)
    order = probe_order(candidates, lambda item: item[2], lam)
    theta = Thresholds(thetas)
    so_far: Plan = {}
    records: list[LayerProbe] = []
    start: Losses | None = None
    kept: Losses | None = None  # the losses of the model with the masks so far, from the previous search
    for i, (g, lowest, probe_saved) in enumerate(order):
        if probe.cache is None and kept is not None:
            reference, stores = kept, None  # nothing to record: the previous search measured this model
        else:
            reference, stores = probe.reference(graph.groups, so_far, set(g.gates))
        check_reference(reference)
        start = start or reference

        def take(k: int, g: ChannelGroup = g, lowest: list[int] = lowest) -> list[int]:
            return removal(g, scores[g.index], lowest, k, min_channels)

        def trial(k: int, g: ChannelGroup = g, take=take, stores=stores) -> Losses:
            return probe.losses_under(graph.groups, {**so_far, g.index: take(k)}, stores)

        bound = theta.current
        found = search_ratio(settings.ratios, g.channels, g.channels - min_channels, trial, reference, 1 + bound)
        before = macs.after(graph.groups, so_far)
        chosen = take(found.removed)
        if chosen:
            so_far[g.index] = chosen
            theta.pruned()  # θ advances only after a layer is pruned (the authors' code)
        kept = found.losses
        ratios = loss_ratios(found.losses, reference)
        records.append(LayerProbe(
            root=g.root, part=g.part, channels=g.channels, order=i, probe_macs_saved=probe_saved, theta=bound,
            ratio=found.ratio, removed=len(chosen), loss_ratio=ratios,
            delta_loss=max(v - 1 for v in ratios.values()),
            delta_macs=macs.saved(graph.groups, {g.index: chosen}), trials=len(found.trials),
            stopped=found.stopped, delta_total_loss=sum(found.losses.values()) - sum(reference.values()),
            sequence_macs=before - macs.after(graph.groups, so_far), index=g.index,
            order_of_removal=lowest if g.heads is None else chosen))
    if start is None:
        start, _ = probe.reference(graph.groups, {}, set())
        check_reference(start)
    return records, start, lam


def select_top(records: Sequence[LayerProbe], top_p: float, ranking: str = "worst_task") -> list[LayerProbe]:
    """Top-P of the groups with a nonzero ratio, lowest rank first (``ranking``: see ``PAGCPSettings``).

    ``"worst_task"`` keeps ``ceil(top_p × groups with a nonzero ratio)``; ``"total_loss"`` keeps
    ``int(top_p × groups probed)`` as the authors' ``get_ratio`` does.
    """
    pruned = [r for r in records if r.removed > 0]
    keep = int(top_p * len(records)) if ranking == "total_loss" else math.ceil(top_p * len(pruned))
    return sorted(pruned, key=lambda r: r.rank_key(ranking))[:keep]


def fit_to_target(groups: Sequence[ChannelGroup], plan: Mapping[int, list[int]], macs: MacsModel,
                  goal: float) -> Plan:
    """The prefix of ``plan`` (each list ordered lowest score first) whose MACs land closest to ``goal``.

    Removals are interleaved in proportion across the groups (the j-th of k channels at ``j / k``), so a
    prefix scales every group's ratio down by about the same factor. MACs fall with every removal: bisection.
    """
    steps = sorted(((j + 1) / len(idx), gi, j) for gi, idx in plan.items() for j in range(len(idx)))

    def prefix(m: int) -> Plan:
        out: Plan = {}
        for _, gi, j in steps[:m]:
            out.setdefault(gi, []).append(plan[gi][j])
        for gi, idxs in out.items():  # attention: the head-consistent removal nearest the prefix
            if groups[gi].heads is not None:
                out[gi] = snap_to_heads(groups[gi].heads, idxs)
        return {gi: idxs for gi, idxs in out.items() if idxs}

    value = lambda m: macs.after(groups, prefix(m))  # noqa: E731
    if value(len(steps)) > goal:
        return {gi: list(idx) for gi, idx in plan.items()}
    lo, hi = 0, len(steps)  # value(lo) > goal >= value(hi) once lo moves; value(0) is the current MACs
    if value(0) <= goal:
        return {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if value(mid) > goal:
            lo = mid
        else:
            hi = mid
    best = lo if abs(value(lo) - goal) < abs(value(hi) - goal) else hi
    return prefix(best)



def select_within_budget(probe: LossProbe, graph: PruningGraph, selected: list[LayerProbe], start: Losses,
                         budget: float, macs: MacsModel, goal: float | None,
                         ranking: str = "worst_task") -> tuple[Plan, Losses, list[str], bool]:
    """Drop the selected group ranked last until the (fitted) selection keeps every task within budget."""
    dropped: list[str] = []
    chosen = list(selected)
    while True:
        plan = {r.index: r.order_of_removal[:r.removed] for r in chosen}
        fitted = False
        if goal is not None and plan and macs.after(graph.groups, plan) < goal:
            plan, fitted = fit_to_target(graph.groups, plan, macs, goal), True
        ratios = loss_ratios(probe.losses_under(graph.groups, plan), start) if plan else dict.fromkeys(start, 1.0)
        if not chosen or max(ratios.values()) <= budget * (1 + 1e-9):
            return plan, ratios, dropped, fitted
        worst = max(chosen, key=lambda r: (r.rank_key(ranking)[0], r.order))
        chosen.remove(worst)
        dropped.append(worst.root)
