"""``mtprune.prune``: score, allocate, and physically remove channels to reach a budget.

Exactly one target: ``target_macs``, ``target_params`` or ``target_latency`` (the fraction of the original kept,
in (0, 1)), ``target_latency_ms`` (milliseconds) or ``channel_ratio`` (the fraction of candidate channels removed).
MACs and parameter targets are reached by bisection on the removal fraction, each trial costed exactly from the
widths (``pruning/cost.py``: no copy, no re-tracing), until within ``tolerance``. Latency targets are predicted
from a per-layer latency table measured on the device of ``latency`` (``pruning/latency.py``) and reached by
keeping the most importance per millisecond (``allocate.plan_for_cost``; HALP, Shen et al., NeurIPS 2022).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..measure import layer_macs
from ..tasks.base import Task
from ..utils.errors import MTPruneInputError
from ..utils.inputs import first_samples, input_spec
from ..utils.runtime import eval_mode
from .allocate import Plan, group_round_to, plan_for_cost, plan_near_ties, plan_removal, removed_importance
from .blocking import device_round_to
from .cost import CostModel
from .criteria import Criterion, get_criterion
from .graph import PruningGraph
from .latency import (
    LatencySetting,
    PairedTimer,
    check_floor,
    close_the_loop,
    hardware_round_to,
    latency_model,
    pick_by_importance,
)
from .stats import StatisticsEngine, static_stats


@dataclass
class PruneReport:
    criterion: str
    target: dict[str, float]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    removed: int
    seconds: float
    batches: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict:
        return {**asdict(self), "macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio}


#: Allocators that run their own loop, by name: ``fn(model, example_inputs, criterion, *, target, data, losses,
#: batches, min_channels, round_to, part_ratios, seed, graph, engine, settings) -> PruneReport``. PAGCP (Ye et al.
#: 2023) registers "pagcp" from ``pruning/pagcp/rounds.py``; ``mtprune.pruning`` imports it, so this module never
#: imports the allocators that depend on it.
LOOP_ALLOCATORS: dict[str, Callable[..., PruneReport]] = {}


def count(model: nn.Module, example_inputs: Tensor | tuple | Mapping) -> tuple[int, int]:
    """(parameters, per-sample MACs); ``example_inputs`` is a tensor, a tuple or a dict (``utils.inputs``)."""
    with eval_mode(model), torch.no_grad():
        macs, _ = layer_macs(model, first_samples(example_inputs))
    return sum(p.numel() for p in model.parameters()), sum(macs.values())


def check_all_losses(tasks: Iterable[str], losses: Mapping, criterion: str) -> None:
    """Refuse a gradient criterion without a loss for every task output: the head of a task without a loss would
    score about 0 and be cut to ``min_channels`` silently."""
    missing = [t for t in tasks if t not in losses]
    if missing:
        raise MTPruneInputError(f"criterion {criterion!r} scores channels by the task losses, but no loss is given "
                                f"for task(s) {missing} (losses for {sorted(losses)}); pass a loss for every output")


def _check_target(target_macs, target_params, channel_ratio, target_latency=None,
                  target_latency_ms=None) -> tuple[str, float]:
    given = {k: v for k, v in {"target_macs": target_macs, "target_params": target_params,
                                "channel_ratio": channel_ratio, "target_latency": target_latency,
                                "target_latency_ms": target_latency_ms}.items() if v is not None}
    if len(given) != 1:
        raise MTPruneInputError("give exactly one of target_macs, target_params, target_latency, target_latency_ms, "
                                f"channel_ratio (got {sorted(given)})")
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MTPruneInputError(f"{name} must be a number, got {value!r}")
    if name == "target_latency_ms":
        if not 0 < value < float("inf"):
            raise MTPruneInputError(f"target_latency_ms must be a positive number of milliseconds, got {value}")
    elif not 0 < value < 1:
        raise MTPruneInputError(f"{name} must be in (0, 1), got {value}")
    return name, float(value)


class _CheckedLoss:
    """A task's loss that first checks the target against the prediction (``Task.check_target``), so that bad
    data is refused with the task's name instead of failing deep inside the loss."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        self.task.check_target(pred, target)
        return self.task.loss(pred, target)


