"""``mfis``: merge T single-task networks by many-objective filter index sharing.

A reconstruction of Cheng, Wang, Ma, Liu & Wei, "Multi-task pruning via filter index sharing: a
many-objective optimization approach", Cognitive Computation 13(4):1070–1084, 2021. Only the abstract is
public; what we built from it is documented in METHODS.md §4 and in the modules of this package:

1. read the networks as chains, score every filter for its task (Taylor-FO or L1), and align the filter
   indices of the networks (:mod:`.stats`);
2. search the index matrices with NSGA-III (Deb & Jain 2014; Das–Dennis directions) against T + 2
   objectives (:mod:`.objectives`, :mod:`.solve`);
3. take the knee of the Pareto front (or the knee of the points within user bounds) and build the merged
   network (:mod:`.build`); fine-tune it with the ordinary multi-task trainer.

``run_from_config`` is the ``mtprune merge`` pipeline for ``merge.method: mfis``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtprune.config import DataConfig, ModelConfig, TrainSection, load_config, parse_config
from mtprune.utils.errors import MTPruneInputError

from ..chain import Chain, check_same_architecture, read_chain
from .budget import select_within_budget
from .build import MFISNet, build_mfis
from .encoding import decode, keep_counts, to_keep_sets
from .objectives import Landscape, evaluate, network_macs, subset_macs
from .report import MFISReport, sharing_table
from .solve import ParetoFront, select_solution, solve
from .stats import activation_alignment, build_landscape, default_loss, filter_importance, permute_chain

__all__ = ["MFISConfig", "MFISSearch", "load_mfis_config", "merge_method", "mfis", "mfis_search", "print_summary",
           "run_from_config"]


def _loss_of(losses: Mapping[str, Any] | None, task: str) -> Callable[[Tensor, Tensor], Tensor]:
    if losses is None or task not in losses:
        return default_loss
    fn = losses[task]
    return fn.loss if hasattr(fn, "loss") else fn


@dataclass
class MFISSearch:
    """The aligned networks, the objectives' statistics and the Pareto front; ``build(i)`` makes any front
    point into a network."""

    chains: dict[str, Chain]
    landscape: Landscape
    front: ParetoFront
    counts: list[int] | None
    alignment: list[float]
    settings: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def matrices(self, index: int) -> list[np.ndarray]:
        return decode(self.front.X[index], self.landscape.layout())

    def build(self, index: int) -> tuple[MFISNet, MFISReport]:
        """The merged network of front point ``index`` and its report."""
        land = self.landscape
        layout = land.layout()
        ev = evaluate(self.matrices(index), land)
        net = build_mfis(self.chains, self.matrices(index))
        tasks = list(land.tasks)
        settled = ev.settled.matrices(len(tasks))
        keys = ["+".join(c) for c in _subsets(tasks)]
        merged = {k: subset_macs(ev.settled, land, sum(1 << tasks.index(t) for t in k.split("+"))) for k in keys}
        single = {t: network_macs(land, i) for i, t in enumerate(tasks)}
        no_merge = {k: sum(single[t] for t in k.split("+")) for k in keys}
        report = MFISReport(
            tasks=tasks, layer_names=list(layout.names), widths=list(layout.widths), front=self.front, chosen=index,
            keep=to_keep_sets(settled, layout), sharing=sharing_table(settled, tasks, layout.names),
            dropped=ev.settled.dropped, subset_macs=merged, no_merge_macs=no_merge, alignment=self.alignment,
            settings=self.settings, seconds=time.perf_counter() - self.started)
        return net, report


def _subsets(tasks: Sequence[str]) -> list[tuple[str, ...]]:
    import itertools

    return [c for r in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, r)]


def mfis_search(models: Mapping[str, nn.Module], data: Any, *, importance: str = "taylor",
                align: str = "activations", rate: float | Sequence[float] | None = None, pop_size: int = 100,
                n_gen: int = 100, seed: int = 0, n_partitions: int | None = None, batch: int = 256,
                stats_batch_size: int = 32, losses: Mapping[str, Any] | None = None, flips_per_block: float = 0.5,
                quiet: bool = True, front: ParetoFront | None = None,
                search_state: str | Path | None = None) -> MFISSearch:
    """Steps 1–2 of :func:`mfis`: statistics, alignment and the NSGA-III search (arguments as there); a given
    ``front`` (of an earlier search with the same inputs) replaces the search."""
    from ..pam import collect_batch

    started = time.perf_counter()
    if not isinstance(models, Mapping) or len(models) < 2:
        raise MTPruneInputError("mfis needs a mapping of at least two task names to single-task networks")
    if align not in ("activations", "none"):
        raise MTPruneInputError(f"unknown align {align!r}; known: activations, none")
    tasks = list(models)
    first = next(iter(models.values()))
    param = next(first.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x, targets = collect_batch(data, tasks, batch, seed)
    x = x.to(device)
    copies = {t: copy.deepcopy(m).eval() for t, m in models.items()}  # the caller's networks stay as they are
    chains = {t: read_chain(t, m, x) for t, m in copies.items()}
    check_same_architecture(chains)
    imp = {t: filter_importance(chains[t], x, targets[t].to(device), method=importance, loss=_loss_of(losses, t),
                                batch_size=stats_batch_size) for t in tasks}
    if align == "activations":
        perms, quality = activation_alignment(chains, x)
        for t in tasks:
            permute_chain(chains[t], perms[t])
            imp[t] = [i[p] for i, p in zip(imp[t], perms[t], strict=True)]
    else:
        quality = []
    land = build_landscape(chains, imp, x)
    counts = keep_counts(land.layout(), rate)
    if front is None:
        front = solve(land, pop_size=pop_size, n_gen=n_gen, seed=seed, n_partitions=n_partitions, counts=counts,
                      flips_per_block=flips_per_block, quiet=quiet, checkpoint=search_state)
    settings = {"importance": importance, "align": align, "rate": rate, "batch": int(len(x)),
                "stats_batch_size": stats_batch_size, "seed": seed, **front.settings}
    return MFISSearch(chains, land, front, counts, quality, settings, started)


def mfis(models: Mapping[str, nn.Module], data: Any, *, importance: str = "taylor", align: str = "activations",
         rate: float | Sequence[float] | None = None, pop_size: int = 100, n_gen: int = 100, seed: int = 0,
         n_partitions: int | None = None, select: str | Mapping[str, float] = "knee", batch: int = 256,
         stats_batch_size: int = 32, losses: Mapping[str, Any] | None = None, flips_per_block: float = 0.5,
         quiet: bool = True, front: ParetoFront | None = None,
         search_state: str | Path | None = None) -> tuple[MFISNet, MFISReport]:
    """Merge single-task chain networks with MFIS (reconstruction of Cheng et al. 2021); returns
    ``(merged_model, report)``. Fine-tune the result with ``mtprune.engine.trainer.train``.

    Args:
        models: task name → single-task network (a one-head ``MultiTaskModel`` or an ``nn.Sequential`` chain),
            all of one architecture and of equal widths; T ≥ 2 (T ≥ 3 makes it many-objective). Left unchanged.
        data: samples ``(image, {task: target})``: a dataset, a loader or one ``(x, targets)`` batch; ``batch``
            of them are used for importance and alignment.
        importance: ``"taylor"`` (Taylor-FO on each task's own loss) or ``"l1"`` (filter weight norm).
        align: ``"activations"`` permutes each network's filters to match the first network's (see
            ``stats``); ``"none"`` shares filters by their trained indices.
        rate: a pre-specified pruning rate (one, or one per hidden layer): each task keeps exactly
            ``round((1 − rate) · F_l)`` filters per layer. None: adaptive.
        pop_size, n_gen, seed, n_partitions: NSGA-III settings (Das–Dennis partitions: the most that fit).
        select: ``"knee"`` or bounds ``{"max_macs": .., "max_loss": .., "max_dissimilarity": ..}``.
        losses: task → loss callable or ``Task`` for Taylor-FO (default: cross-entropy / BCE by target type).
        quiet: no progress bar.
        front: the Pareto front of an earlier search on the same networks and settings, to skip the search
            (``mtprune merge --resume``).
        search_state: a file for the NSGA-III state after each generation; a search that finds it continues
            from it, bit-identical to an uninterrupted one (``mtprune merge --resume``).

    The merged model returns ``{task: output}``; ``merged(x, tasks=[...])`` runs only what those tasks need.
    """
    search = mfis_search(models, data, importance=importance, align=align, rate=rate, pop_size=pop_size,
                         n_gen=n_gen, seed=seed, n_partitions=n_partitions, batch=batch,
                         stats_batch_size=stats_batch_size, losses=losses, flips_per_block=flips_per_block,
                         quiet=quiet, front=front, search_state=search_state)
    index = select_solution(search.front, select)
    net, report = search.build(index)
    net.train(any(m.training for m in models.values()))
    report.settings["select"] = select if isinstance(select, str) else dict(select)
    return net, report


# ---------------------------------------------------------------------------------------------------------------
# mtprune merge CONFIG (merge.method: mfis)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MFISBudgetSection(_Strict):
    """``select: budget``: try ``candidates`` front points cheapest first, keep the first within the budget."""

    accuracy_drop: float = Field(2.0, ge=0)  # points below each task's single-task network
    candidates: int = Field(6, ge=1)
    # ours: when no candidate is within the budget, fine-tune the nearest miss this many epochs more (0: never)
    rescue_epochs: int = Field(0, ge=0)


class MFISSection(_Strict):
    method: Literal["mfis"] = "mfis"
    importance: Literal["taylor", "l1"] = "taylor"
    align: Literal["activations", "none"] = "activations"
    rate: float | list[float] | None = None
    pop_size: int = Field(100, ge=4)
    generations: int = Field(100, ge=1)
    partitions: int | None = Field(None, ge=1)
    select: Literal["knee", "budget"] | dict[str, float] = "knee"
    budget: MFISBudgetSection | None = None  # select: budget (defaults when absent)
    batch: int = Field(256, ge=2)
    stats_batch_size: int = Field(32, ge=1)
    flips_per_block: float = Field(0.5, gt=0)
    singles: str | None = None  # a directory of <task>.mtp single-task networks to merge instead of training them
    finetune: TrainSection = Field(default_factory=lambda: TrainSection(epochs=4, batch_size=64, lr=1e-3,
                                                                        weight_decay=0.0))


class MFISCostSection(_Strict):
    latency: bool = True
    batch_size: int = Field(16, ge=1)
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=1)
    threads: int | None = Field(None, ge=1)


class MFISConfig(_Strict):
    name: str = "merge_mfis"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = Field(default_factory=lambda: DataConfig(name="multidigits", augment=False))
    tasks: list[str] = Field(default_factory=lambda: ["left", "right", "sum_parity"], min_length=2)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="lenet5"))
    train: TrainSection = Field(default_factory=lambda: TrainSection(epochs=8, batch_size=64, lr=2e-3))
    merge: MFISSection = Field(default_factory=MFISSection)
    cost: MFISCostSection = Field(default_factory=MFISCostSection)


def merge_method(path: str | Path, overrides: list[str] | None = None) -> str:
    """``merge.method`` of a merge config (``"pam"`` when absent), for ``mtprune merge`` to dispatch on."""
    import yaml

    from mtprune.config import apply_overrides

    path = Path(path)
    if not path.is_file():
        raise MTPruneInputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise MTPruneInputError(f"{path}: not valid YAML ({err.__class__.__name__}: {err})") from None
    raw = apply_overrides(raw if isinstance(raw, dict) else {}, list(overrides or []))
    merge = raw.get("merge") if isinstance(raw.get("merge"), dict) else {}
    return str(merge.get("method", "pam"))


def print_summary(summary: Mapping[str, Any]) -> None:
    """The cost and accuracy table of a ``run_from_config`` summary, on the terminal."""
    from rich.table import Table

    from mtprune.utils.console import console

    table = Table(title=f"{summary['name']}: MFIS against no merging (MMACs per sample; accuracy after fine-tuning)")
    for col in ("subset", "no merging", "MFIS", "no merging / MFIS", "single-task acc", "MFIS acc"):
        table.add_column(col, justify="left" if col == "subset" else "right")
    for row in summary["table"]:
        tasks = row["subset"].split("+")
        table.add_row(row["subset"], f"{row['no_merge_macs'] / 1e6:.3f}", f"{row['mfis_macs'] / 1e6:.3f}",
                      f"{row['no_merge_over_mfis']:.2f}×",
                      ", ".join(f"{summary['reference_acc'][t]:.1f}" for t in tasks),
                      ", ".join(f"{summary['acc_after_finetune'][t]:.1f}" for t in tasks))
    console().print(table)


def load_mfis_config(path: str | Path, overrides: list[str] | None = None) -> MFISConfig:
    """Read, override (``--set key=value``) and validate an MFIS merge config."""
    return load_config(path, overrides, schema=MFISConfig)


def _save_front(path: Path, front: ParetoFront) -> None:
    """The search's result, atomically, as a weights-only checkpoint (no pickle): resuming skips the search."""
    from mtprune.engine.checkpoint import save_checkpoint

    save_checkpoint(path, {"kind": "mfis-front", "X": torch.from_numpy(np.ascontiguousarray(front.X)),
                           "F": torch.from_numpy(np.ascontiguousarray(front.F)), "names": list(front.names),
                           "seconds": front.seconds, "settings": json.dumps(front.settings),
                           "history": json.dumps(front.history)})


def _load_front(path: Path) -> ParetoFront:
    from mtprune.engine.checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    try:
        if payload.get("kind") != "mfis-front":
            raise ValueError(f"a {payload.get('kind')!r} checkpoint")
        return ParetoFront(payload["X"].numpy(), payload["F"].numpy(), list(payload["names"]),
                           float(payload["seconds"]), json.loads(payload["settings"]), json.loads(payload["history"]))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MTPruneInputError(f"{path}: not the Pareto front of an MFIS search; cannot resume from it "
                                f"({type(err).__name__}: {err})") from err


def _train_config(section: TrainSection, cfg: MFISConfig, quiet: bool, where: Path, resume: bool = False) -> Any:
    from mtprune.engine.trainer import TrainConfig

    return TrainConfig(epochs=section.epochs, batch_size=section.batch_size, eval_batch_size=section.eval_batch_size,
                       lr=section.lr, weight_decay=section.weight_decay, optimizer=section.optimizer,
                       momentum=section.momentum, scheduler=section.scheduler, step_size=section.step_size,
                       gamma=section.gamma, device=cfg.device, amp=False, seed=cfg.seed,
                       num_workers=section.num_workers, grad_clip=section.grad_clip, quiet=quiet, tensorboard=False,
                       resume=resume and (where / "checkpoints").is_dir())


def run_from_config(cfg_dict: Mapping[str, Any] | MFISConfig, run_dir: str | Path,
                    quiet: bool = False, resume: bool = False) -> dict[str, Any]:
    """The ``mtprune merge`` pipeline for MFIS, in ``run_dir``; returns the summary (also ``summary.json``).

    1. Train T single-task networks (the config's zoo model, one head each; seeds ``seed + i``), saved as
       ``singles/<task>.mtp``; or load them from ``merge.singles`` (such a directory).
    2. :func:`mfis` on the training split; accuracy right after merging.
    3. Fine-tune the merged network jointly (``merge.finetune``); accuracy again.
    4. MACs and latency of every task subset, against no merging (``merging.cost``); the analytic MACs of the
       objectives are checked against ``mtprune.profile``.
    5. ``report.md``, ``summary.json``, ``plots/`` (Pareto front, cost per subset) and ``mfis.mtp``.

    ``resume``: continue a killed run in ``run_dir``. Trainings continue from their last epoch's checkpoint; the
    Pareto front, saved once found (``search.pt``), is not searched again; a search killed before that continues
    from its last generation (``search_state.pt``), bit-identically; the rest is deterministic and redone.
    """
    from mtprune import data as data_mod
    from mtprune.config import dump_config
    from mtprune.engine.evaluate import evaluate as evaluate_model
    from mtprune.engine.logging import log
    from mtprune.engine.trainer import train
    from mtprune.io import load, save
    from mtprune.models import build_model
    from mtprune.utils.atomic import atomic_write_json, atomic_write_text
    from mtprune.utils.runtime import resolve_device, seed_everything

    from ..cost import cost_table, costs_to_dict, merged_costs, plot_costs, separate_costs
    from ..experiment import tasks_of
    from ..subsets import deploy_costs
    from .report import plot_front

    started = time.perf_counter()
    cfg = cfg_dict if isinstance(cfg_dict, MFISConfig) else parse_config(dict(cfg_dict), "config", MFISConfig)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.cost.threads:
        torch.set_num_threads(cfg.cost.threads)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    d = cfg.data
    train_set = data_mod.load(d.name, root=d.root, split=d.train_split, tasks=cfg.tasks, **d.kwargs)
    val_set = data_mod.load(d.name, root=d.root, split=d.val_split, tasks=cfg.tasks, **d.kwargs)
    tasks = tasks_of(train_set, cfg.tasks)
    device = resolve_device(cfg.device)
    example = train_set[0][0][None]
    names = list(tasks)

    def score(model: nn.Module, which: Mapping[str, Any]) -> dict[str, float]:
        metrics = evaluate_model(model, val_set, dict(which), device=device, batch_size=cfg.train.eval_batch_size)
        return {t: float(metrics[t]["acc"]) for t in which}

    singles: dict[str, nn.Module] = {}
    for i, t in enumerate(names):
        if cfg.merge.singles:
            singles[t] = load(Path(cfg.merge.singles) / f"{t}.mtp")
            continue
        seed_everything(cfg.seed + i)
        singles[t] = build_model(cfg.model.name, {t: tasks[t].out_channels}, width=cfg.model.width,
                                 head=cfg.model.head, head_kwargs=cfg.model.head_kwargs or None, **cfg.model.kwargs)
        if cfg.train.epochs > 0:
            where = run_dir / "singles" / t
            opts = _train_config(cfg.train, cfg, quiet, where, resume)
            train(singles[t], {t: tasks[t]}, train_set, val_set, where, opts)
        singles[t].cpu()
        save(singles[t], run_dir / "singles" / f"{t}.mtp", example_inputs=example)
    reference = {t: score(singles[t], {t: tasks[t]})[t] for t in names}
    log.info("single-task accuracy: %s", reference)

    m = cfg.merge
    search_path = run_dir / "search.pt"
    state_path = run_dir / "search_state.pt"
    front = _load_front(search_path) if resume and search_path.is_file() else None
    if not resume:
        state_path.unlink(missing_ok=True)  # a fresh run searches from the start
    search = mfis_search(singles, train_set, importance=m.importance, align=m.align, rate=m.rate,
                         pop_size=m.pop_size, n_gen=m.generations, seed=cfg.seed, n_partitions=m.partitions,
                         batch=m.batch, stats_batch_size=m.stats_batch_size, losses=tasks,
                         flips_per_block=m.flips_per_block, quiet=quiet, front=front, search_state=state_path)
    if front is None:
        _save_front(search_path, search.front)
    state_path.unlink(missing_ok=True)  # the front replaces it

    def finetune(net: nn.Module, where: Path) -> None:
        if m.finetune.epochs > 0:
            train(net, dict(tasks), train_set, val_set, where, _train_config(m.finetune, cfg, quiet, where, resume))
        net.cpu().eval()

    def rescue(net: nn.Module, epochs: int) -> None:  # the nearest miss, trained further on the same schedule
        where = run_dir / "finetune" / "rescue"
        section = m.finetune.model_copy(update={"epochs": epochs})
        train(net, dict(tasks), train_set, val_set, where, _train_config(section, cfg, quiet, where, resume))
        net.cpu().eval()

    budget_info: dict[str, Any] | None = None
    if m.select == "budget":
        b = m.budget or MFISBudgetSection()
        choice = select_within_budget(
            search.front, lambda i: search.build(i)[0], lambda net: score(net, tasks),
            lambda net, k: finetune(net, run_dir / "finetune" / f"trial{k}"), reference, b.accuracy_drop,
            b.candidates, rescue=(lambda net: rescue(net, b.rescue_epochs)) if b.rescue_epochs else None)
        merged, report = choice.net, search.build(choice.index)[1]
        acc_merged, acc_finetuned = choice.acc_at_merge, choice.acc
        budget_info = {"accuracy_drop": b.accuracy_drop, "candidates": b.candidates,
                       "within_budget": choice.within_budget, "trials": choice.trials,
                       **({"rescue_epochs": b.rescue_epochs} if b.rescue_epochs else {})}
    else:
        index = select_solution(search.front, m.select)
        merged, report = search.build(index)
        acc_merged = score(merged, tasks)
        finetune(merged, run_dir / "finetune")
        acc_finetuned = score(merged, tasks)
    report.settings["select"] = m.select if isinstance(m.select, str) else dict(m.select)

    x = example.expand(cfg.cost.batch_size, *example.shape[1:]).contiguous()
    kw = {"latency": cfg.cost.latency, "warmup": cfg.cost.warmup, "repeats": cfg.cost.repeats}
    costs = {"no_merge": separate_costs(singles, x, **kw), "mfis": merged_costs(merged, x, **kw)}
    mismatch = {k: (c.macs, report.subset_macs[k]) for k, c in costs["mfis"].items()
                if c.macs != report.subset_macs[k]}
    if mismatch:  # the objectives' cost model and the built network disagree: a bug, say so loudly
        raise RuntimeError(f"MFIS analytic MACs differ from the measured ones: {mismatch}")
    deploy = deploy_costs(merged, x, costs["mfis"], **kw)  # each subset as its own model: MACs must match
    table = cost_table(costs)
    plots = [str(p.relative_to(run_dir)) for p in plot_front(report.front, report.chosen, run_dir / "plots" / "pareto")]
    cost_png = plot_costs(costs, run_dir / "plots" / "cost_per_subset.png", title=f"{cfg.name}: cost per task subset")
    plots.append(str(cost_png.relative_to(run_dir)))
    save(merged, run_dir / "mfis.mtp", example_inputs=example, extra={"mfis": merged.structure()})
    summary = {
        "name": cfg.name, "tasks": names, "reference_acc": reference, "acc_at_merge": acc_merged,
        "acc_after_finetune": acc_finetuned, "budget": budget_info, "mfis": report.to_dict(),
        "costs": costs_to_dict(costs), "table": table, "mfis_deploy": deploy,
        "solver_seconds": report.front.seconds, "seconds": time.perf_counter() - started,
        "setting": {"latency_batch_size": cfg.cost.batch_size, "threads": torch.get_num_threads(),
                    "device": str(device)},
    }
    atomic_write_json(run_dir / "summary.json", summary)
    accuracy = {"single-task acc": reference, "MFIS acc (merged)": acc_merged, "MFIS acc (fine-tuned)": acc_finetuned}
    text = [f"# {cfg.name}: MFIS vs no merging", "",
            "Accuracy per task (%), and MMACs per sample of every task subset; latency in `summary.json`.", "",
            report.markdown(accuracy, plots)]
    atomic_write_text(run_dir / "report.md", "\n".join(text))
    return summary
