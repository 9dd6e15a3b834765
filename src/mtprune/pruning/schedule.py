"""Pruning schedules and retraining from scratch.

- ``iterative_prune``: N steps, each pruning to target^(i/N) of the original cost, then fine-tuning with the
  trainer; every step is saved, so ``resume=True`` continues after a kill.
- ``interleaved_prune``: Garg, Zhang, Guan (arXiv 2304.06840, 2023): while training continues, every
  ``interval`` iterations remove ``filters_per_step`` filters (or, with ``params_per_step``, the lowest-ranked
  filters worth that fraction of the starting parameters) ranked by scores averaged over the interval;
  before each removal the weights with the lowest validation loss are restored; AdamW with cosine annealing
  restarted every ``restart_epochs``. The per-layer width trajectory is recorded. With no removal per step
  (``filters_per_step=0``) it is the control: the same training, evaluated at the same iterations.
- ``rebuild_from_widths``: the same architecture as a recorded pruned model, randomly re-initialised, for
  Garg et al.'s comparison of fine-tuning against retraining from scratch. Every record keeps the attention head
  layouts too (``StepRecord.heads``): widths alone do not tell 3 heads of 8 from 4 heads of 6.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..engine.batch import collate
from ..engine.checkpoint import load_model_state
from ..engine.evaluate import evaluate
from ..engine.logging import progress_line
from ..engine.trainer import TrainConfig, Trainer, set_data_epoch
from ..io import load as load_model
from ..io import save as save_model
from ..tasks import Task
from ..utils.atomic import atomic_write_json
from ..utils.errors import MTPruneInputError
from ..utils.inputs import input_spec
from ..utils.runtime import seed_everything
from .allocate import plan_removal
from .attention import head_layout
from .cost import CostModel
from .criteria import Criterion, get_criterion
from .graph import PruningGraph, apply_widths
from .latency import model_latency
from .prune import as_losses, count, criterion_scores, prune, search_fraction
from .stats import StatisticsEngine


@dataclass
class StepRecord:
    """One point of a schedule's trajectory."""

    step: int
    params: int
    macs: int
    metrics: dict[str, dict[str, float]]
    widths: dict[str, int]
    iteration: int | None = None
    extra: dict[str, object] = field(default_factory=dict)
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> [num_heads, head_dim]


def step_line(label: str, rec: StepRecord, dense: StepRecord, total: int) -> str:
    """``prune step 2/3: MACs 0.512 of dense (1.2e+06) | params 0.48 of dense (4.6e+04) | val seg.miou=31.2 ...``:
    the progress line printed after each step when stdout is not a terminal (``engine.logging.progress_line``)."""
    val = " ".join(f"{t}.{k}={v:.4g}" for t, ms in rec.metrics.items() for k, v in ms.items()
                   if isinstance(v, int | float))
    line = (f"{label} {rec.step}/{total}: MACs {rec.macs / max(dense.macs, 1):.3f} of dense ({rec.macs:.3g}) | "
            f"params {rec.params / max(dense.params, 1):.3f} of dense ({rec.params:.3g})")
    return f"{line} | val {val}" if val else line


def _default_rebuild(model: nn.Module) -> Callable[[], nn.Module]:
    spec = getattr(model, "mtprune_spec", None)
    if spec is None:
        raise MTPruneInputError("a schedule of a non-zoo model needs rebuild=<factory of the unpruned model>")
    from ..models import build_model

    return lambda: build_model(spec["builder"], **spec["kwargs"])


def _stats_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      collate_fn=collate)


def _write_state(run_dir: Path, records: list[StepRecord], settings: Mapping[str, object]) -> None:
    atomic_write_json(run_dir / "schedule.json", {"records": [asdict(r) for r in records],
                                                  "settings": dict(settings)})