def as_losses(losses: Mapping) -> dict:
    """Accept loss callables or ``Task`` objects (their ``.loss``, checking each target first)."""
    return {k: _CheckedLoss(v) if isinstance(v, Task) else getattr(v, "loss", v) for k, v in losses.items()}


def gather_statistics(model: nn.Module, graph: PruningGraph, criterion: Criterion, data: Iterable | None,
                      losses: Mapping | None, batches: int | None = None) -> StatisticsEngine:
    """Run the statistics engine of ``criterion`` over (at most ``batches`` batches of) ``data``."""
    if data is None or losses is None:
        raise MTPruneInputError(f"criterion {criterion.name!r} needs gradients: pass data= and losses=")
    engine = StatisticsEngine(model, graph, as_losses(losses), [criterion])
    with eval_mode(model):  # statistics with frozen BN statistics and no dropout noise
        engine.run(_checked_images(data), batches)
    return engine


def _checked_images(data: Iterable) -> Iterable:
    """``data``, refusing batches that cannot be loaded or whose images are not finite floating-point tensors."""
    from ..engine.batch import check_images
    from ..engine.checkpoint import one_line

    batches = iter(data)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except MTPruneInputError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as err:  # e.g. samples of different shapes
            raise MTPruneInputError(f"cannot load a batch of the statistics data: {one_line(err, 1)}") from err
        if isinstance(batch, list | tuple) and len(batch) == 2:
            check_images(batch[0])
        yield batch


def criterion_scores(model: nn.Module, graph: PruningGraph, criterion: Criterion, *, data: Iterable | None = None,
                     losses: Mapping | None = None, batches: int | None = None,
                     engine: StatisticsEngine | None = None, exclude_parts: Iterable[str] = ()) -> dict[int, Tensor]:
    """Per-group scores of the candidate groups, none of ``exclude_parts`` (``ChannelGroup.part``, e.g. the task
    heads for a backbone-only pool). Gradient criteria need ``data`` and ``losses``."""
    if criterion.needs_data:
        if engine is None:
            engine = gather_statistics(model, graph, criterion, data, losses, batches)
        raw = engine.averaged(criterion)
        scores = criterion.finalize(raw)
    else:
        scores = {s.group.index: criterion.score(s) for s in static_stats(model, graph)}
    excluded = set(exclude_parts)
    return {k: v.detach().float().cpu() for k, v in scores.items()
            if v is not None and criterion.applies_to(graph.groups[k]) and graph.groups[k].part not in excluded}


def _plan_by_root(graph: PruningGraph, plan: Plan) -> dict[str, list[int]]:
    return {graph.groups[i].root: idxs for i, idxs in plan.items()}


def _apply(model: nn.Module, example_inputs: Tensor, plan_by_root: Mapping[str, list[int]],
           graph: PruningGraph | None = None, **graph_kw) -> PruningGraph:
    graph = graph or PruningGraph(model, example_inputs, **graph_kw)
    index = {g.root: g.index for g in graph.groups}
    graph.prune({index[r]: idxs for r, idxs in plan_by_root.items()})
    return graph


def search_fraction(graph: PruningGraph, scores: Mapping[int, Tensor], cost: Callable[[Plan], float], goal: float,
                    plan_kw: dict, tolerance: float = 0.005, max_trials: int = 30) -> tuple[Plan, float]:
    """Bisection on the removal fraction so that ``cost(plan)`` (e.g. ``CostModel.macs``: computed from widths,
    no pruned copy) hits ``goal`` (absolute)."""
    lo, hi = 0.0, 1.0
    best: tuple[float, Plan, float] | None = None
    for _ in range(max_trials):
        mid = (lo + hi) / 2
        plan = plan_removal(graph.groups, scores, mid, **plan_kw)
        value = cost(plan)
        err = abs(value - goal) / goal
        if best is None or err < best[0]:
            best = (err, plan, mid)
        if err <= tolerance:
            break
        if value > goal:
            lo = mid
        else:
            hi = mid
    return best[1], best[2]


