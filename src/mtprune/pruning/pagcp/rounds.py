"""PAGCP's rounds (Ye et al., TPAMI 2023): probe and allocate, prune physically, fine-tune, repeat; resumable.

- :func:`pagcp`: the rounds on a model in memory; ``prior`` continues a run from the report of its finished
  rounds, and each round's randomness depends on ``(seed, round)`` only, so a resumed run decides exactly as an
  uninterrupted one.
- :func:`prune_pagcp`: ``mtprune.prune(..., allocator="pagcp")`` (registered with ``prune.LOOP_ALLOCATORS``).
- :func:`pagcp_schedule`: the pipeline's PAGCP, with a run directory: each round's model and ``pagcp.json`` are
  saved, and ``resume=True`` goes on after the last saved round.

Rounds repeat ``rounds`` times or until ``target_macs`` is reached; the round that would overshoot removes only
a prefix of its planned channels (``fit_to_target``). With ``target_latency`` / ``target_latency_ms`` instead,
every MACs figure of a round's allocation (layer order, ranking, fitting, stopping) is a predicted latency
(``latency.py``: :class:`LatencyCost`, on the latency table of ``pruning/latency.py``). Scores are computed
once per round, on the model physically pruned so far. MACs of trials come from :class:`MacsModel` (exact for
the conv/linear MACs mtprune counts); each round's estimate is recorded next to the measured value.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ...engine.checkpoint import load_model_state
from ...engine.evaluate import evaluate
from ...engine.logging import progress_line
from ...engine.trainer import TrainConfig, Trainer
from ...io import load as load_model
from ...io import save as save_model
from ...utils.atomic import atomic_write_json
from ...utils.errors import MTPruneInputError
from ...utils.inputs import input_spec
from ...utils.runtime import eval_mode, resolve_device
from ..attention import head_layout
from ..criteria import Criterion, get_criterion
from ..graph import PruningGraph
from ..latency import LatencySetting, model_latency
from ..prune import LOOP_ALLOCATORS, PruneReport, count, criterion_scores
from ..schedule import StepRecord, step_line
from .allocation import probe_round, select_top, select_within_budget
from .latency import LatencyCost
from .macs import MacsModel
from .probe import LossProbe
from .report import PAGCPReport, RoundRecord
from .settings import PAGCPSettings


def _reached(record: RoundRecord) -> float:
    """What a round's target is checked against: its predicted latency (ms) with a latency target, else MACs."""
    return record.macs_after if record.latency_after_ms is None else record.latency_after_ms


def _finished(record: RoundRecord, goal: float | None, tolerance: float) -> bool:
    """No round follows ``record``: it removed nothing, or the target (MACs or latency) is reached."""
    return not record.removed or (goal is not None and _reached(record) <= goal * (1 + tolerance))


