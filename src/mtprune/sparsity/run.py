"""The pipeline behind ``mtprune sparsify CONFIG``: one run directory per method and target.

1. The dense model: ``sparsify.start`` (a run directory or a ``.mtp`` file), or trained here with the run's
   ``train`` section when the method needs a trained model (``disparse_pretrained``, ``magnitude``, ``imp``
   without rewinding). It is the Δm reference when there is one.
2. ``mtprune.sparsify`` on a fresh seeded initialisation (static methods, LTH, dynamic) or on the dense model.
3. Training of the sparse network (static methods and the lottery ticket: from scratch; pretrained methods:
   fine-tuning) with the Trainer and ``sparsify.train``; the dynamic methods train inside ``sparsify`` for as many
   iterations as those epochs hold. Every method is reported at its final weights (no checkpoint selection).
4. ``model.mtp`` (masks bit-packed), evaluation, stored sizes, latency masked vs dense (the honest speed note),
   the task-agreement ("watershed") plot, ``summary.json`` and ``report.md``.

Kill and resume (``resume=True``, ``mtprune sparsify --resume``): every completed unit is checkpointed atomically
and a resumed run continues after the last one, bit for bit as an uninterrupted run on CPU. The units: the dense
model's epochs (``dense/checkpoints``, the Trainer's); IMP rounds and the dynamic methods' epochs
(``sparsify/loop.pt``); the masks found (``sparsify/sparsified.pt``: the masked model, the report so far and the RNG
states); the sparse network's epochs (``train/checkpoints``, the Trainer's, masks included).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import recipe
from ..config import RunConfig, TrainSection, dump_config
from ..engine.checkpoint import capture_rng, load_checkpoint, one_line, restore_rng, save_checkpoint
from ..engine.evaluate import evaluate
from ..engine.trainer import Trainer, set_data_epoch
from ..io import load as load_model
from ..io import save as save_model
from ..measure import profile
from ..report.markdown import model_table, write_report
from ..tasks.delta_m import delta_m_or_none
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from ..utils.runtime import resolve_device, seed_everything
from .analysis import plot_watershed
from .api import TRAINING_METHODS, SparsityResult, sparsify
from .dynamic import DynamicSchedule
from .masks import get_masks
from .storage import SPEED_NOTE, latency
from .training import SparseTrainConfig, load_masked_state


def needs_trained_model(method: str, rewind: bool | int) -> bool:
    return method in ("disparse_pretrained", "magnitude") or (method == "imp" and rewind is False)


def _load_start(model: nn.Module, start: str) -> nn.Module:
    if start.endswith(".mtp"):
        return load_model(start, base=model)
    path = Path(start) / "checkpoints" / "best.pt"
    if not path.is_file():
        raise MTPruneInputError(f"sparsify.start: {start} is neither a .mtp file nor a run directory with "
                                "checkpoints/best.pt")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return model


def _train_options(cfg: RunConfig, section: TrainSection, run_dir: Path, *, quiet: bool, resume: bool):
    """Trainer options; resuming only where an earlier attempt left checkpoints."""
    resume = resume and (run_dir / "checkpoints").is_dir()
    return recipe.train_options(cfg.model_copy(update={"train": section}), quiet=quiet, resume=resume)


def _sparse_train_config(section: TrainSection, steps: int, **checkpointing) -> SparseTrainConfig:
    return SparseTrainConfig(steps=steps, lr=section.lr, optimizer=section.optimizer,
                             weight_decay=section.weight_decay, momentum=section.momentum,
                             grad_clip=section.grad_clip, cosine=section.scheduler == "cosine", **checkpointing)


def run_sparsify(cfg: RunConfig, run_dir: Path, *, quiet: bool = False, resume: bool = False) -> dict:
    """Run the whole pipeline in ``run_dir``; returns the summary (also in ``summary.json``).

    ``resume``: continue a killed run in ``run_dir`` after its last completed unit (see the module docstring).
    """
    s = cfg.sparsify
    if s is None:
        raise MTPruneInputError("the config has no 'sparsify' section")
    tasks = recipe.build_tasks(cfg)
    train_set, val_set = recipe.build_datasets(cfg, tasks)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    x = val_set[0][0].unsqueeze(0)
    seed_everything(cfg.seed)
    found = run_dir / "sparsify" / "sparsified.pt"
    if resume and found.is_file():
        model, result, rows, reference = _load_sparsified(found, recipe.build_configured_model(cfg, tasks),
                                                          resolve_device(cfg.device))
    else:
        model, result, rows, reference = _find_masks(cfg, run_dir, tasks, train_set, val_set, x, quiet=quiet,
                                                     resume=resume)
        _save_sparsified(found, model, result, rows, reference)
    section = s.train or cfg.train
    if s.method not in ("disparse_dynamic", "rigl") and section.epochs > 0:
        train_dir = run_dir / "train"
        opts = _train_options(cfg, section, train_dir, quiet=quiet, resume=resume)
        Trainer(model, tasks, train_set, val_set, train_dir, opts).fit()
    return _finish(cfg, run_dir, model, result, tasks, val_set, x, rows, reference)


def _find_masks(cfg: RunConfig, run_dir: Path, tasks, train_set, val_set, x, *, quiet: bool, resume: bool):
    """Steps 1–2: the dense model (trained or loaded) and the masks; returns (model, result, rows, reference)."""
    s = cfg.sparsify
    device = resolve_device(cfg.device)
    eval_bs = cfg.train.eval_batch_size
    model = recipe.build_configured_model(cfg, tasks)
    init_state = copy.deepcopy(model.state_dict())
    dense, rows, reference = None, [], None
    if s.start is not None:
        dense = _load_start(recipe.build_configured_model(cfg, tasks), s.start)
    elif needs_trained_model(s.method, s.rewind):
        dense = model
        opts = _train_options(cfg, cfg.train, run_dir / "dense", quiet=quiet, resume=resume)
        Trainer(dense, tasks, train_set, val_set, run_dir / "dense", opts).fit()
    if dense is not None:
        reference = evaluate(dense, val_set, tasks, device=cfg.device, batch_size=eval_bs)
        save_model(dense, run_dir / "dense.mtp", example_inputs=x)
        prof = profile(dense, x.to(next(dense.parameters()).device), repeats=20)
        rows.append({"name": "dense", "metrics": reference, "delta_m": 0.0, "params": prof.params,
                     "macs": prof.macs, "latency_ms": prof.latency_ms})
    if needs_trained_model(s.method, s.rewind):
        model = dense
    else:
        model = recipe.build_configured_model(cfg, tasks)
        model.load_state_dict(init_state)
    model.to(device)

    section = s.train or cfg.train
    loader = DataLoader(train_set, batch_size=section.batch_size, shuffle=True,
                        drop_last=len(train_set) > section.batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed))
    stats = DataLoader(train_set, batch_size=s.batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(cfg.seed))
    steps = section.epochs * len(loader)  # the dynamic methods train as many iterations as the others' epochs
    checkpointing = {"checkpoint": str(run_dir / "sparsify" / "loop.pt"), "checkpoint_every": len(loader),
                     "resume": resume}  # units: an IMP round; an epoch of dynamic sparse training
    train = _sparse_train_config(section, s.round_steps if s.method == "imp" else steps, **checkpointing)
    schedule = DynamicSchedule(delta_t=s.dynamic.delta_t, t_end=s.dynamic.t_end or max(1, round(0.75 * steps)),
                               alpha=s.dynamic.alpha, erk_power=s.dynamic.erk_power, regrowth=s.dynamic.regrowth)
    data = loader if s.method in TRAINING_METHODS else stats
    result = sparsify(model, x.to(device), s.method, s.sparsity, data=data, losses=tasks, batches=s.batches,
                      score=s.score, tolerance=s.tolerance, seed=cfg.seed, train=train, schedule=schedule,
                      rounds=s.rounds, rewind=s.rewind, score_init=s.score_init)
    set_data_epoch(train_set, 0)  # as after a training run: later readers see the stored pool
    return model, result, rows, reference


def _save_sparsified(path: Path, model: nn.Module, result: SparsityResult, rows: list[dict], reference) -> None:
    """The unit "masks found": the masked model, the report so far (JSON) and the RNG states, atomically."""
    report = json.dumps({"result": result.to_dict(), "rows": rows, "reference": reference})
    save_checkpoint(path, {"kind": "sparsified", "model": model.state_dict(), "report": report,
                           "rng": capture_rng(next(model.parameters()).device)})


def _load_sparsified(path: Path, model: nn.Module, device: torch.device):
    """Inverse of :func:`_save_sparsified` into a fresh ``model`` (moved to ``device``); returns (model, result,
    rows, reference)."""
    payload = load_checkpoint(path)
    try:
        if payload.get("kind") != "sparsified":
            raise ValueError(f"a {payload.get('kind')!r} checkpoint")
        load_masked_state(model, payload["model"])
        report = json.loads(payload["report"])
        result = SparsityResult(masks=get_masks(model), **report["result"])
        restore_rng(payload["rng"], device)
    except (KeyError, RuntimeError, TypeError, ValueError, MTPruneInputError) as err:
        raise MTPruneInputError(f"{path}: a damaged checkpoint, or one of another model; cannot resume from it "
                                f"({type(err).__name__}: {one_line(err)})") from err
    return model.to(device), result, report["rows"], report["reference"]


def _finish(cfg: RunConfig, run_dir: Path, model: nn.Module, result: SparsityResult, tasks, val_set, x,
            rows: list[dict], reference) -> dict:
    masks = get_masks(model)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    save_model(model, run_dir / "model.mtp", example_inputs=x)
    metrics = evaluate(model, val_set, tasks, device=cfg.device, batch_size=cfg.train.eval_batch_size)
    speed = latency(model, x, repeats=20)
    prof = profile(model, x, latency=False)
    nonzero = prof.params - (total - kept)
    rows.append({"name": f"{result.method} {result.target:.0%}", "metrics": metrics,
                 "delta_m": delta_m_or_none(metrics, reference, tasks), "params": nonzero,
                 "macs": prof.macs, "latency_ms": speed["masked_ms"]})
    plots = {}
    if result.agreement:
        plots["agreement"] = str(plot_watershed(result.agreement, run_dir / "plots" / "task_agreement.png").name)
    summary = {
        "name": cfg.name,
        "tasks": {t: task.metrics for t, task in tasks.items()},
        "models": rows,
        "sparsity": {**result.to_dict(), "after_training": 1 - kept / total},
        "latency": speed,
        "file_bytes": (run_dir / "model.mtp").stat().st_size,
        "plots": plots,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    write_sparsify_report(run_dir, summary)
    return summary


def _bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def write_sparsify_report(run_dir: Path, summary: dict) -> Path:
    sp = summary["sparsity"]
    metrics = {t: list(ms) for t, ms in summary["tasks"].items()}
    parts = "\n".join(["| part | weights | kept | sparsity |", "|---|---|---|---|"] + [
        f"| {k} | {v['numel']} | {v['kept']} | {v['sparsity']:.2%} |" for k, v in sp["parts"].items()])
    layers = "\n".join(["| layer | part | weights | sparsity |", "|---|---|---|---|"] + [
        f"| {r['name']} | {r['part']} | {r['numel']} | {r['sparsity']:.2%} |" for r in sp["layers"]])
    st, lat = sp["storage"], summary["latency"]
    speed = (f"Measured on {lat['device']} ({lat['threads']} threads, batch {lat['batch_size']}): masked model "
             f"{lat['masked_ms']:.2f} ms, masks baked in {lat['dense_ms']:.2f} ms, speed-up ×{lat['speedup']:.2f}"
             f"{' (none: the same dense kernels run)' if lat['speedup'] < 1.1 else ''}.\n\n{SPEED_NOTE}\n\n"
             f"Stored size: dense {_bytes(st['dense_bytes'])}; bitmask + values {_bytes(st['bitmask_bytes'])}; "
             f"CSR {_bytes(st['csr_bytes'])} (×{st['compression']:.2f} smaller at best). The `.mtp` file keeps "
             f"dense weights plus bit-packed masks: {_bytes(summary['file_bytes'])}.")
    head = (f"Method `{sp['method']}`, target sparsity {sp['target']:.2%}, achieved {sp['sparsity']:.3%} over "
            f"{sp['parts']['overall']['numel']} conv/linear weights (after training: {sp['after_training']:.3%})"
            + (f", keep ratio {sp['keep_ratio']:.4f}" if sp.get("keep_ratio") is not None else "")
            + f"; sparsification took {sp['seconds']:.1f} s. Metrics are the final weights' on the validation "
              "split; params (M) counts non-zero parameters.")
    sections = [("Models", head + "\n\n" + model_table(summary["models"], metrics)),
                ("Sparsity per part", parts), ("Storage and speed", speed)]
    if summary["plots"].get("agreement"):
        body = (f"Mean pairwise IoU of the tasks' keep-masks per shared layer; watershed layer: "
                f"`{sp.get('watershed')}`.\n\n![agreement](plots/{summary['plots']['agreement']})")
        sections.append(("Task agreement per layer", body))
    sections.append(("Sparsity per layer", layers))
    return write_report(run_dir / "report.md", f"{summary['name']}: unstructured sparsification", sections)