def _read_state(run_dir: Path, settings: Mapping[str, object]) -> list[StepRecord]:
    """The records of a schedule started in ``run_dir``; refused when it was started with other ``settings``
    (resuming would silently continue, or return, another experiment's trajectory)."""
    import json

    path = run_dir / "schedule.json"
    if not path.is_file():
        return []
    try:
        state = json.loads(path.read_text())
        records = [StepRecord(**r) for r in state["records"]]
    except (ValueError, KeyError, TypeError) as err:
        raise MTPruneInputError(f"{path}: corrupt schedule state ({err})") from None
    stored, wanted = state.get("settings"), json.loads(json.dumps(dict(settings)))
    if stored != wanted:
        changed = sorted(k for k in wanted if not isinstance(stored, dict) or stored.get(k) != wanted[k])
        raise MTPruneInputError(f"{run_dir}: this schedule was started with other settings "
                                f"({', '.join(changed) or 'none recorded'}); resume it with the same ones or start "
                                "it in a new directory")
    return records


def _record(step: int, model: nn.Module, example_inputs: Tensor, graph_widths: dict[str, int],
            val: Dataset, tasks: Mapping[str, Task], device: str, eval_batch_size: int, **kw) -> StepRecord:
    params, macs = count(model, example_inputs)
    metrics = evaluate(model, val, tasks, device=device, batch_size=eval_batch_size)
    return StepRecord(step, params, macs, metrics, graph_widths, heads=head_layout(model), **kw)