def _latency_target(target_macs: float | None, target_latency: float | None,
                    target_latency_ms: float | None) -> tuple[str, float] | None:
    """The latency target given (name, value), ``None`` for a MACs target; more than one target is refused."""
    given = {k: v for k, v in {"target_macs": target_macs, "target_latency": target_latency,
                                "target_latency_ms": target_latency_ms}.items() if v is not None}
    if len(given) > 1:
        raise MTPruneInputError(f"pagcp: give at most one of target_macs, target_latency, target_latency_ms "
                                f"(got {sorted(given)})")
    if target_latency is not None and not 0 < target_latency < 1:
        raise MTPruneInputError(f"target_latency must be in (0, 1), got {target_latency}")
    if target_latency_ms is not None and not 0 < target_latency_ms < float("inf"):
        raise MTPruneInputError(f"target_latency_ms must be a positive number of milliseconds, got {target_latency_ms}")
    return next(((k, float(v)) for k, v in given.items() if k != "target_macs"), None)


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global torch RNG (CPU) seeded with ``seed`` inside, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pagcp(model: nn.Module, example_inputs: Tensor, criterion: str | Criterion = "l1", *, data: Iterable | None,
          losses: Mapping[str, Callable], target_macs: float | None = None,
          settings: PAGCPSettings | Mapping[str, Any] | None = None, probe_data: Iterable | None = None,
          min_channels: int = 5, stats_batches: int | None = 8, seed: int = 0, protected: Iterable[str] = (),
          parts: Mapping[str, str] | None = None, graph: PruningGraph | None = None, engine: Any = None,
          finetune: Callable[[nn.Module, int], None] | None = None,
          round_data: Callable[[int], Iterable] | None = None, prior: PAGCPReport | None = None,
          on_round: Callable[[nn.Module, PAGCPReport], None] | None = None,
          target_latency: float | None = None, target_latency_ms: float | None = None,
          latency: LatencySetting | Mapping[str, Any] | None = None,
          exclude_parts: Iterable[str] = ()) -> tuple[PAGCPReport, PruningGraph]:
    """Prune ``model`` in place with PAGCP (Ye et al., TPAMI 2023). Returns the report and the final graph.

    Args:
        data: batches ``(images, {task: target})`` for the criterion's statistics (if it needs any) and, unless
            ``probe_data`` is given, for the held-out probe set (its first ``held_out_batches`` batches).
        losses: task → loss callable (or ``Task``); every constrained task's loss must be positive.
        target_macs: stop once the MACs are at most this fraction of the original (within ``tolerance``);
            ``None`` runs ``settings.rounds`` rounds (or until no group can be pruned within the budget).
        finetune: called as ``finetune(model, round)`` after each round that is followed by another one.
        round_data: ``round_data(r)`` gives round ``r``'s statistics batches instead of ``data``.
        prior: the report of the rounds already run on ``model`` (a resumed run): continue with the next round,
            against the original MACs and params it recorded.
        on_round: called as ``on_round(model, report)`` after each round and the fine-tuning that follows it.
        exclude_parts: parts (``ChannelGroup.part``, e.g. the task heads) whose filters are never candidates.
        target_latency, target_latency_ms: instead of ``target_macs``, a predicted latency (a fraction of the
            dense model's, or milliseconds) on the device of ``latency`` (see ``mtprune.prune``); the rounds then
            order, rank and fit by milliseconds (:class:`LatencyCost`), and ``report.latency`` records them.
    Each round draws from the global torch RNG seeded by ``(seed, round)`` only (restored afterwards), so a run
    resumed at round ``k`` decides exactly as an uninterrupted one.
    Pruning replaces Parameter objects: rebuild optimizers afterwards.
    """
    start_time = time.perf_counter()
    cfg = PAGCPSettings.of(settings)
    if data is None and probe_data is None:
        raise ValueError("pagcp needs held-out data and losses: pass data= (or probe_data=) and losses=")
    if not losses:
        raise ValueError("pagcp needs losses= (task → loss): its constraint is on every task's loss")
    if target_macs is not None and not 0 < target_macs < 1:
        raise MTPruneInputError(f"target_macs must be in (0, 1), got {target_macs}")
    lat_target = _latency_target(target_macs, target_latency, target_latency_ms)
    lat_setting = LatencySetting.parse(latency) if lat_target is not None else None
    crit = get_criterion(criterion, seed=seed) if isinstance(criterion, str) else criterion
    losses = {t: getattr(fn, "loss", fn) for t, fn in losses.items()}
    graph = graph or PruningGraph(model, example_inputs, protected=tuple(protected), parts=parts, min_channels=1)
    if prior is None:
        params0, macs0 = count(model, example_inputs)
        report = PAGCPReport(crit.name, asdict(cfg), target_macs, macs0, params0, macs0, params0)
        if lat_target is not None:
            dense_ms = model_latency(model, example_inputs, lat_setting)
            name, value = lat_target
            report.latency = {"target": {name: value}, "dense_ms": dense_ms, "predicted_ms": dense_ms,
                              "goal_ms": value * dense_ms if name == "target_latency" else value}
    else:
        report = dataclasses.replace(prior, rounds=list(prior.rounds))
        before = None if report.latency is None else tuple(report.latency["target"].items())[0]
        if (report.target_macs != target_macs or before != lat_target
                or _plain(report.settings) != _plain(asdict(cfg))):
            raise MTPruneInputError("pagcp: cannot resume with other settings or another target")
    macs0, seconds0 = report.macs_before, report.seconds
    goal = None if target_macs is None else target_macs * macs0
    if report.latency is not None:
        goal = report.latency["goal_ms"]
    with _seeded(seed):
        probe = LossProbe(model, probe_data if probe_data is not None else data, losses, cfg.held_out_batches,
                          cfg.cache)
    first = len(report.rounds)
    if report.rounds and _finished(report.rounds[-1], goal, cfg.tolerance):
        first = cfg.rounds  # the prior run ended
    for r in range(first, cfg.rounds):
        with _seeded(seed * 1_000_003 + r):
            record = _one_round(model, example_inputs, graph, crit, probe, cfg, r,
                                data if round_data is None else round_data(r), losses, stats_batches,
                                engine if r == 0 else None, min_channels, goal, lat_setting, frozenset(exclude_parts))
        report.rounds.append(record)
        report.macs_after, report.params_after = record.macs_after, record.params_after
        if report.latency is not None:
            report.latency["predicted_ms"] = record.latency_after_ms
        last = _finished(record, goal, cfg.tolerance) or r == cfg.rounds - 1
        if not last and finetune is not None:
            finetune(model, r)
        report.seconds = seconds0 + time.perf_counter() - start_time
        if on_round is not None:
            on_round(model, report)
        if last:
            break
    if goal is not None:
        if report.latency is not None:
            got, what = report.latency["predicted_ms"], "latency (predicted)"
            (name, value), = report.latency["target"].items()
            report.latency["predicted_ratio"] = got / report.latency["dense_ms"]
        else:
            got, what, name, value = report.macs_after, "MACs", "target_macs", target_macs
        report.reached = abs(got - goal) <= cfg.tolerance * goal
        if not report.reached:
            warnings.warn(f"pagcp: {name}={value} was not reached: the model keeps {got / goal * value:.4g} "
                          f"{'ms' if name == 'target_latency_ms' else 'of the original'} {what} after "
                          f"{len(report.rounds)} round(s) (budget={cfg.budget} per round, rounds={cfg.rounds}, "
                          f"min_channels={min_channels})", stacklevel=2)
    report.seconds = seconds0 + time.perf_counter() - start_time
    return report, graph


