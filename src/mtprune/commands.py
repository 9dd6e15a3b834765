"""Implementations of the ``mtprune`` sub-commands and their registry ``COMMANDS``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import recipe
from .config import RunConfig, apply_overrides, dump_config, load_config, parse_config
from .engine.checkpoint import load_model_state
from .engine.evaluate import evaluate
from .engine.trainer import Trainer
from .io import load as load_model
from .io import read as read_model
from .measure import profile
from .pipeline import compress, read_summary
from .report.run_report import write_run_report
from .utils.atomic import atomic_write_json, atomic_write_text
from .utils.errors import MTPruneInputError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    """Register a sub-command implementation under ``name``."""

    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _console():
    from .utils.console import console

    return console()


def print_metrics(title: str, metrics: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task", overflow="fold")
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right")
    for task, values in metrics.items():
        for name, value in values.items():
            table.add_row(task, name, f"{value:.4f}")
    _console().print(table)


def run_training(cfg: RunConfig, run_dir: Path, *, quiet: bool, resume: bool):
    """Train the configured model in ``run_dir``; returns (model, tasks, val set, summary)."""
    tasks = recipe.build_tasks(cfg)
    train_set, val_set = recipe.build_datasets(cfg, tasks)
    model = recipe.build_configured_model(cfg, tasks)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    summary = Trainer(model, tasks, train_set, val_set, run_dir,
                      recipe.train_options(cfg, quiet=quiet, resume=resume)).fit()
    return model, tasks, val_set, summary


def load_best(model: torch.nn.Module, run_dir: Path) -> None:
    path = run_dir / "checkpoints" / "best.pt"
    if not path.is_file():
        raise MTPruneInputError(f"{run_dir}: no checkpoints/best.pt; has the run trained an epoch?")
    load_model_state(model, path)


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = recipe.prepare_run_dir(args.out or Path("runs") / cfg.name, overwrite=args.overwrite,
                                     resume=args.resume, config=cfg)
    _, _, _, summary = run_training(cfg, run_dir, quiet=args.quiet, resume=args.resume)
    print_metrics(f"best validation metrics (epoch {summary.best_epoch})", summary.best_metrics)
    print(f"run directory: {run_dir}")
    return 0


@command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.suffix == ".mtp":
        if not args.config:
            raise MTPruneInputError("evaluating a .mtp file needs --config (for the data and the tasks)")
        cfg = load_config(args.config)
        tasks = recipe.build_tasks(cfg)
        model = load_model(target, base=recipe.build_configured_model(cfg, tasks))
        out_dir = target.parent
    else:
        if not (target / "config.yaml").is_file():
            raise MTPruneInputError(f"{target}: not a run directory (no config.yaml) nor a .mtp file")
        cfg = load_config(target / "config.yaml")
        tasks = recipe.build_tasks(cfg)
        model = recipe.build_configured_model(cfg, tasks)
        if (target / "model.mtp").is_file():
            model = load_model(target / "model.mtp", base=model)
        else:
            load_best(model, target)
        out_dir = target
    from . import data as data_mod

    split = args.split or cfg.data.val_split
    dataset = data_mod.load(cfg.data.name, root=cfg.data.root, split=split, tasks=list(tasks), **cfg.data.kwargs)
    scores = evaluate(model, dataset, tasks, device=args.device, batch_size=cfg.train.eval_batch_size)
    print_metrics(f"{target} on {split}", scores)
    atomic_write_json(out_dir / f"eval_{split}.json", scores)
    return 0


DEMO_CONFIG = {
    "name": "demo",
    "data": {"name": "synthetic_scenes"},
    "tasks": {"preset": "synthetic_scenes"},
    # 20 dense epochs and 3 fine-tuning epochs per step keep the demo within 5 minutes on an idle 2-core machine
    # (30 and 4 took 6 min 11 s); Deeplab-ResNet-18 learns faster here than -34 at the same cost per epoch
    "model": {"name": "deeplab_resnet18", "width": 0.25, "head": "aspp_v2",
              "head_kwargs": {"hidden": 128, "dropout": 0.0}},  # dropout biases depth at eval (benchmarks/README)
    "train": {"epochs": 20, "batch_size": 16, "lr": 0.001, "optimizer": "adam", "scheduler": "cosine"},
    "prune": {"criterion": "task_taylor", "target_macs": 0.5, "schedule": "iterative", "steps": 3,
              "stats_batches": 8, "finetune": {"epochs": 3, "batch_size": 16, "lr": 0.0005}},
}


def print_summary(summary: dict) -> None:
    from rich.table import Table

    tasks = summary["tasks"]
    table = Table(title=f"{summary['name']}: dense against pruned ({summary['criterion']}, {summary['schedule']})")
    table.add_column("model", overflow="fold")
    for t, ms in tasks.items():
        table.add_column(f"{t} {next(iter(ms))}", justify="right", overflow="fold")
    for col in ("Δm %", "params (M)", "MMACs", "latency ms"):
        table.add_column(col, justify="right", overflow="fold")
    for r in summary["models"]:
        cells = [f"{r['metrics'][t][next(iter(ms))]:.2f}" for t, ms in tasks.items()]
        dm = f"{r['delta_m']:+.2f}" if r["delta_m"] is not None else "–"
        table.add_row(r["name"], *cells, dm, f"{r['params'] / 1e6:.3f}", f"{r['macs'] / 1e6:.1f}",
                      f"{r['latency_ms']:.1f}")
    _console().print(table)


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    raw = apply_overrides(json.loads(json.dumps(DEMO_CONFIG)), args.overrides)
    raw["device"] = args.device
    cfg = parse_config(raw, "demo config")
    run_dir = recipe.prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume,
                                     config=cfg)
    summary = compress(cfg, run_dir, quiet=args.quiet, resume=args.resume)
    print_summary(summary)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def _config_and_run_dir(args: argparse.Namespace, section: str) -> tuple[RunConfig, Path]:
    """The validated config of a ``prune``/``sparsify`` command (it must have ``section``) and its run directory."""
    cfg = load_config(args.config, args.overrides)
    if getattr(cfg, section) is None:
        raise MTPruneInputError(f"{args.config}: no '{section}' section")
    return cfg, recipe.prepare_run_dir(args.out or Path("runs") / cfg.name, overwrite=args.overwrite,
                                       resume=args.resume, config=cfg)


@command("prune")
def cmd_prune(args: argparse.Namespace) -> int:
    cfg, run_dir = _config_and_run_dir(args, "prune")
    summary = compress(cfg, run_dir, quiet=args.quiet, resume=args.resume)
    print_summary(summary)
    print(f"report: {run_dir / 'report.md'}")
    return 0


@command("sparsify")
def cmd_sparsify(args: argparse.Namespace) -> int:
    """Unstructured sparsification (mtprune.sparsity): DiSparse and its baselines, one method per run."""
    from .sparsity.run import run_sparsify

    cfg, run_dir = _config_and_run_dir(args, "sparsify")
    summary = run_sparsify(cfg, run_dir, quiet=args.quiet, resume=args.resume)
    sp = summary["sparsity"]
    print_metrics(f"{sp['method']}: sparsity {sp['sparsity']:.2%} (target {sp['target']:.2%})",
                  summary["models"][-1]["metrics"])
    print(f"report: {run_dir / 'report.md'}")
    return 0


@command("merge")
def cmd_merge(args: argparse.Namespace) -> int:
    """Merge single-task networks: PAM (He et al. 2021) or MFIS (Cheng et al. 2021, reconstructed)."""
    from .merging.command import run

    return run(args)


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    summary = read_summary(run_dir)
    if "trajectory" in summary:  # a prune run
        path = write_run_report(run_dir, summary)
    elif "sparsity" in summary:  # a sparsify run
        from .sparsity.run import write_sparsify_report

        path = write_sparsify_report(run_dir, summary)
    else:
        raise MTPruneInputError(f"{run_dir}/summary.json is not from a prune or sparsify run (merge runs write "
                                "their report.md themselves)")
    print(f"report: {path}")
    return 0


@command("profile")
def cmd_profile(args: argparse.Namespace) -> int:
    if args.json_out and Path(args.json_out).is_dir():
        raise MTPruneInputError(f"--json {args.json_out}: is a directory; give a file name")
    _, meta = read_model(args.model)
    model = load_model(args.model)
    shape = args.input_shape or meta.get("input_shape")
    if not shape:
        raise MTPruneInputError(f"{args.model}: no input shape stored; pass --input-shape C,H,W")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .utils.runtime import resolve_device

    device = resolve_device(args.device)
    model.to(device)
    x = torch.zeros(args.batch_size, *shape, device=device, dtype=_float_dtype(model))
    from .export import profile_extras, profile_options

    opts = profile_options(args)  # --tasks; --runtime onnx is checked before any work
    try:
        prof = profile(model, x, subsets_latency=True, **opts)
    except (RuntimeError, ValueError) as err:
        if isinstance(err, MTPruneInputError):
            raise
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise MTPruneInputError(f"{args.model}: input shape {list(shape)} does not fit the model ({first})") from None
    from rich.table import Table

    table = Table(title=f"{args.model}: {prof.params / 1e6:.3f} M params, {prof.macs / 1e6:.1f} MMACs, "
                        f"{prof.latency_ms:.2f} ms (batch {args.batch_size}, {torch.get_num_threads()} threads)")
    table.add_column("task subset", overflow="fold")
    table.add_column("MMACs", justify="right")
    table.add_column("latency ms", justify="right")
    for subset, macs in prof.macs_per_subset.items():
        lat = prof.latency_per_subset_ms.get(subset)
        table.add_row(subset, f"{macs / 1e6:.1f}", f"{lat:.2f}" if lat is not None else "–")
    _console().print(table)
    profile_extras(args, prof, model, x)  # shared / exclusive MACs, ONNX Runtime latency
    if args.json_out:
        atomic_write_json(args.json_out, prof.to_dict())
    return 0


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_suite
    from .bench.common import results_dir

    check_bench_scale(results_dir(args.suite, args.out), args.scale, resume=args.resume or args.gather)
    extra = {} if args.seeds is None else {"seeds": args.seeds}
    extra.update({"gather": True} if args.gather else {})
    extra.update({"pools": args.pools} if getattr(args, "pools", None) else {})
    run_suite(args.suite, scale=args.scale, out=args.out, threads=args.threads, resume=args.resume, **extra)
    folder = results_dir(args.suite, args.out)
    reports = sorted(p.name for p in folder.glob("*.md"))
    print(f"{args.suite}: results in {folder}" + (f" ({', '.join(reports)})" if reports else ""))
    return 0


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


BENCH_SCALE_FILE = ".scale"


def check_bench_scale(folder: Path, scale: str, *, resume: bool) -> None:
    """Record the ``--scale`` of a suite's entries in ``<folder>/entries/.scale``; ``--resume`` refuses entries
    made at another scale (a suite resumed at another scale would mix results of different models)."""
    entries = Path(folder) / "entries"
    marker = entries / BENCH_SCALE_FILE
    if resume and marker.is_file():
        stored = marker.read_text(encoding="utf-8").strip()
        if stored != scale:
            raise MTPruneInputError(f"bench --resume: the entries in {entries} were made at --scale {stored}, not "
                                    f"{scale}; resume with --scale {stored}, or run without --resume to redo them")
    entries.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, scale + "\n")
