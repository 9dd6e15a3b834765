"""The ``mtprune merge`` pipeline (method ``pam``, He et al., KDD 2021), end to end in one run directory.

1. Train T single-task networks (the zoo model of the config, one head each).
2. Merge them with PAM, retrain the merged network jointly (its cross-network weights start at 0).
3. Build the naive baseline (trunk shared up to ``merge.naive_split``), train it jointly.
4. Prune every approach at the **same accuracy budget**: walk a ladder of MAC fractions (of each approach's own
   unpruned size) with the structured pruner, fine-tuning after each step, and keep the smallest model whose
   every task stays within ``prune.accuracy_drop`` points of its single-task network. Without merging, each
   network is pruned alone on its own task. With ``prune.per_task``, PAM's merged network gets the same per-task
   stopping rule: after the joint ladder stops (the first task at its budget), each task's exclusive part walks
   the ladder alone, the shared trunk and the other branches protected (fine-tuning that branch alone, or with
   ``prune.per_task_finetune: joint`` the whole network on every loss), until that task is at its own limit
   (``continuation.py``; still an ordinary pruner: same criterion, rungs, fine-tuning and budget check).
   With ``prune.refine`` (ours, not the paper's), every walk alike (no merging, naive, PAM's joint ladder and its
   per-task walks) takes that many bisection steps between its first rung out of the budget and the last rung
   within it, each from the model kept at the latter, fine-tuned as a rung is.
5. Measure MACs and latency of every task subset; write the cost table, the figure and a report.

Kill and resume (``resume=True``, ``mtprune merge --resume``): every training of the run (single-task networks,
PAM retraining, naive baseline, each fine-tuning of the pruning ladder) has its own Trainer run directory and
checkpoints each epoch; a resumed run trains only the epochs not yet done. The work between trainings (PAM's
partitions, pruning, evaluation) is deterministic given the networks and the seeds, and is redone, so the
result is bit for bit an uninterrupted run's on CPU.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtprune import data as data_mod
from mtprune.config import DataConfig, ModelConfig, TrainSection, dump_config, load_config
from mtprune.engine.evaluate import evaluate
from mtprune.engine.logging import log
from mtprune.engine.trainer import TrainConfig, train
from mtprune.io import load, save
from mtprune.measure import profile
from mtprune.models import build_model
from mtprune.pruning.prune import prune
from mtprune.tasks import ClassificationTask, MultiLabelTask, Task
from mtprune.utils.atomic import atomic_write_json, atomic_write_text
from mtprune.utils.errors import MTPruneInputError
from mtprune.utils.runtime import resolve_device, seed_everything

from .continuation import exclusive_macs, frozen_except, prune_exclusive, prune_shared, shared_macs
from .cost import SubsetCost, cost_table, costs_to_dict, merged_costs, plot_costs, separate_costs, subset_keys
from .merged_net import MergedNet
from .naive import naive_merge
from .pam import pam
from .subsets import deploy_costs, extract_tasks, merged_structure
from .tasks import PresenceTask

__all__ = ["MergeConfig", "load_merge_config", "relevance_kwargs", "run_merge", "tasks_of"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RelevanceSection(_Strict):
    """PAM's relevance test (``merging.relevance``); absent from a config: the paper's fixed α."""

    test: Literal["alpha", "permutation"] = "permutation"
    pooling: Literal["max", "none"] = "max"  # "none": conv activations as flattened maps (the authors' code)
    scale: Literal["raw", "unit"] = "unit"  # "unit": each neuron's distances divided by their mean
    permutations: int = Field(30, ge=1)
    quantile: float = Field(0.95, gt=0, le=1)


class MergeSection(_Strict):
    method: str = "pam"
    alpha_conv: float = 0.01
    alpha_linear: float = 0.05
    noise_var: float = Field(0.1, gt=0)
    batch: int = Field(128, ge=2)
    naive_split: int = Field(2, ge=1)
    singles: str | None = None  # a directory of <task>.mtp single-task networks to merge instead of training them
    relevance: RelevanceSection | None = None  # None: the paper's greedy sets under alpha_conv / alpha_linear
    retrain: TrainSection = Field(default_factory=lambda: TrainSection(epochs=3, lr=1e-3, weight_decay=0.0))

    @model_validator(mode="after")
    def _known_method(self) -> MergeSection:
        if self.method != "pam":
            raise ValueError(f"unknown merge method {self.method!r}; known: pam")
        return self


class BudgetPruneSection(_Strict):
    criterion: str = "taylor"
    allocator: Literal["global", "layer"] = "layer"  # "layer": the same fraction of every layer
    ladder: list[float] = Field(default_factory=lambda: [0.7, 0.5, 0.35, 0.25, 0.18, 0.12])
    accuracy_drop: float = Field(1.0, ge=0)
    metric: str = "acc"
    stats_batches: int = Field(8, ge=1)
    stats_batch_size: int = Field(32, ge=1)
    min_channels: int = Field(2, ge=1)
    finetune: TrainSection = Field(default_factory=lambda: TrainSection(epochs=2, lr=5e-4, weight_decay=0.0))
    # PAM only: after the joint ladder stops, each task's exclusive part walks the ladder alone (continuation.py)
    per_task: bool = False
    # how each per-task step is fine-tuned: "branch" (only that task's exclusive part, on its own loss, the rest
    # frozen) or "joint" (the whole merged network on every task's loss, as a joint rung; ours)
    per_task_finetune: Literal["branch", "joint"] = "branch"
    # PAM only, with per_task (ours): after the per-task walks, the shared trunk walks the ladder alone (rungs are
    # fractions of its unpruned MACs), every branch protected, the whole network fine-tuned on every loss
    shared_walk: bool = False
    # ours, every walk alike (no merging, naive, PAM's joint ladder and per-task walks): after the first rung out of
    # the budget, this many bisection steps between it and the last rung within the budget (0: the rungs only)
    refine: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ladder(self) -> BudgetPruneSection:
        if any(not 0 < v < 1 for v in self.ladder) or self.ladder != sorted(self.ladder, reverse=True):
            raise ValueError("ladder must be decreasing MAC fractions in (0, 1)")
        if self.shared_walk and not self.per_task:
            raise ValueError("prune.shared_walk follows the per-task walks: set prune.per_task: true as well")
        return self


class CostSection(_Strict):
    latency: bool = True
    batch_size: int = Field(16, ge=1)
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=1)
    threads: int | None = Field(None, ge=1)


class MergeConfig(_Strict):
    name: str = "merge"
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(None, ge=1)  # torch CPU threads for the whole run (cost.threads for timing)
    data: DataConfig = Field(default_factory=lambda: DataConfig(name="multidigits", augment=False))
    tasks: list[str] = Field(default_factory=lambda: ["left", "right"], min_length=2)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="lenet5"))
    train: TrainSection = Field(default_factory=lambda: TrainSection(epochs=8, batch_size=64, lr=2e-3))
    merge: MergeSection = Field(default_factory=MergeSection)
    prune: BudgetPruneSection = Field(default_factory=BudgetPruneSection)
    cost: CostSection = Field(default_factory=CostSection)


def relevance_kwargs(section: RelevanceSection | None) -> dict[str, Any]:
    """The keyword arguments of :func:`~.pam.pam` for a config's ``merge.relevance`` (none: the paper's α)."""
    if section is None:
        return {}
    return {"relevance": section.test, "pooling": section.pooling, "scale": section.scale,
            "permutations": section.permutations, "quantile": section.quantile}


def tasks_of(dataset: Any, names: list[str]) -> dict[str, Task]:
    """Tasks for the class / multi-label targets of a dataset (``kinds`` and ``num_classes``)."""
    out: dict[str, Task] = {}
    for t in names:
        kind = dataset.kinds.get(t)
        if kind == "class":
            out[t] = ClassificationTask(t, dataset.num_classes[t])
        elif kind == "multilabel" and getattr(dataset, "signed_targets", False):
            out[t] = PresenceTask(t, dataset.num_classes[t])  # ±1 targets: tanh + MSE, as PAM's code
        elif kind == "multilabel":
            out[t] = MultiLabelTask(t, dataset.num_classes[t])
        else:
            raise MTPruneInputError(f"PAM merges classification / attribute tasks; {t!r} is of kind {kind!r}")
    return out


def _train_config(section: TrainSection, cfg: MergeConfig, quiet: bool, resume: bool = False) -> TrainConfig:
    return TrainConfig(
        epochs=section.epochs, batch_size=section.batch_size, eval_batch_size=section.eval_batch_size,
        lr=section.lr, weight_decay=section.weight_decay, optimizer=section.optimizer, momentum=section.momentum,
        scheduler=section.scheduler, step_size=section.step_size, gamma=section.gamma, device=cfg.device,
        amp=False, seed=cfg.seed, num_workers=section.num_workers, grad_clip=section.grad_clip, quiet=quiet,
        tensorboard=False, resume=resume,
    )


class _Runner:
    """Shared state of one merge run: data, tasks, the device and the run directory."""

    def __init__(self, cfg: MergeConfig, run_dir: Path, quiet: bool, resume: bool = False) -> None:
        self.cfg, self.run_dir, self.quiet, self.resume = cfg, run_dir, quiet, resume
        d = cfg.data
        self.train_set: Dataset = data_mod.load(d.name, root=d.root, split=d.train_split, tasks=cfg.tasks,
                                                **d.kwargs)
        self.val_set: Dataset = data_mod.load(d.name, root=d.root, split=d.val_split, tasks=cfg.tasks, **d.kwargs)
        self.tasks = tasks_of(self.train_set, cfg.tasks)
        self.device = resolve_device(cfg.device)
        self.example = self.train_set[0][0][None]

    def fit(self, model: nn.Module, tasks: Mapping[str, Task], section: TrainSection, where: str) -> None:
        """Train in ``run_dir/where``; when resuming, continue from its last checkpoint (if an attempt left one)."""
        if section.epochs > 0:
            resume = self.resume and (self.run_dir / where / "checkpoints").is_dir()
            train(model, dict(tasks), self.train_set, self.val_set, self.run_dir / where,
                  _train_config(section, self.cfg, self.quiet, resume))

    def score(self, model: nn.Module, tasks: Mapping[str, Task]) -> dict[str, float]:
        metrics = evaluate(model, self.val_set, dict(tasks), device=self.device,
                           batch_size=self.cfg.train.eval_batch_size)
        return {t: float(metrics[t][self.cfg.prune.metric]) for t in tasks}

    def stats_loader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.cfg.prune.stats_batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def prune_to_budget(self, model: nn.Module, tasks: Mapping[str, Task], reference: Mapping[str, float],
                        where: str) -> tuple[nn.Module, dict[str, Any]]:
        """Walk the MAC ladder; keep the smallest model whose tasks all stay within the accuracy budget."""
        p = self.cfg.prune
        floor = {t: reference[t] - p.accuracy_drop for t in tasks}
        macs0 = profile(model, self.example, latency=False).macs
        acc = self.score(model, tasks)
        ok = all(acc[t] >= floor[t] for t in tasks)
        steps: list[dict[str, Any]] = [{"fraction": 1.0, "acc": acc, "ok": ok}]
        best = (copy.deepcopy(model), acc, 1.0) if ok else None
        if not ok:
            log.info("%s: already below the accuracy budget before pruning (%s < %s)", where, acc, floor)
        current = 1.0
        for k, fraction in enumerate(p.ladder if ok else []):
            model.to(self.device)
            x = self.example.to(self.device)
            try:
                prune(model, x, p.criterion, target_macs=fraction / current, data=self.stats_loader(),
                      losses=dict(tasks), batches=p.stats_batches, allocator=p.allocator,
                      min_channels=p.min_channels, seed=self.cfg.seed)
            except MTPruneInputError as err:  # the pruner refused this step (the model is unchanged): stop here
                steps.append({"fraction": current, "acc": acc, "ok": False, "error": str(err)[:300]})
                log.info("%s: pruning to %.3f refused (%s)", where, fraction, err)
                break
            current = profile(model, x, latency=False).macs / macs0
            self.fit(model, tasks, p.finetune, f"{where}/step{k + 1}")
            acc = self.score(model, tasks)
            ok = all(acc[t] >= floor[t] for t in tasks)
            steps.append({"fraction": current, "acc": acc, "ok": ok})
            log.info("%s: %.3f of the MACs, accuracy %s (%s)", where, current, acc, "ok" if ok else "over budget")
            if not ok:
                if best is not None:
                    best = self._refine_joint(best, current, tasks, floor, macs0, where, steps)
                break
            best = (copy.deepcopy(model), acc, current)
        if best is None:
            return model.cpu(), {"steps": steps, "budget_met": False, "fraction": 1.0, "acc": steps[0]["acc"]}
        kept, acc, fraction = best
        return kept.cpu(), {"steps": steps, "budget_met": True, "fraction": fraction, "acc": acc}

    def _refine(self, best: tuple[nn.Module, dict[str, float], float], failed: float, tasks: Mapping[str, Task],
                floor: Mapping[str, float], where: str, steps: list[dict[str, Any]], unit: str,
                prune_to: Any, fit: Any) -> tuple[nn.Module, dict[str, float], float]:
        """``prune.refine`` bisection steps (ours) between the last fraction within the budget (``best``) and the
        first out of it (``failed``): ``prune_to(model, target, fraction)`` prunes a copy of the model kept at
        ``fraction`` towards ``target`` in place and returns the fraction reached (None: nothing pruned);
        ``fit(model, where)`` fine-tunes it. Stops when the widths cannot land strictly between the two; returns
        the best model within the budget."""
        found = [best]
        for j in range(self.cfg.prune.refine):
            kept, _, fraction = found[-1]
            model = copy.deepcopy(kept).to(self.device)
            reached = prune_to(model, (fraction + failed) / 2, fraction)
            if reached is None or not failed + 1e-3 < reached < fraction - 1e-3:
                break
            fit(model, f"{where}/refine{j + 1}")
            acc = self.score(model, tasks)
            ok = all(acc[t] >= floor[t] for t in tasks)
            steps.append({"fraction": reached, "acc": acc, "ok": ok, "refine": True})
            log.info("%s: refined to %.3f of %s, accuracy %s (%s)", where, reached, unit, acc,
                     "ok" if ok else "over budget")
            if ok:
                found.append((copy.deepcopy(model), acc, reached))
            else:
                failed = reached
        return found[-1]

    def _refine_joint(self, best: tuple[nn.Module, dict[str, float], float], failed: float,
                      tasks: Mapping[str, Task], floor: Mapping[str, float], macs0: int, where: str,
                      steps: list[dict[str, Any]]) -> tuple[nn.Module, dict[str, float], float]:
        """The ladder's refinement (``prune.refine``): the best model within the budget after the bisection."""
        p = self.cfg.prune
        x = self.example.to(self.device)

        def prune_to(model: nn.Module, target: float, fraction: float) -> float | None:
            try:
                prune(model, x, p.criterion, target_macs=target / fraction, data=self.stats_loader(),
                      losses=dict(tasks), batches=p.stats_batches, allocator=p.allocator,
                      min_channels=p.min_channels, seed=self.cfg.seed)
            except MTPruneInputError:
                return None
            return profile(model, x, latency=False).macs / macs0

        return self._refine(best, failed, tasks, floor, where, steps, "the MACs", prune_to,
                            lambda model, at: self.fit(model, tasks, p.finetune, at))

    def prune_per_task(self, model: MergedNet, tasks: Mapping[str, Task], reference: Mapping[str, float],
                       dense_exclusive: Mapping[str, int], where: str, dense_shared: int | None = None
                       ) -> tuple[MergedNet, dict[str, Any]]:
        """After the joint ladder: each task in turn walks the same ladder on its exclusive part only (rungs are
        fractions of ``dense_exclusive[t]``, its exclusive MACs unpruned), the shared trunk and the other branches
        protected (and, with ``per_task_finetune: branch``, frozen while it fine-tunes on its own loss; with
        ``joint`` the whole network fine-tunes on every loss); its walk stops at the first rung that takes any task
        out of the budget, and the model of the rung before is kept (see ``continuation.py``). With
        ``prune.shared_walk`` the shared trunk then walks alike (rungs: fractions of ``dense_shared``), every
        branch protected, the whole network fine-tuned on every loss."""
        p = self.cfg.prune
        floor = {t: reference[t] - p.accuracy_drop for t in tasks}
        model.to(self.device)
        x = self.example.to(self.device)
        acc = self.score(model, tasks)
        walks: dict[str, list[dict[str, Any]]] = {}
        parts: list[tuple[str | None, int]] = [(t, dense_exclusive[t]) for t in tasks]
        if p.shared_walk and dense_shared is not None:
            parts.append((None, dense_shared))
        shared_steps: list[dict[str, Any]] = []
        for part, dense_macs in parts:
            dense = max(dense_macs, 1)
            label = f"{where}/{part if part is not None else 'shared'}"
            current = self._part_macs(model, part, x) / dense
            steps: list[dict[str, Any]] = [{"fraction": current, "acc": acc, "ok": True}]
            best = (copy.deepcopy(model), acc, current)
            for k, rung in enumerate(v for v in p.ladder if v < current - 1e-3):
                reached = self._prune_part_to(model, part, x, rung, dense, tasks)
                if isinstance(reached, str):  # refused, or nothing left to prune: the model is unchanged
                    steps.append({"fraction": current, "acc": acc, "ok": False, "error": reached})
                    break
                current = reached
                self._fit_step(model, part, tasks, f"{label}/step{k + 1}")
                acc = self.score(model, tasks)
                ok = all(acc[s] >= floor[s] for s in tasks)
                steps.append({"fraction": current, "acc": acc, "ok": ok})
                log.info("%s: %.3f of its MACs, accuracy %s (%s)", label, current, acc, "ok" if ok else "over budget")
                if not ok:
                    best = self._refine_part(best, current, part, dense, tasks, floor, label, steps)
                    break
                best = (copy.deepcopy(model), acc, current)
            model, acc, _ = best
            if part is None:
                shared_steps = steps
            else:
                walks[part] = steps
        return model.cpu(), {"acc": acc, "walks": walks, **({"shared_walk": shared_steps} if shared_steps else {})}

    def _part_macs(self, model: MergedNet, part: str | None, x: torch.Tensor) -> int:
        """MACs of a task's exclusive part, or of the shared trunk (``part`` None)."""
        return shared_macs(model, x) if part is None else exclusive_macs(model, part, x)

    def _fit_step(self, model: MergedNet, part: str | None, tasks: Mapping[str, Task], where: str) -> None:
        """Fine-tune after pruning a task's exclusive part: that part alone on its own loss (``"branch"``), or
        the whole merged network on every task's loss, as after a joint rung (``"joint"``, and always after
        pruning the shared trunk, ``part`` None)."""
        if part is None or self.cfg.prune.per_task_finetune == "joint":
            self.fit(model, tasks, self.cfg.prune.finetune, where)
            return
        with frozen_except(model, part):
            self.fit(model, {part: tasks[part]}, self.cfg.prune.finetune, where)

    def _prune_part_to(self, model: MergedNet, part: str | None, x: torch.Tensor, fraction: float, dense: int,
                       tasks: Mapping[str, Task]) -> float | str:
        """Prune a task's exclusive part (or the shared trunk, ``part`` None) in place towards ``fraction`` of its
        ``dense`` MACs; the fraction reached, or why nothing was pruned (the model then is unchanged)."""
        p = self.cfg.prune
        before, whole = self._part_macs(model, part, x), profile(model, x, latency=False).macs
        goal = (whole - (before - fraction * dense)) / whole
        kwargs = {"criterion": p.criterion, "data": self.stats_loader(), "losses": dict(tasks),
                  "batches": p.stats_batches, "allocator": p.allocator, "min_channels": p.min_channels,
                  "seed": self.cfg.seed}
        try:
            with warnings.catch_warnings():  # the part may not reach the rung: it goes as far as it can
                warnings.simplefilter("ignore")
                if part is None:
                    prune_shared(model, x, goal, **kwargs)
                else:
                    prune_exclusive(model, part, x, goal, **kwargs)
        except MTPruneInputError as err:
            return str(err)[:300]
        after = self._part_macs(model, part, x)
        return after / dense if after < before else "nothing left to prune"

    def _refine_part(self, best: tuple[MergedNet, dict[str, float], float], failed: float, part: str | None,
                     dense: int, tasks: Mapping[str, Task], floor: Mapping[str, float], where: str,
                     steps: list[dict[str, Any]]) -> tuple[MergedNet, dict[str, float], float]:
        """A per-part walk's refinement (``prune.refine``), on that part as the walk itself."""
        x = self.example.to(self.device)

        def prune_to(model: MergedNet, target: float, fraction: float) -> float | None:
            reached = self._prune_part_to(model, part, x, target, dense, tasks)
            return None if isinstance(reached, str) else reached

        return self._refine(best, failed, tasks, floor, where, steps, "its MACs", prune_to,
                            lambda model, at: self._fit_step(model, part, tasks, at))