def _one_round(model: nn.Module, example_inputs: Tensor, graph: PruningGraph, crit: Criterion, probe: LossProbe,
               cfg: PAGCPSettings, r: int, data: Iterable | None, losses: Mapping, stats_batches: int | None,
               engine: Any, min_channels: int, goal: float | None,
               latency: LatencySetting | None = None, excluded: frozenset[str] = frozenset()) -> RoundRecord:
    t0, forwards0 = time.perf_counter(), probe.forwards
    probe.refresh()
    params_before, macs_before = count(model, example_inputs)
    with eval_mode(model):
        scores = criterion_scores(model, graph, crit, data=data, losses=losses, batches=stats_batches,
                                  engine=engine, exclude_parts=excluded)
        # the round's cost: MACs, or with a latency target (goal in ms) the predicted latency
        macs = MacsModel(model, example_inputs) if latency is None else LatencyCost(model, example_inputs, graph,
                                                                                   latency)
        layers, start, lam = probe_round(graph, scores, probe, macs, cfg, min_channels)
        selected = select_top(layers, cfg.top_p, cfg.ranking)
        plan, ratios, dropped, fitted = select_within_budget(probe, graph, selected, start, cfg.budget, macs, goal,
                                                            cfg.ranking)
    chosen = set(plan)
    for layer in layers:
        layer.selected = layer.index in chosen
    estimated = macs.after(graph.groups, plan)
    timing = {} if latency is None else {"latency_before_ms": macs.total, "latency_after_ms": estimated}
    estimated = macs.macs(plan) if latency is not None else estimated
    removed = {graph.groups[gi].root: len(idx) for gi, idx in plan.items()}
    fractions = {graph.groups[gi].root: len(idx) / graph.groups[gi].channels for gi, idx in plan.items()}
    graph.prune({gi: sorted(idx) for gi, idx in plan.items()})
    params_after, macs_after = count(model, example_inputs)
    return RoundRecord(
        round=r, theta0=layers[0].theta if layers else cfg.budget - 1, lam=lam, budget=cfg.budget,
        reference_loss=start, layers=layers, removed=removed, ratios=fractions, loss_ratio=ratios, dropped=dropped,
        fitted=fitted, macs_before=macs_before, macs_after=macs_after, macs_estimated=estimated,
        params_before=params_before, params_after=params_after, forwards=probe.forwards - forwards0,
        seconds=time.perf_counter() - t0, **timing)


