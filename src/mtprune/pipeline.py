"""The compression pipeline behind ``mtprune prune`` and ``mtprune demo``:

dense model (trained here, or given) → prune on a schedule with fine-tuning → optionally retrain the pruned
architecture from scratch → evaluate and profile every model side by side → ``model.mtp``, ``summary.json``,
``report.md`` and plots. Every stage is resumable: the trainer and the schedules checkpoint their units.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import recipe
from .config import PruneSection, RunConfig, TrainSection, dump_config
from .engine.checkpoint import load_model_state
from .engine.evaluate import evaluate
from .engine.trainer import Trainer
from .io import load as load_model
from .io import save as save_model
from .measure import profile
from .pruning.attention import head_layout
from .pruning.criteria import Criterion
from .pruning.graph import PruningGraph
from .pruning.prune import as_losses, prune
from .pruning.schedule import StepRecord, interleaved_prune, iterative_prune, rebuild_from_widths
from .report.run_report import write_run_report
from .tasks.delta_m import delta_m_or_none
from .utils.atomic import atomic_write_json, atomic_write_text
from .utils.errors import MTPruneInputError


def _section_config(cfg: RunConfig, section: TrainSection, *, quiet: bool, resume: bool):
    return recipe.train_options(cfg.model_copy(update={"train": section}), quiet=quiet, resume=resume)


def _load_best(model: nn.Module, run_dir: Path) -> None:
    path = run_dir / "checkpoints" / "best.pt"
    if not path.is_file():
        raise MTPruneInputError(f"{run_dir}: no checkpoints/best.pt")
    load_model_state(model, path)  # weights_only; a damaged or foreign file is an input error naming it


def _dense_model(cfg: RunConfig, tasks, train_set, val_set, run_dir: Path, quiet: bool, resume: bool):
    """The dense model, and the metrics of its random initialisation when it is trained here."""
    start = cfg.prune.start
    model = recipe.build_configured_model(cfg, tasks)
    untrained = None
    if start is None:
        untrained = evaluate(model, val_set, tasks, device=cfg.device, batch_size=cfg.train.eval_batch_size)
        dense_dir = run_dir / "dense"
        opts = recipe.train_options(cfg, quiet=quiet, resume=resume and (dense_dir / "checkpoints").is_dir())
        Trainer(model, tasks, train_set, val_set, dense_dir, opts).fit()
        _load_best(model, dense_dir)
    elif start.endswith(".mtp"):
        model = load_model(start, base=model)
    else:
        _load_best(model, Path(start))
    return model, untrained


def _row(name: str, model: nn.Module, x: torch.Tensor, metrics, reference, tasks, **extra) -> dict:
    prof = profile(model, x, repeats=10)
    return {"name": name, "metrics": metrics, "delta_m": delta_m_or_none(metrics, reference, tasks),
            "params": prof.params, "macs": prof.macs, "latency_ms": prof.latency_ms,
            "macs_per_subset": prof.macs_per_subset, "setting": prof.setting, **extra}


def compress(cfg: RunConfig, run_dir: Path, *, quiet: bool = False, resume: bool = False) -> dict:
    """Run the whole pipeline in ``run_dir``; returns the summary (also written to ``summary.json``)."""
    if cfg.prune is None:
        raise MTPruneInputError("the config has no 'prune' section")
    p = cfg.prune
    tasks = recipe.build_tasks(cfg)
    train_set, val_set = recipe.build_datasets(cfg, tasks)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    x = val_set[0][0].unsqueeze(0)
    model, untrained = _dense_model(cfg, tasks, train_set, val_set, run_dir, quiet, resume)
    save_model(model, run_dir / "dense.mtp", example_inputs=x)
    eval_bs = cfg.train.eval_batch_size
    dense_metrics = evaluate(model, val_set, tasks, device=cfg.device, batch_size=eval_bs)
    widths_before = PruningGraph(model, x).widths()
    finetune = _section_config(cfg, p.finetune, quiet=quiet, resume=resume)
    rebuild = lambda: recipe.build_configured_model(cfg, tasks)  # noqa: E731
    crit_kw = dict(p.criterion_kwargs)
    from .pruning.criteria import get_criterion

    criterion = get_criterion(p.criterion, seed=cfg.seed, **crit_kw)
    stats_batches = decision_batches(p, criterion)
    prune_dir = run_dir / "prune"
    common = {"allocator": p.allocator, "min_channels": p.min_channels, "round_to": p.round_to,
              "part_ratios": p.part_ratios or None, "latency": p.latency or None, "rank_by": p.rank_by}
    pagcp_report = None
    if p.allocator == "pagcp":  # PAGCP (Ye et al. 2023): loss-constrained rounds, fine-tuned in between
        from .pruning.pagcp import pagcp_schedule

        model, records, pagcp_report = pagcp_schedule(
            model, x, tasks, train_set, val_set, prune_dir, criterion=criterion, target_macs=p.target_macs,
            settings=p.pagcp.model_dump(), finetune=finetune, stats_batches=stats_batches,
            stats_batch_size=p.stats_batch_size, min_channels=p.min_channels, seed=cfg.seed,
            resume=resume, rebuild=rebuild, target_latency=p.target_latency, target_latency_ms=p.target_latency_ms,
            latency=p.latency or None)
    elif p.schedule == "interleaved":
        model, records = interleaved_prune(
            model, x, tasks, train_set, val_set, prune_dir, criterion=criterion, interval=p.interval,
            filters_per_step=p.filters_per_step, params_per_step=p.params_per_step, max_steps=p.max_steps,
            target_macs=p.target_macs,
            target_params=p.target_params, lr=p.finetune.lr, batch_size=p.finetune.batch_size,
            min_channels=p.min_channels, seed=cfg.seed, device=cfg.device, rebuild=rebuild, resume=resume)
    elif p.channel_ratio is not None:
        prune(model, x, criterion, channel_ratio=p.channel_ratio, data=_stats_data(train_set, p, cfg.seed),
              losses=as_losses(tasks), batches=stats_batches, **common)
        records = []
        if finetune.epochs:
            Trainer(model, tasks, train_set, val_set, prune_dir / "finetune", finetune).fit()
            _load_best(model, prune_dir / "finetune")
    else:
        steps = 1 if p.schedule == "one_shot" else p.steps
        model, records = iterative_prune(
            model, x, tasks, train_set, val_set, prune_dir, criterion=criterion, target_macs=p.target_macs,
            target_params=p.target_params, target_latency=p.target_latency, target_latency_ms=p.target_latency_ms,
            steps=steps, finetune=finetune, stats_batches=stats_batches,
            stats_batch_size=p.stats_batch_size, rebuild=rebuild, resume=resume, **common)
    save_model(model, run_dir / "model.mtp", example_inputs=x)
    pruned_metrics = evaluate(model, val_set, tasks, device=cfg.device, batch_size=eval_bs)
    widths_after = PruningGraph(model, x).widths()
    rows = [_row("dense", load_model(run_dir / "dense.mtp", base=rebuild()), x, dense_metrics, dense_metrics, tasks),
            _row("pruned", model, x, pruned_metrics, dense_metrics, tasks)]
    if untrained is not None:
        same_cost = {k: rows[0][k] for k in ("params", "macs", "latency_ms", "macs_per_subset", "setting")}
        rows.insert(0, {"name": "untrained", "metrics": untrained,
                        "delta_m": delta_m_or_none(untrained, dense_metrics, tasks), **same_cost})
    if p.retrain_from_scratch:
        scratch = rebuild_from_widths(rebuild, x, widths_after, seed=cfg.seed, heads=head_layout(model))
        opts = recipe.train_options(cfg, quiet=quiet, resume=resume and (run_dir / "scratch").is_dir())
        Trainer(scratch, tasks, train_set, val_set, run_dir / "scratch", opts).fit()
        _load_best(scratch, run_dir / "scratch")
        save_model(scratch, run_dir / "scratch.mtp", example_inputs=x)
        metrics = evaluate(scratch, val_set, tasks, device=cfg.device, batch_size=eval_bs)
        rows.append(_row("same widths, retrained from scratch", scratch, x, metrics, dense_metrics, tasks))
    summary = {
        "name": cfg.name,
        "tasks": {t: task.metrics for t, task in tasks.items()},
        "models": rows,
        "trajectory": [asdict(r) if isinstance(r, StepRecord) else r for r in records],
        "schedule": p.schedule,
        "criterion": criterion.name,
        "widths_before": widths_before,
        "widths_after": widths_after,
    }
    if pagcp_report is not None:  # per round: per-layer ratios and per-task loss ratios
        summary["pagcp"] = pagcp_report
    atomic_write_json(run_dir / "summary.json", summary)
    write_run_report(run_dir, summary)
    return summary


def decision_batches(p: PruneSection, criterion: Criterion) -> int:
    """Statistics batches of one pruning decision: ``prune.stats_batches``, or when unset as many as
    ``criterion`` needs for a stable decision (``Criterion.stable_samples``, from the criteria benchmark)."""
    return p.stats_batches or math.ceil(criterion.stable_samples / p.stats_batch_size)


def _stats_data(train_set, p, seed: int):
    from torch.utils.data import DataLoader

    from .engine.batch import collate

    return DataLoader(train_set, batch_size=p.stats_batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate)


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise MTPruneInputError(f"{run_dir}: no summary.json (has the prune run finished?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MTPruneInputError(f"{path}: corrupt ({err})") from None