def run_merge(cfg: MergeConfig, run_dir: Path, *, quiet: bool = False, resume: bool = False,
              reuse: Mapping[str, Any] | None = None, reuse_only: Sequence[str] = ("no_merge", "naive")
              ) -> dict[str, Any]:
    """Run the whole comparison in ``run_dir``; returns the summary (also written to ``summary.json``).

    ``resume``: continue a killed run in ``run_dir``; the epochs it completed are not trained again.
    ``reuse``: the summary of an earlier run of the same settings and single-task networks, except for PAM's
    pruning (``prune.per_task``): its no merging and naive results (budgets, costs) are taken as they are, and
    neither is trained nor pruned again (their ``.mtp`` files are then not written). The caller vouches for the
    settings; the single-task accuracies are checked against it. ``reuse_only``: which of the two are taken
    (e.g. only naive merging, when no merging is pruned with another ``prune.refine``).
    """
    seed_everything(cfg.seed)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, run_dir, quiet, resume, reuse, reuse_only)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: MergeConfig, run_dir: Path, quiet: bool, resume: bool, reuse: Mapping[str, Any] | None,
         reuse_only: Sequence[str]) -> dict[str, Any]:
    r = _Runner(cfg, run_dir, quiet, resume)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    names = list(r.tasks)

    singles: dict[str, nn.Module] = {}
    for i, t in enumerate(names):
        if cfg.merge.singles:  # the networks were trained before (e.g. shared with an MFIS run)
            singles[t] = load(Path(cfg.merge.singles) / f"{t}.mtp")
            continue
        seed_everything(cfg.seed + i)
        singles[t] = build_model(cfg.model.name, {t: r.tasks[t].out_channels}, width=cfg.model.width,
                                 head=cfg.model.head, head_kwargs=cfg.model.head_kwargs or None, **cfg.model.kwargs)
        r.fit(singles[t], {t: r.tasks[t]}, cfg.train, f"singles/{t}")
        singles[t].cpu()
    reference = {t: r.score(singles[t], {t: r.tasks[t]})[t] for t in names}
    log.info("single-task accuracy: %s", reference)
    if reuse is not None and any(abs(reuse["reference_acc"].get(t, -1.0) - reference[t]) > 1e-9 for t in names):
        raise MTPruneInputError(f"reuse: the earlier run's single-task accuracies {reuse['reference_acc']} are not "
                                f"these networks' {reference}")

    merged, report = pam(singles, r.train_set, alpha_conv=cfg.merge.alpha_conv, alpha_linear=cfg.merge.alpha_linear,
                         noise_var=cfg.merge.noise_var, batch=cfg.merge.batch, seed=cfg.seed,
                         **relevance_kwargs(cfg.merge.relevance))
    atomic_write_json(run_dir / "pam_partitions.json", report.to_dict(indices=True))
    acc_merged = r.score(merged, r.tasks)
    r.fit(merged, r.tasks, cfg.merge.retrain, "pam/retrain")
    acc_retrained = r.score(merged, r.tasks)

    def macs(m: nn.Module) -> int:
        return profile(m, r.example, latency=False).macs

    pruned_singles: dict[str, nn.Module] = {}
    naive_p: nn.Module | None = None
    reused = [a for a in ("no_merge", "naive") if a in reuse_only] if reuse is not None else []
    dense: dict[str, Any] = {a: reuse["dense_macs"][a] for a in reused} if reuse is not None else {}
    budgets: dict[str, Any] = {a: reuse["budgets"][a] for a in reused} if reuse is not None else {}
    if "naive" not in reused:
        seed_everything(cfg.seed)
        naive = naive_merge(singles, r.example, cfg.merge.naive_split)
        r.fit(naive, r.tasks, cfg.train, "naive/train")
        dense["naive"] = macs(naive)
    if "no_merge" not in reused:
        dense["no_merge"], budgets["no_merge"] = {t: macs(m) for t, m in singles.items()}, {}
        for t in names:
            pruned_singles[t], budgets["no_merge"][t] = r.prune_to_budget(
                copy.deepcopy(singles[t]), {t: r.tasks[t]}, reference, f"prune/no_merge/{t}")
    if "naive" not in reused:
        naive_p, budgets["naive"] = r.prune_to_budget(copy.deepcopy(naive), r.tasks, reference, "prune/naive")
    dense["pam"] = macs(merged)
    dense_exclusive = {t: exclusive_macs(merged, t, r.example) for t in names}
    dense_shared = shared_macs(merged, r.example) if cfg.prune.shared_walk else None
    pam_p, budgets["pam"] = r.prune_to_budget(copy.deepcopy(merged), r.tasks, reference, "prune/pam")
    joint = None
    if cfg.prune.per_task and budgets["pam"]["budget_met"]:
        joint = {"fraction": budgets["pam"]["fraction"], "acc": budgets["pam"]["acc"],
                 "macs": {k: c.macs for k, c in merged_costs(pam_p, r.example, latency=False).items()}}
        pam_p, walk = r.prune_per_task(pam_p, r.tasks, reference, dense_exclusive, "prune/pam_per_task",
                                       dense_shared)
        budgets["pam"] = {**budgets["pam"], "fraction": macs(pam_p) / dense["pam"], "acc": walk["acc"],
                          "per_task": walk["walks"], "joint": {k: joint[k] for k in ("fraction", "acc")},
                          "per_task_finetune": cfg.prune.per_task_finetune,
                          **({"shared_walk": walk["shared_walk"]} if "shared_walk" in walk else {})}

    x = r.example.expand(cfg.cost.batch_size, *r.example.shape[1:]).contiguous()
    kw = {"latency": cfg.cost.latency, "warmup": cfg.cost.warmup, "repeats": cfg.cost.repeats}
    run_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cost.threads or run_threads)
    try:
        costs: dict[str, dict[str, SubsetCost]] = {
            "no_merge": (_costs(reuse, "no_merge", names) if "no_merge" in reused
                         else separate_costs(pruned_singles, x, **kw)),
            "naive": merged_costs(naive_p, x, **kw) if naive_p is not None else _costs(reuse, "naive", names),
            "pam": merged_costs(pam_p, x, **kw),
        }
        deploy = deploy_costs(pam_p, x, costs["pam"], **kw)  # each subset as its own model: MACs must match
        timing_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(run_threads)
    table = cost_table(costs)
    met = {"no_merge": all(v["budget_met"] for v in budgets["no_merge"].values()),
           "naive": budgets["naive"]["budget_met"], "pam": budgets["pam"]["budget_met"]}
    labels = {"no_merge": "no merging", "naive": f"naive (split {cfg.merge.naive_split})", "pam": "PAM"}
    labels = {k: v + ("" if met[k] else ", over budget") for k, v in labels.items()}
    plot_costs(costs, run_dir / "plots" / "cost_per_subset.png", labels=labels,
               title=f"{cfg.name}: cost per task subset at ≤{cfg.prune.accuracy_drop:g} points accuracy drop")
    for t, m in pruned_singles.items():
        save(m, run_dir / f"single_{t}.mtp", example_inputs=r.example)
    if naive_p is not None:
        save(naive_p, run_dir / "naive.mtp", example_inputs=r.example, extra={"merged": merged_structure(naive_p)})
    save(pam_p, run_dir / "pam.mtp", example_inputs=r.example,
         extra={"merged": merged_structure(pam_p), "pam": report.to_dict(indices=True)})
    (run_dir / "deploy").mkdir(exist_ok=True)
    for t in names:  # what serving one task needs, and nothing else
        alone = extract_tasks(pam_p, [t])
        save(alone, run_dir / "deploy" / f"pam_{t}.mtp", example_inputs=r.example,
             extra={"merged": merged_structure(alone)})
    summary = {
        "name": cfg.name, "tasks": names, "reference_acc": reference,
        "pam": {"partitions": report.to_dict(), "acc_at_merge": acc_merged, "acc_after_retrain": acc_retrained},
        "dense_macs": dense, "budgets": budgets, "costs": costs_to_dict(costs), "table": table,
        "pam_deploy": deploy, "pam_exclusive_macs": dense_exclusive,
        **({"pam_joint": {**joint, "no_merge_over_pam": {k: costs["no_merge"][k].macs / max(v, 1)
                                                         for k, v in joint["macs"].items()}}} if joint else {}),
        **({"reused": reused} if reused else {}),
        "setting": {"latency_batch_size": cfg.cost.batch_size, "threads": timing_threads,
                    "device": str(r.device)},
    }
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "report.md", render_report(summary, report.table()))
    return summary