def iterative_prune(model: nn.Module, example_inputs: Tensor, tasks: Mapping[str, Task], train_set: Dataset,
                    val_set: Dataset, run_dir: str | Path, *, criterion: str | Criterion = "taylor",
                    target_macs: float | None = None, target_params: float | None = None, steps: int = 3,
                    finetune: TrainConfig | None = None, stats_batches: int = 8, stats_batch_size: int = 8,
                    rebuild: Callable[[], nn.Module] | None = None, resume: bool = False,
                    on_step: Callable[[StepRecord], None] | None = None, target_latency: float | None = None,
                    target_latency_ms: float | None = None, **prune_kw) -> tuple[nn.Module, list]:
    """Prune in ``steps`` steps with fine-tuning between them. Returns the final model and the trajectory
    (step 0 is the model as given). Each step writes ``steps/<i>/model.mtp`` and ``schedule.json``.

    A latency target (``target_latency``: fraction of the dense latency, ``target_latency_ms``: milliseconds, on
    the device of ``latency=``, see ``mtprune.prune``) is approached geometrically too: step i prunes to
    dense × (target / dense)^(i/steps), the dense latency being predicted once at step 0 (``extra["latency_ms"]``).
    """
    given = {k: v for k, v in {"target_macs": target_macs, "target_params": target_params,
                                "target_latency": target_latency, "target_latency_ms": target_latency_ms}.items()
             if v is not None}
    if len(given) != 1:
        raise MTPruneInputError("iterative_prune needs exactly one of target_macs, target_params, target_latency, "
                                f"target_latency_ms (got {sorted(given)})")
    (kind, goal), = given.items()
    if kind == "target_latency_ms" and not 0 < goal < float("inf"):
        raise MTPruneInputError(f"target_latency_ms must be a positive number of milliseconds, got {goal}")
    if kind != "target_latency_ms" and not 0 < goal < 1:
        raise MTPruneInputError(f"the pruning target must be in (0, 1), got {goal}")
    run_dir = Path(run_dir)
    finetune = finetune or TrainConfig(epochs=1)
    rebuild = rebuild or _default_rebuild(model)
    crit = get_criterion(criterion, seed=finetune.seed) if isinstance(criterion, str) else criterion
    pick = 1 if target_macs is not None else 0
    settings = {"schedule": "iterative", "criterion": crit.name, kind: goal, "steps": steps,
                "stats_batches": stats_batches, "stats_batch_size": stats_batch_size}
    records = _read_state(run_dir, settings) if resume else []
    if records:
        done = records[-1].step
        if done > 0:
            model = load_model(run_dir / "steps" / str(done) / "model.mtp", base=rebuild())
    else:
        extra = {}
        if kind.startswith("target_latency"):
            extra["latency_ms"] = model_latency(model, example_inputs, prune_kw.get("latency"))
        records = [_record(0, model, example_inputs, PruningGraph(model, example_inputs).widths(), val_set, tasks,
                           finetune.device, finetune.eval_batch_size or finetune.batch_size, extra=extra)]
        _write_state(run_dir, records, settings)
    original = (records[0].params, records[0].macs)[pick]
    if kind.startswith("target_latency"):
        if "latency_ms" not in records[0].extra:
            raise MTPruneInputError(f"{run_dir}: this schedule was started without a latency target; cannot resume "
                                    "it with one")
        dense_ms = float(records[0].extra["latency_ms"])
        ratio = goal if kind == "target_latency" else goal / dense_ms
    for step in range(records[-1].step + 1, steps + 1):
        step_dir = run_dir / "steps" / str(step)
        pruned_path = step_dir / "pruned.mtp"
        if resume and pruned_path.is_file():
            model = load_model(pruned_path, base=rebuild())
        else:
            if kind.startswith("target_latency"):
                target = {"target_latency_ms": dense_ms * min(ratio, 1.0) ** (step / steps)}
            else:
                current = count(model, example_inputs)[pick]
                relative = min(original * goal ** (step / steps) / current, 0.999)
                target = {"target_macs" if pick else "target_params": relative}
            data = _stats_loader(train_set, stats_batch_size, finetune.seed + step)
            with torch.random.fork_rng(devices=[]):  # the statistics (random augmentation included) depend on
                torch.manual_seed(finetune.seed + step)  # (seed, step) only: a resumed run decides the same
                prune(model, example_inputs, crit, data=data, losses=as_losses(tasks), batches=stats_batches,
                      **target, **prune_kw)
            save_model(model, pruned_path, example_inputs=example_inputs)
        cfg = TrainConfig(**{**asdict(finetune), "resume": resume and (step_dir / "checkpoints").is_dir()})
        if cfg.epochs > 0:
            summary = Trainer(model, tasks, train_set, val_set, step_dir, cfg).fit()
            if summary.best_checkpoint:
                load_model_state(model, summary.best_checkpoint)
        save_model(model, step_dir / "model.mtp", example_inputs=example_inputs)
        rec = _record(step, model, example_inputs, PruningGraph(model, example_inputs).widths(), val_set, tasks,
                      cfg.device, cfg.eval_batch_size or cfg.batch_size)
        records.append(rec)
        _write_state(run_dir, records, settings)
        if not finetune.quiet:
            progress_line(step_line("prune step", rec, records[0], steps))
        if on_step:
            on_step(rec)
    return model, records


def _batches(dataset: Dataset, batch_size: int, seed: int, start: int) -> Iterator[tuple[int, object]]:
    """An endless stream of (iteration, batch); epoch e is shuffled by (seed, e), so a resume at ``start`` sees
    exactly the batches an uninterrupted run would."""
    n = math.ceil(len(dataset) / batch_size)
    it = start
    while True:
        epoch, offset = divmod(it, n)
        set_data_epoch(dataset, epoch + 1)  # a procedural dataset serves fresh samples every epoch
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        loader = DataLoader(torch.utils.data.Subset(dataset, order[offset * batch_size:].tolist()),
                            batch_size=batch_size, generator=torch.Generator(),  # never draws the global RNG
                            collate_fn=collate)
        for batch in loader:
            yield it, batch
            it += 1


def _val_loss(model: nn.Module, val_set: Dataset, tasks: Mapping[str, Task], device: str, bs: int) -> float:
    scores = evaluate(model, val_set, tasks, device=device, batch_size=bs, with_loss=True)
    return sum(scores[t]["loss"] for t in tasks)