# ---------------------------------------------------------------- entry points: mtprune.prune and the pipeline
def prune_pagcp(model: nn.Module, example_inputs: Tensor, criterion: Criterion, *, target: Mapping[str, float],
                data: Iterable | None, losses: Mapping | None, batches: int | None = 8, min_channels: int = 5,
                round_to: int = 1, part_ratios: Mapping[str, float] | None = None, seed: int = 0,
                graph: PruningGraph | None = None, engine: Any = None, settings: Any = None,
                probe_data: Iterable | None = None, latency: LatencySetting | Mapping[str, Any] | None = None):
    """``mtprune.prune(..., allocator="pagcp")``: PAGCP to ``target_macs``, ``target_latency`` or
    ``target_latency_ms`` (on the device of ``latency``); the report is in ``extra["pagcp"]``, and with a latency
    target the prediction in ``extra["latency"]`` too."""
    start = time.perf_counter()
    targets = ("target_macs", "target_latency", "target_latency_ms")
    if len(target) != 1 or not set(target) <= set(targets):
        raise MTPruneInputError(f"allocator 'pagcp' prunes to a MACs or latency target: give one of {list(targets)} "
                                f"(got {sorted(target)})")
    if round_to != 1 or any(v != 0 for v in (part_ratios or {}).values()):
        raise MTPruneInputError("allocator 'pagcp' allocates per layer itself: round_to does not apply, and "
                                "part_ratios only as 0 (a part left out of the candidates)")
    if data is None or losses is None:
        raise ValueError("allocator 'pagcp' measures every task's loss: pass data= and losses= to mtprune.prune")
    graph = graph or PruningGraph(model, example_inputs, min_channels=1)
    widths0 = graph.widths()
    report, graph = pagcp(model, example_inputs, criterion, data=data, losses=losses,
                          target_macs=target.get("target_macs"), settings=settings, probe_data=probe_data,
                          min_channels=min_channels, stats_batches=batches, seed=seed, graph=graph, engine=engine,
                          target_latency=target.get("target_latency"),
                          target_latency_ms=target.get("target_latency_ms"), latency=latency,
                          exclude_parts=[part for part, v in (part_ratios or {}).items() if v == 0])
    model.mtprune_input_shape = input_spec(example_inputs)
    return PruneReport(
        criterion=criterion.name, target=dict(target), params_before=report.params_before,
        params_after=report.params_after, macs_before=report.macs_before, macs_after=report.macs_after,
        widths_before=widths0, widths_after=graph.widths(),
        removed=sum(sum(r.removed.values()) for r in report.rounds), seconds=time.perf_counter() - start,
        batches=engine.batches if engine is not None else 0,
        extra={"allocator": "pagcp", "pagcp": report.to_dict(),
               **({} if report.latency is None else {"latency": dict(report.latency)})})


def _write_state(path: Path, records: list, report: PAGCPReport | None) -> None:
    atomic_write_json(path, {"records": [asdict(r) for r in records],
                             "report": None if report is None else report.to_dict()})