def _against_macs_ranking(goal_ms: float, found: tuple[Plan, float], by_macs: Callable[[float], Plan],
                          measure: Callable[[Plan], float], cost: CostModel, scores: Mapping[int, Tensor],
                          normalize: str, rounds: int, known: list[tuple[float, float]]
                          ) -> tuple[Plan, float, dict[str, object]]:
    """The latency knapsack's plan (``found``: the plan and its measured ms) against the importance ranking cut at
    the MACs whose measured latency meets the goal (``close_the_loop`` asking in MACs; ``known``: the dense
    model's and the floor's (MACs, ms) pairs). The table can mislead the knapsack into cutting more importance than
    a plain MACs cut of the same real latency; the plan that keeps more importance within the goal is returned
    (:func:`~.latency.pick_by_importance`), with its measured ms and both candidates' figures."""
    plan, reached = found
    dense_macs, dense_ms = known[0]
    first = goal_ms / dense_ms * dense_macs
    ranked, trials = close_the_loop(goal_ms, by_macs(first), by_macs, measure, rounds, floor_ms=known[1][0],
                                    known=known, first_ask=first)
    trials = [{("asked_macs" if k == "asked_ms" else k): v for k, v in t.items()} for t in trials]
    ranked_ms = next(t["measured_ms"] for t in trials if t.get("chosen"))
    out: dict[str, object] = {
        "latency": {"measured_ms": reached, "removed_importance": removed_importance(scores, plan, normalize),
                    "macs": cost.macs(plan)},
        "macs": {"measured_ms": ranked_ms, "removed_importance": removed_importance(scores, ranked, normalize),
                 "macs": cost.macs(ranked), "feedback": trials}}
    out["chosen"] = pick_by_importance(goal_ms, {k: (v["measured_ms"], v["removed_importance"])
                                                 for k, v in out.items()})
    return (ranked, ranked_ms, out) if out["chosen"] == "macs" else (plan, reached, out)