def _costs(summary: Mapping[str, Any] | None, approach: str, tasks: list[str]) -> dict[str, SubsetCost]:
    """An approach's subset costs from an earlier run's summary (``reuse``), in :func:`subset_keys` order."""
    assert summary is not None
    stored = summary["costs"][approach]
    return {k: SubsetCost(int(stored[k]["macs"]), stored[k].get("latency_ms")) for k in subset_keys(tasks)}


def _fmt_acc(acc: Mapping[str, float]) -> str:
    return ", ".join(f"{t} {v:.1f}" for t, v in acc.items())


def _cell(row: Mapping[str, Any], approach: str) -> str:
    lat = row[f"{approach}_latency_ms"]
    return f"{row[f'{approach}_macs'] / 1e6:.3f}" + (f" ({lat:.2f} ms)" if lat is not None else "")


def render_report(summary: Mapping[str, Any], partition_table: str) -> str:
    """Markdown: partitions, accuracy per approach, and the cost of every task subset."""
    b = summary["budgets"]
    lines = [f"# {summary['name']}: PAM vs naive merging vs no merging", "",
             f"Single-task accuracy (the budget's reference): {_fmt_acc(summary['reference_acc'])}.", "",
             "## PAM partitions (He et al., KDD 2021)", "", partition_table, "",
             f"Accuracy right after merging: {_fmt_acc(summary['pam']['acc_at_merge'])}; after retraining: "
             f"{_fmt_acc(summary['pam']['acc_after_retrain'])}.", "",
             "## Pruned at equal accuracy budget", "",
             "| approach | MAC fraction kept | accuracy | budget met |", "|---|---|---|---|"]
    for t, v in b["no_merge"].items():
        lines.append(f"| no merging: {t} | {v['fraction']:.3f} | {_fmt_acc(v['acc'])} | {v['budget_met']} |")
    for name in ("naive", "pam"):
        v = b[name]
        lines.append(f"| {name} | {v['fraction']:.3f} | {_fmt_acc(v['acc'])} | {v['budget_met']} |")
    refined = {k: [st["fraction"] for st in v["steps"] if st.get("refine")]
               for k, v in [*(("no merging: " + t, w) for t, w in b["no_merge"].items()), ("naive", b["naive"]),
                            ("pam", b["pam"])]}
    if any(refined.values()):
        lines += ["", "Bisection steps after the first rung out of the budget (`prune.refine`; MAC fractions): "
                  + "; ".join(f"{k}: {', '.join(f'{f:.3f}' for f in v)}" for k, v in refined.items() if v) + "."]
    if "per_task" in b["pam"]:
        j, pam_b = b["pam"]["joint"], b["pam"]
        walks = [*pam_b["per_task"].items(), *([("shared trunk", pam_b["shared_walk"])] if "shared_walk" in pam_b
                                               else [])]
        then = ("; then the shared trunk walked alone, every branch protected (fractions of the trunk's MACs)"
                if "shared_walk" in pam_b else "")
        how = {"branch": "protected and frozen", "joint": "protected, the whole network fine-tuned on every loss"
               }.get(pam_b.get("per_task_finetune"), "protected")
        lines += ["", f"PAM's joint ladder (the whole merged network) stopped at {j['fraction']:.3f} of its MACs "
                  f"({_fmt_acc(j['acc'])}); then each task's exclusive part walked the ladder alone, the shared "
                  f"trunk and the other branches {how} (fractions of the task's exclusive MACs){then}:", ""]
        for t, steps in walks:
            marks = [("bisect " if st.get("refine") else "") + f"{st['fraction']:.2f} "
                     + ("refused" if "error" in st else "✓" if st["ok"] else "✗") for st in steps]
            lines.append(f"- {t}: " + " → ".join(marks))
    lines += ["", "## Cost per task subset (MMACs per sample; latency ms)", "",
              "| subset | no merging | naive | PAM | no merging / PAM | naive / PAM |", "|---|---|---|---|---|---|"]
    for row in summary["table"]:
        naive_over = row["naive_macs"] / max(row["pam_macs"], 1)
        lines.append(f"| {row['subset']} | {_cell(row, 'no_merge')} | {_cell(row, 'naive')} | {_cell(row, 'pam')} | "
                     f"{row['no_merge_over_pam']:.2f}× | {naive_over:.2f}× |")
    lines += ["", "![cost per subset](plots/cost_per_subset.png)", ""]
    return "\n".join(lines)



def load_merge_config(path: str | Path, overrides: list[str] | None = None) -> MergeConfig:
    """Read, override (``--set key=value``) and validate a merge config."""
    return load_config(path, overrides, schema=MergeConfig)