def interleaved_prune(model: nn.Module, example_inputs: Tensor, tasks: Mapping[str, Task], train_set: Dataset,
                      val_set: Dataset, run_dir: str | Path, *, criterion: str | Criterion = "cosprune",
                      interval: int = 500, filters_per_step: int = 100, params_per_step: float | None = None,
                      max_steps: int = 10, target_macs: float | None = None, target_params: float | None = None,
                      evals_per_interval: int = 2, lr: float = 5e-5, weight_decay: float = 1e-2,
                      restart_epochs: int = 10, batch_size: int = 8, min_channels: int = 5, seed: int = 0,
                      device: str = "auto", rebuild: Callable[[], nn.Module] | None = None, resume: bool = False,
                      on_step: Callable[[StepRecord], None] | None = None,
                      exclude_parts: Iterable[str] = ()) -> tuple[nn.Module, list]:
    """Garg et al.'s interleaved schedule; stops after ``max_steps`` removals or once the target is met.

    Each step's record holds the model right after its removal (``metrics``) and, in ``extra["recovered"]``, after
    the next interval of training (its best validation state; the final step gets one more interval): the cost of
    the removal once training has gone on, which is what a pruned model is worth.

    ``params_per_step``: remove, at each step, the lowest-ranked filters worth this fraction of the step-0
    parameters instead of a fixed number of filters, so that two criteria meet at equal parameter counts step by
    step (one filter of a wide late layer can weigh a hundred of an early one). ``filters_per_step=0`` without
    ``params_per_step`` removes nothing: the control, trained and evaluated exactly as a pruned run.
    ``exclude_parts``: parts (``ChannelGroup.part``, e.g. the task names of the heads) whose filters are never
    removed; with every head excluded only backbone filters are candidates, as in Garg et al."""
    from ..utils.runtime import resolve_device

    if params_per_step is not None and not 0 < params_per_step < 1:
        raise MTPruneInputError(f"params_per_step must be a fraction in (0, 1), got {params_per_step!r}")
    if filters_per_step < 0:
        raise MTPruneInputError(f"filters_per_step must be >= 0, got {filters_per_step!r}")
    control = not params_per_step and filters_per_step == 0
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    rebuild = rebuild or _default_rebuild(model)
    crit = get_criterion(criterion, seed=seed) if isinstance(criterion, str) else criterion
    losses = as_losses(tasks)
    excluded = set(exclude_parts)
    settings = {"schedule": "interleaved", "criterion": crit.name, "interval": interval,
                "filters_per_step": filters_per_step, "params_per_step": params_per_step, "max_steps": max_steps,
                "target_macs": target_macs, "target_params": target_params, "lr": lr, "weight_decay": weight_decay,
                "restart_epochs": restart_epochs, "batch_size": batch_size, "min_channels": min_channels,
                "seed": seed, "exclude_parts": sorted(excluded), "records": "removed, then recovered"}
    records = _read_state(run_dir, settings) if resume else []
    if records and records[-1].step > 0:
        last = run_dir / "steps" / str(records[-1].step)
        recovered = last / "recovered.mtp"  # a finished schedule's final model, trained on after its last removal
        model = load_model(recovered if recovered.is_file() else last / "model.mtp", base=rebuild())
    model.to(dev)
    x = example_inputs.to(dev)
    if not records:
        records = [_record(0, model, x, PruningGraph(model, x).widths(), val_set, tasks, device, batch_size,
                           iteration=0)]
        _write_state(run_dir, records, settings)
    p0, m0 = records[0].params, records[0].macs
    iters_per_epoch = math.ceil(len(train_set) / batch_size)
    eval_every = max(interval // max(evals_per_interval, 1), 1)

    def reached() -> bool:
        last = records[-1]
        return (target_macs is not None and last.macs <= target_macs * m0) or (
            target_params is not None and last.params <= target_params * p0)

    def finished() -> bool:
        return records[-1].step >= max_steps or reached()

    start = records[-1].iteration or 0  # a resumed step retrains its interval: the next removal needs its statistics
    stream = _batches(train_set, batch_size, seed, start)
    # each interval trains the model left by the last removal; its best state is that step's recovered state (the
    # removal's cost once training has gone on), then the next removal is decided; after the last removal one more
    # interval trains, so every step is measured recovered
    while not (finished() and (records[-1].step == 0 or "recovered" in records[-1].extra)):
        # the interval's random draws (augmentation, dropout) depend on (seed, step) only: resumable exactly
        seed_everything(seed * 1_000_003 + records[-1].step + 1)
        graph = PruningGraph(model, x)
        engine = StatisticsEngine(model, graph, losses, [crit], device=dev)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(restart_epochs * iters_per_epoch, 1))
        best_loss, best_state = math.inf, None
        model.train()
        for it, (images, targets) in stream:
            opt.zero_grad(set_to_none=True)
            engine.step(images, {k: v for k, v in targets.items() if k in losses}, params=params)
            opt.step()
            sched.step()
            done = it + 1 - start
            if done % eval_every == 0:
                vloss = _val_loss(model, val_set, tasks, device, batch_size)
                if vloss < best_loss:
                    best_loss, best_state = vloss, copy.deepcopy(model.state_dict())
                model.train()
            if done >= interval:
                break
        start += interval
        if best_state is not None:
            model.load_state_dict(best_state)
        if records[-1].step > 0:
            records[-1].extra.update(
                recovered=evaluate(model, val_set, tasks, device=device, batch_size=batch_size),
                recovered_iteration=start)
            done = finished()
            if done:
                save_model(model, run_dir / "steps" / str(records[-1].step) / "recovered.mtp", example_inputs=x.cpu())
            _write_state(run_dir, records, settings)
            if done:
                break
        scores = criterion_scores(model, graph, crit, engine=engine, exclude_parts=excluded)
        candidates = sum(g.channels for g in graph.groups if g.index in scores)
        plan_kw = {"normalize": crit.normalize, "min_channels": min_channels}
        if params_per_step:
            cost = CostModel(model, x, graph)
            goal = max(cost.params_total - params_per_step * p0, 1.0)
            plan, _ = search_fraction(graph, scores, cost.params, goal, plan_kw)
        else:
            plan = plan_removal(graph.groups, scores, min(filters_per_step / max(candidates, 1), 1.0), **plan_kw)
        if not plan and not control:
            break
        if plan:
            graph.prune(plan)
        step = records[-1].step + 1
        save_model(model, run_dir / "steps" / str(step) / "model.mtp", example_inputs=x.cpu())
        records.append(_record(step, model, x, graph.widths(), val_set, tasks, device, batch_size, iteration=start,
                               extra={"best_val_loss": best_loss}))
        _write_state(run_dir, records, settings)
        progress_line(step_line("prune step", records[-1], records[0], max_steps))
        if on_step:
            on_step(records[-1])
    set_data_epoch(train_set, 0)  # as after a training run: later readers see the stored pool
    return model, records


def rebuild_from_widths(rebuild: Callable[[], nn.Module], example_inputs: Tensor,
                        widths: Mapping[str, int], seed: int = 0,
                        heads: Mapping[str, Sequence[int]] | None = None) -> nn.Module:
    """A fresh model with the recorded widths and a new random initialisation (PyTorch's default init of each
    layer, re-run after shrinking so the fan-in of the thin layers is respected). ``heads``: the record's head
    layouts (``StepRecord.heads``), so attention is rebuilt with the pruned model's num_heads and head_dim."""
    torch.manual_seed(seed)
    model = rebuild()
    apply_widths(model, example_inputs, dict(widths), heads=dict(heads) if heads else None)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    model.mtprune_input_shape = input_spec(example_inputs)
    return model