def prune(model: nn.Module, example_inputs: Tensor, criterion: str | Criterion = "l1", *,
          target_macs: float | None = None, target_params: float | None = None,
          channel_ratio: float | None = None, data: Iterable | None = None, losses: Mapping | None = None,
          batches: int | None = 8, allocator: str = "global", min_channels: int = 5,
          round_to: int | Mapping[str, int] | str = 1, part_ratios: Mapping[str, float] | None = None,
          protected: Iterable[str] = (),
          parts: Mapping[str, str] | None = None, seed: int = 0, tolerance: float = 0.005,
          engine: StatisticsEngine | None = None, graph: PruningGraph | None = None,
          pagcp: Mapping[str, object] | None = None, normalize: str | None = None,
          target_latency: float | None = None, target_latency_ms: float | None = None,
          latency: LatencySetting | Mapping[str, object] | None = None, rank_by: str = "importance") -> PruneReport:
    """Prune ``model`` in place, physically. Returns a ``PruneReport``.

    ``target_latency`` (a fraction of the dense latency, in (0, 1)) or ``target_latency_ms`` (milliseconds)
    prune to a latency on the device described by ``latency`` (a ``LatencySetting`` or a dict of its fields:
    ``device`` "cpu"/"cuda", ``threads``, ``batch``, ``dtype``, ``cache_dir``; see ``pruning/latency.py``).
    With ``allocator="global"`` the channels kept are those with the most importance per millisecond; with
    ``"layer"`` every group loses the same fraction. The prediction lands in ``extra["latency"]``.

    ``round_to`` keeps widths multiples of a number: one for every group, a dict per layer kind
    (``{"depthwise": 16, "pointwise": 8, "default": 1}``), ``"auto"`` for the device's channel blocking as its
    instruction set implies it (``latency.hardware_round_to``), or ``"measured"``: the blocks found per layer kind
    in latency sweeps on the device of ``latency`` (``blocking.device_round_to``; cached with its latency table).

    ``rank_by="latency"`` (``target_macs`` with ``allocator="global"``) keeps the MACs of the importance ranking
    but reorders its near-ties (the channels ranked within ±25 % of the cut) by predicted latency saved per MAC
    on the device of ``latency`` (``allocate.plan_near_ties``): at equal MACs, a plan predicted to run faster
    there (the ranking's own plan when that is predicted no slower).
    Within each group channels still leave lowest score first. Both predictions land in ``extra["latency"]``.

    ``normalize`` ("none" or "mean") overrides how global ranking compares groups: raw scores (Molchanov et
    al. 2019; Garg et al. 2023) let layers with large score scales keep their filters, "mean" divides each
    group's scores by their mean first.

    ``allocator="pagcp"`` (Ye et al. 2023, ``pruning/pagcp/``) needs ``target_macs`` (or a latency target: its
    rounds then cost trials in predicted milliseconds), ``data`` and ``losses``; ``pagcp`` holds its settings
    (``PAGCPSettings`` fields) and its report lands in ``extra["pagcp"]``.

    Pruning replaces Parameter objects: rebuild optimizers (and EMA, DDP wrappers) afterwards.
    """
    start = time.perf_counter()
    from ..utils.statedict import check_input_dtype

    check_input_dtype(model, example_inputs)
    name, value = _check_target(target_macs, target_params, channel_ratio, target_latency, target_latency_ms)
    lat_setting = LatencySetting.parse(latency)
    if allocator not in ("global", "layer", *LOOP_ALLOCATORS):
        known = ["global", "layer", *LOOP_ALLOCATORS]
        raise MTPruneInputError(f"allocator must be one of {known}, got {allocator!r}")
    if rank_by not in ("importance", "latency"):
        raise MTPruneInputError(f"rank_by must be 'importance' or 'latency', got {rank_by!r}")
    if rank_by == "latency" and (name != "target_macs" or allocator != "global"):
        raise MTPruneInputError(f"rank_by='latency' needs target_macs and allocator='global' (got {name}, "
                                f"allocator={allocator!r}); latency targets rank by latency already")
    crit = get_criterion(criterion, seed=seed) if isinstance(criterion, str) else criterion
    if crit.needs_data and (data is None or losses is None) and engine is None:
        raise MTPruneInputError(f"criterion {crit.name!r} needs gradients: pass data= and losses= to mtprune.prune")
    graph_kw = {"protected": tuple(protected), "parts": parts, "min_channels": 1}
    # the traced forward also counts every layer's MACs, for the cost model below
    graph = graph or PruningGraph(model, example_inputs, **graph_kw, record_layers=allocator not in LOOP_ALLOCATORS)
    if crit.needs_data and losses is not None and engine is None:
        check_all_losses(graph.tasks, losses, crit.name)
    ratios = dict(part_ratios or {})
    unknown = sorted(set(ratios) - {g.part for g in graph.groups})
    if unknown:
        raise MTPruneInputError(f"part_ratios names parts without prunable groups: {unknown}; parts: "
                                f"{sorted({g.part for g in graph.groups})}")
    bad = {k: v for k, v in ratios.items() if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1}
    if bad:
        raise MTPruneInputError(f"part_ratios must be fractions in [0, 1), got {bad}")
    if allocator in LOOP_ALLOCATORS:  # pagcp: allocation under per-task loss constraints (pruning/pagcp/)
        if not isinstance(round_to, int):
            raise MTPruneInputError(f"allocator {allocator!r} takes an int round_to, got {round_to!r}")
        return LOOP_ALLOCATORS[allocator](
            model, example_inputs, crit, target={name: value}, data=data, losses=losses, batches=batches,
            min_channels=min_channels, round_to=round_to, part_ratios=part_ratios, seed=seed, graph=graph,
            engine=engine, settings=pagcp, latency=lat_setting)
    cost = CostModel(model, example_inputs, graph)  # the traced forward's counts: trials are costed from widths
    params0, macs0 = cost.params_total, cost.macs_total
    widths0 = graph.widths()
    spec = {"auto": lambda: hardware_round_to(lat_setting), "measured": lambda: device_round_to(cost, lat_setting)
            }.get(round_to, lambda: round_to)() if isinstance(round_to, str) else round_to
    rounding = group_round_to(graph.groups, {n: s.kind for n, s in cost.layers.items()}, spec)
    if crit.needs_data and engine is None:
        engine = gather_statistics(model, graph, crit, data, losses, batches)
    scores = criterion_scores(model, graph, crit, engine=engine)
    if not scores:
        why = next(iter(graph.skipped.items()), None)
        if graph.groups and not any(crit.applies_to(g) for g in graph.groups):
            raise MTPruneInputError(f"criterion {crit.name!r} applies to none of this model's {len(graph.groups)} "
                                    f"channel groups ({crit.requirement}); choose another criterion")
        raise MTPruneInputError(f"criterion {crit.name!r} found no prunable channel group in this model" + (
            f"; no group can be pruned safely (e.g. {why[0]}: {why[1]})" if why else ""))
    if normalize not in (None, "none", "mean"):
        raise MTPruneInputError(f"normalize must be 'none' or 'mean', got {normalize!r}")
    plan_kw = {"mode": allocator, "normalize": normalize or crit.normalize, "min_channels": min_channels,
               "round_to": rounding, "part_ratios": part_ratios}
    extra: dict[str, object] = {"allocator": allocator}
    if isinstance(round_to, str):  # the per-kind blocks the device got ("auto": assumed, "measured": detected)
        extra["round_to"] = dict(spec) if isinstance(spec, Mapping) else spec
    if name == "channel_ratio":
        plan, fraction = plan_removal(graph.groups, scores, value, **plan_kw), value
    elif rank_by == "latency":  # target_macs (checked above): the ranking's near-ties reordered by latency
        ranked, _ = search_fraction(graph, scores, cost.macs, value * macs0, plan_kw, tolerance)
        lat = latency_model(model, example_inputs, cost, lat_setting)
        plan = plan_near_ties(graph.groups, scores, ranked, cost.tracker(lat.layer_cost), cost.tracker(cost.layer_macs),
                              cost.macs(ranked) - cost.other_macs, tolerance=tolerance, **plan_kw)
        if lat.predict(plan) >= lat.predict(ranked):  # the greedy found nothing faster: the ranking's plan
            plan = ranked
        fraction = sum(len(v) for v in plan.values()) / sum(g.channels for g in graph.groups if g.index in scores)
        extra["latency"] = {**lat.describe(), "predicted_ms": lat.predict(plan),
                            "predicted_ratio": lat.predict(plan) / lat.dense_ms,
                            "predicted_ratio_by_importance": lat.predict(ranked) / lat.dense_ms}
    elif name in ("target_macs", "target_params"):
        goal = value * (macs0 if name == "target_macs" else params0)
        plan, fraction = search_fraction(graph, scores, cost.macs if name == "target_macs" else cost.params, goal,
                                         plan_kw, tolerance)
    else:
        lat = latency_model(model, example_inputs, cost, lat_setting)
        goal = value * lat.dense_ms if name == "target_latency" else value

        def replan(ms: float) -> Plan:
            if allocator == "global":
                return plan_for_cost(graph.groups, scores, cost.tracker(lat.layer_cost), ms, tolerance=tolerance,
                                     **plan_kw)
            return search_fraction(graph, scores, lat.predict, ms, plan_kw, tolerance)[0]

        # real timings correct what the table misses: each pruned configuration is timed alongside the dense model
        timer = PairedTimer(model, example_inputs, lat_setting) if lat_setting.feedback and lat_setting.table is None \
            else None

        def measure(p: Plan) -> float:  # the ratio to the dense model, in ms on the goal's scale
            trial = copy.deepcopy(model)
            _apply(trial, example_inputs, _plan_by_root(graph, p), **graph_kw)
            t = timer(trial)
            return t["ratio"] * (lat.dense_ms if name == "target_latency" else t["reference_ms"])

        # the floor: every prunable layer at its minimum width; a goal below it is refused, not cut to the bone
        thinnest = plan_removal(graph.groups, scores, 1.0, **{**plan_kw, "mode": "layer"})
        floor = {"predicted_ms": lat.predict(thinnest)}
        if timer is not None:  # timed: thin layers' fixed costs are what the table knows least
            floor["measured_ms"] = measure(thinnest)
        check_floor(name, value, goal, floor, lat.dense_ms, min_channels)
        plan, trials = replan(goal), []
        if timer is not None:
            plan, trials = close_the_loop(goal, plan, replan, measure, lat_setting.feedback,
                                          floor_ms=floor["predicted_ms"],
                                          known=[(lat.dense_ms, lat.dense_ms), (floor["predicted_ms"],
                                                                                 floor["measured_ms"])])
        reached = next((t["measured_ms"] for t in trials if t.get("chosen")), lat.predict(plan))
        candidates: dict[str, object] = {}
        if timer is not None and lat_setting.macs_candidate and allocator == "global":
            def by_macs(macs: float) -> Plan:
                return search_fraction(graph, scores, cost.macs, macs, plan_kw, tolerance)[0]

            plan, reached, candidates = _against_macs_ranking(
                goal, (plan, reached), by_macs, measure, cost, scores, plan_kw["normalize"], lat_setting.feedback,
                known=[(macs0, lat.dense_ms), (cost.macs(thinnest), floor["measured_ms"])])
        fraction = sum(len(v) for v in plan.values()) / sum(g.channels for g in graph.groups if g.index in scores)
        predicted = lat.predict(plan)
        extra["latency"] = {**lat.describe(), "goal_ms": goal, "predicted_ms": predicted,
                            "predicted_ratio": predicted / lat.dense_ms, "feedback": trials,
                            "floor": {**floor, "predicted_ratio": floor["predicted_ms"] / lat.dense_ms},
                            **({"candidates": candidates} if candidates else {})}
        if abs(reached - goal) > max(10 * tolerance, 0.05) * goal:
            what = "measured" if trials else "predicted"
            warnings.warn(f"{name}={value} was not reached: the {what} latency is {reached:.3f} ms against "
                          f"{goal:.3f} ms (min_channels={min_channels}, protected layers and part_ratios limit the "
                          "removal)", stacklevel=2)
    extra["fraction"] = fraction
    graph = _apply(model, example_inputs, _plan_by_root(graph, plan), graph=graph)
    model.mtprune_input_shape = input_spec(example_inputs)
    # exact from widths (tests/test_cost_model.py), so no counting forward unless some MACs are not a layer's
    params1, macs1 = (cost.params(plan), cost.macs(plan)) if cost.exact else count(model, example_inputs)
    if name in ("target_macs", "target_params"):
        got = macs1 / macs0 if name == "target_macs" else params1 / params0
        if abs(got - value) > max(10 * tolerance, 0.05) * value:
            warnings.warn(f"{name}={value} was not reached: the pruned model keeps {got:.4f} of the original "
                          f"(min_channels={min_channels}, protected layers and part_ratios limit the removal)",
                          stacklevel=2)
    return PruneReport(
        criterion=crit.name, target={name: value}, params_before=params0, params_after=params1,
        macs_before=macs0, macs_after=macs1, widths_before=widths0, widths_after=graph.widths(),
        removed=sum(len(v) for v in plan.values()), seconds=time.perf_counter() - start,
        batches=engine.batches if engine is not None else 0,
        extra=extra,
    )