def _read_state(path: Path) -> tuple[list, PAGCPReport | None] | None:
    """``(step records, report of the completed rounds)`` from a schedule's state file; ``None`` if absent."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        report = None if state["report"] is None else PAGCPReport.from_dict(state["report"])
        return [StepRecord(**r) for r in state["records"]], report
    except (ValueError, KeyError, TypeError) as err:
        raise MTPruneInputError(f"{path}: corrupt PAGCP state ({err})") from None


def pagcp_schedule(model: nn.Module, example_inputs: Tensor, tasks: Mapping[str, Any], train_set: Any,
                   val_set: Any, run_dir: str | Path, *, criterion: str | Criterion = "l1",
                   target_macs: float | None = None, settings: Any = None, finetune: Any = None,
                   stats_batches: int = 8, stats_batch_size: int = 8, min_channels: int = 5,
                   seed: int = 0, resume: bool = False,
                   rebuild: Callable[[], nn.Module] | None = None, target_latency: float | None = None,
                   target_latency_ms: float | None = None,
                   latency: Any = None) -> tuple[nn.Module, list, dict[str, Any]]:
    """The pipeline's PAGCP: rounds with fine-tuning in between (``finetune``: a ``TrainConfig``), then a final
    fine-tune. The probe set is a seeded draw of ``held_out_batches`` batches of ``val_set``; round ``r``'s
    statistics come from ``train_set`` shuffled by ``seed + r``. Returns the model, one ``StepRecord`` per
    round, and the PAGCP report as a dict.

    After each round (and its fine-tuning) the model is saved as ``rounds/<r>/model.mtp`` (``r`` counts from 1)
    and the records as ``pagcp.json``; ``resume=True`` continues after the last saved round, and each
    fine-tuning from its own checkpoint. ``rebuild`` makes the unpruned model to load into (default: zoo models
    from the file's metadata). ``target_latency`` / ``target_latency_ms`` with ``latency`` (a ``LatencySetting``
    or its fields) replace ``target_macs`` as in :func:`pagcp`.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / "pagcp.json"
    finetune = finetune or TrainConfig(epochs=0)
    device = resolve_device(finetune.device)
    home = next(model.parameters()).device
    state = _read_state(state_path) if resume else None
    prior = state[1] if state else None
    if prior is not None and prior.rounds:
        saved = run_dir / "rounds" / str(len(prior.rounds)) / "model.mtp"
        model = load_model(saved, base=rebuild() if rebuild is not None else None)
    model.to(device)
    x = example_inputs.to(device)
    loader = lambda ds, s: DataLoader(ds, batch_size=stats_batch_size, shuffle=True,  # noqa: E731
                                      generator=torch.Generator().manual_seed(s))
    eval_bs = finetune.eval_batch_size or finetune.batch_size

    def record(step: int) -> StepRecord:
        params, macs = count(model, x)
        metrics = evaluate(model, val_set, tasks, device=device, batch_size=eval_bs)
        return StepRecord(step, params, macs, metrics, PruningGraph(model, x).widths(), heads=head_layout(model))

    def train(step_dir: Path) -> None:
        if finetune.epochs <= 0:
            return
        cfg = dataclasses.replace(finetune, resume=resume and (step_dir / "checkpoints").is_dir())
        summary = Trainer(model, tasks, train_set, val_set, step_dir, cfg).fit()
        if summary.best_checkpoint:
            load_model_state(model, summary.best_checkpoint)
        model.to(device)

    if state:
        records = state[0]
    else:
        records = [record(0)]
        _write_state(state_path, records, None)

    rounds = PAGCPSettings.of(settings).rounds

    def between(m: nn.Module, r: int) -> None:
        train(run_dir / "rounds" / str(r + 1))
        records.append(record(r + 1))
        if not finetune.quiet:  # off a terminal: one progress line per round (engine/logging.py)
            progress_line(step_line("pagcp round", records[-1], records[0], rounds))

    def save_round(m: nn.Module, report: PAGCPReport) -> None:
        save_model(m, run_dir / "rounds" / str(len(report.rounds)) / "model.mtp", example_inputs=example_inputs)
        _write_state(state_path, records, report)

    report, _ = pagcp(model, x, criterion, data=None, round_data=lambda r: loader(train_set, seed + r),
                      losses=tasks, target_macs=target_macs, settings=settings, probe_data=loader(val_set, seed + 1),
                      min_channels=min_channels, stats_batches=stats_batches, seed=seed, finetune=between,
                      prior=prior, on_round=save_round, target_latency=target_latency,
                      target_latency_ms=target_latency_ms, latency=latency)
    train(run_dir / "finetune")
    records.append(record(len(report.rounds)))
    if not finetune.quiet:
        progress_line(step_line("pagcp round", records[-1], records[0], rounds))
    model.to(home)
    model.mtprune_input_shape = input_spec(example_inputs)
    return model, records, report.to_dict()


LOOP_ALLOCATORS["pagcp"] = prune_pagcp  # mtprune.prune(..., allocator="pagcp")
