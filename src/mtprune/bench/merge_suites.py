"""Suites ``pam`` and ``mfis``: merging single-task networks on ``multidigits``, LeNet-5 and VGG-16, 2 and 3 tasks.

``pam`` (He et al., KDD 2021): entries ``lenet_2tasks``, ``lenet_3tasks``, ``vgg_2tasks``, ``vgg_3tasks``, each
one ``mtprune merge`` run (:func:`~mtprune.merging.experiment.run_merge`): PAM, naive merging and no merging,
pruned with Taylor-FO at an equal accuracy budget; accuracy per task, MACs and latency of every task subset.

``mfis`` (our reconstruction of Cheng et al., Cognitive Computation 2021): for the same entries, MFIS on **the
same single-task networks** (same seeds, same data), against no merging (unpruned, and pruned at the budget)
and against PAM, with the NSGA-III solver's wall time. It reuses the ``pam`` suite's finished entry of the
same settings (or runs it, storing it with the ``pam`` results).

Both suites also run the **presence testbed** (issue 16), ``presence_lenet`` over ``PRESENCE_SEEDS``: PAM's own
kind of task (digit presence, ±1 labels split 0–4 / 5–9, tanh + MSE, LeNet-5; ``configs/merge_pam_presence.yaml``)
with the permutation-null relevance test, and MFIS choosing the cheapest front point within the accuracy budget.
There PAM is pruned with a per-task stopping rule (``PRESENCE_PAM_LADDER = "per_task"``, ``prune.per_task``): the
joint ladder, then each task's exclusive part alone down to its own limit, as no merging prunes each network to
its own limit, the whole merged network fine-tuned on both losses after each per-task step
(``PRESENCE_PER_TASK_FINETUNE``); every walk, no merging's too, bisects past its first failed rung
(``prune.refine`` in the config); the entry also records where the joint ladder alone stopped (``pam_joint``),
and a changed PAM ladder reruns only PAM (no merging and naive merging are taken from the stored entry of the
same base settings, no merging only if it was walked with the same ``prune.refine``, and MFIS's entries, keyed
by those base settings, stay).
Their summaries carry a ``presence_lenet`` entry with the verdicts over the seeds (:func:`presence_digest`,
:func:`mfis_presence_digest`); the left/right multidigits entries stay as a stress test. The CelebA-like VGG
testbed ``presence_vgg`` (object presence in ``synthetic_scenes``, classes 0–4 / 5–9, VGG-16;
``configs/merge_pam_presence_vgg.yaml``) runs through the same mechanism (``PRESENCE_TESTBEDS``) with the same
seeds, pruning and summary keys; ``presence=`` picks the testbeds (all by default).

Single-task networks are trained once per (model, task, seed, data, training) into a store under the ``pam``
results (``runs/singles``, git-ignored) by :func:`~mtprune.merging.singles.prepare_singles` and copied into
each run. Weights and checkpoints are deleted from the run directories; reports, JSON and figures stay.
Every entry is cached with :class:`~.common.Entries` and keyed by a fingerprint of its settings, so
``--resume`` skips finished entries and never reuses one whose settings changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..merging.experiment import load_merge_config, run_merge
from ..merging.mfis.run import MFISConfig, run_from_config
from ..merging.singles import prepare_singles
from ..recipe import prepare_run_dir
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from .common import Entries, machine, results_dir

MODELS = {"lenet": "merge_pam_multidigits.yaml", "vgg": "merge_pam_multidigits_vgg.yaml"}
TASK_SETS = {"2tasks": ["left", "right"], "3tasks": ["left", "right", "parity"]}
SUITE_VERSION = 1
# scale → config overrides (the cpu scale is the configs as shipped; small is a smoke test whose barely trained
# networks would have every neuron found irrelevant, so it keeps all of them: α < 0)
SCALE_OVERRIDES: dict[str, list[str]] = {
    "cpu": [],
    "small": ["data.kwargs.n_train=128", "data.kwargs.n_val=64", "train.epochs=1", "merge.batch=48",
              "merge.alpha_conv=-1", "merge.alpha_linear=-1",
              "merge.retrain.epochs=1", "prune.ladder=[0.5]", "prune.stats_batches=1", "prune.finetune.epochs=1",
              "cost.latency=false"],
}
# MFIS search and fine-tuning per model (the LeNet values are configs/merge_mfis_multidigits.yaml's)
MFIS_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "lenet": {"pop_size": 100, "generations": 150,
                  "finetune": {"epochs": 10, "batch_size": 64, "lr": 0.001, "scheduler": "cosine"}},
        "vgg": {"pop_size": 100, "generations": 150,
                "finetune": {"epochs": 4, "batch_size": 64, "lr": 0.0003, "scheduler": "cosine"}},
    },
    "small": {m: {"pop_size": 8, "generations": 2, "batch": 48, "finetune": {"epochs": 1, "batch_size": 64}}
              for m in MODELS},
}


def _presence_mfis(epochs: int, batch_size: int, lr: float) -> dict[str, Any]:
    """MFIS on a presence testbed: the cheapest front point within the accuracy budget, not the knee (issue 16),
    fine-tuned with the testbed's PAM retraining schedule on the same networks; when no point tried is within the
    budget, the nearest miss is fine-tuned as many epochs more (rescue_epochs; ours)."""
    return {"pop_size": 100, "generations": 150, "select": "budget",
            "budget": {"accuracy_drop": 2.0, "candidates": 5, "rescue_epochs": epochs},
            "finetune": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "scheduler": "cosine"}}


# testbed → its model's MFIS defaults and its PAM retraining schedule (configs/merge_pam_presence*.yaml)
for _testbed, _model, _schedule in (("presence_lenet", "lenet", (12, 64, 0.002)),
                                    ("presence_vgg", "vgg", (6, 32, 0.0005))):
    MFIS_SETTINGS["cpu"][_testbed] = _presence_mfis(*_schedule)
    MFIS_SETTINGS["small"][_testbed] = {**MFIS_SETTINGS["small"][_model], "select": "budget",
                                        "budget": {"accuracy_drop": 100.0, "candidates": 2}}


APPROACH_LABELS = {"no_merge": "no merging", "naive": "naive merging", "pam": "PAM"}
# PAM's grouping under other KDE noise variances and thresholds α (conv, linear), on the same networks: the
# paper's setting, α = 0 (only neurons constant on the batch are irrelevant), larger noise, larger α
SENSITIVITY: list[tuple[float, float, float]] = [(0.1, 0.01, 0.05), (0.1, 0.0, 0.0), (1.0, 0.01, 0.05),
                                                 (10.0, 0.01, 0.05), (1.0, 0.1, 0.3)]


def _config_dir() -> Path:
    repo = Path(__file__).resolve().parents[3] / "configs"
    return repo if repo.is_dir() else Path("configs")


def _pam_config(model: str, task_set: str, scale: str, threads: int):
    if scale not in SCALE_OVERRIDES:
        raise ValueError(f"unknown scale {scale!r} for the merge suites; known: {', '.join(SCALE_OVERRIDES)}")
    tasks = ",".join(TASK_SETS[task_set])
    overrides = [f"name=pam_{model}_{task_set}", f"tasks=[{tasks}]", f"threads={threads}",
                 f"cost.threads={threads}", *SCALE_OVERRIDES[scale]]
    return load_merge_config(_config_dir() / MODELS[model], overrides)


def _dump(cfg: Any) -> str:
    """``dump_config`` without the optional merge sections left unset (``merge.relevance``, ``merge.budget``), so
    the fingerprints of entries computed before those sections existed stay the same."""
    import yaml

    raw = cfg.model_dump(mode="json")
    for key in ("relevance", "budget"):
        if key in raw.get("merge", {}) and raw["merge"][key] is None:
            del raw["merge"][key]
    if (raw.get("merge", {}).get("budget") or {}).get("rescue_epochs") == 0:  # MFIS without a rescue: as before
        del raw["merge"]["budget"]["rescue_epochs"]
    if not raw.get("prune", {}).get("per_task", True):  # the joint-only ladder: as before the option existed
        del raw["prune"]["per_task"]
    if raw.get("prune", {}).get("refine", 1) == 0:  # the rungs only: as before the option existed
        del raw["prune"]["refine"]
    if raw.get("prune", {}).get("per_task_finetune") == "branch":  # as before the option existed
        del raw["prune"]["per_task_finetune"]
    if raw.get("prune", {}).get("shared_walk") is False:  # as before the option existed
        del raw["prune"]["shared_walk"]
    return yaml.safe_dump(raw, sort_keys=False)


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps([SUITE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _get(entries: Entries, key: str, fingerprint: str, fn: Callable[..., dict], with_previous: bool = False
         ) -> dict:
    """``entries.get`` that also drops a stored entry computed with other settings (``with_previous``: after
    handing it to ``fn(previous=...)``, which may reuse what did not change)."""
    path = entries.path(key)
    previous = None
    if entries.resume and path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") != fingerprint:
                previous = stored
                path.unlink()
        except json.JSONDecodeError:
            pass
    call = (lambda: fn(previous=previous)) if with_previous else fn
    return entries.get(key, lambda: {**call(), "fingerprint": fingerprint})


def strip_weights(run_dir: Path) -> None:
    """Delete model files and checkpoints from a run directory (reports, JSON and figures stay)."""
    for pattern in ("*.mtp", "*.pt", "*.safetensors"):
        for f in run_dir.rglob(pattern):
            f.unlink()
    for d in sorted(run_dir.rglob("checkpoints"), reverse=True):
        if d.is_dir():
            shutil.rmtree(d)
    for d in sorted((p for p in run_dir.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def _selection(models: Sequence[str] | None, task_sets: Sequence[str] | None) -> list[tuple[str, str]]:
    models = list(MODELS) if models is None else list(models)  # [] selects none (e.g. only the presence entries)
    task_sets = list(TASK_SETS) if task_sets is None else list(task_sets)
    unknown = [m for m in models if m not in MODELS] + [t for t in task_sets if t not in TASK_SETS]
    if unknown:
        raise ValueError(f"unknown merge suite entries {unknown}; models {list(MODELS)}, task sets {list(TASK_SETS)}")
    return [(m, t) for m in models for t in task_sets]


# ---------------------------------------------------------------------------------------------------------- pam


# the run-directory folders of what ``run_merge(reuse=...)`` takes from an earlier run (no merging, naive merging)
REUSED_DIRS = ("naive", "prune/no_merge", "prune/naive")


def _stash(run_dir: Path, names: Sequence[str]):
    """A temporary copy of ``run_dir``'s folders ``names`` (those that exist), at the same relative paths."""
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="mtprune_reused_")
    for name in names:
        if (run_dir / name).is_dir():
            shutil.copytree(run_dir / name, Path(tmp.name) / name)
    return tmp


def _base_fingerprint(cfg: Any) -> str:
    """The fingerprint of ``cfg`` with PAM's joint-only ladder and no refinement: what the single-task networks
    and naive merging depend on (equal to the fingerprint of entries computed before ``prune.per_task`` and
    ``prune.refine``); MFIS's entries are keyed by it."""
    return _fingerprint(_dump(cfg.model_copy(update={"prune": cfg.prune.model_copy(
        update={"per_task": False, "per_task_finetune": "branch", "shared_walk": False, "refine": 0})})))


def _no_merge_fingerprint(cfg: Any) -> str:
    """The fingerprint of what no merging depends on: ``cfg`` with PAM's joint-only ladder (``prune.refine``,
    which every walk takes, stays)."""
    return _fingerprint(_dump(cfg.model_copy(update={"prune": cfg.prune.model_copy(
        update={"per_task": False, "per_task_finetune": "branch", "shared_walk": False})})))


def _pam_entry(model: str, task_set: str, scale: str, threads: int, folder: Path) -> tuple[str, Callable[[], dict]]:
    """The fingerprint and the function computing one ``pam`` entry in ``folder/<model>_<task_set>``."""
    cfg = _pam_config(model, task_set, scale, threads)
    return _merge_entry(cfg, f"{model}_{task_set}", {"model": model, "task_set": task_set}, scale, folder)


def _merge_entry(cfg: Any, label: str, meta: dict[str, Any], scale: str, folder: Path
                 ) -> tuple[str, Callable[[], dict]]:
    """The fingerprint and the function running ``mtprune merge`` with ``cfg`` in ``folder/<label>``.

    ``fn(previous=entry)``: a stored entry of the same base settings (:func:`_base_fingerprint`: everything but
    PAM's per-task continuation and ``prune.refine``) lends its naive results, and its no merging results when
    they were pruned with the same ``prune.refine`` (:func:`_no_merge_fingerprint`) (``run_merge(reuse=...)``);
    neither depends on how PAM is pruned, so only PAM's merging and pruning (and no merging's) are redone. Naive
    merging lent by an entry of another ``prune.refine`` keeps that walk (the entry says ``naive_refine``)."""
    fingerprint, base, no_merge = _fingerprint(_dump(cfg)), _base_fingerprint(cfg), _no_merge_fingerprint(cfg)

    def fn(previous: Mapping[str, Any] | None = None) -> dict:
        started = time.perf_counter()
        prev_base = previous.get("base_fingerprint", previous.get("fingerprint")) if previous else None
        reuse = previous["summary"] if previous and prev_base == base else None
        reuse_only = ["naive"] + (["no_merge"] if previous and previous.get("no_merge_fingerprint", prev_base)
                                  == no_merge else [])
        naive_refine = (previous.get("naive_refine", previous.get("settings", {}).get("refine", 0))
                        if reuse is not None else cfg.prune.refine)
        dirs = [d for d in REUSED_DIRS if any(a in d for a in reuse_only)]
        kept = _stash(folder / label, dirs) if reuse is not None else None  # their training logs stay
        run_dir = prepare_run_dir(folder / label, overwrite=True)
        singles = prepare_singles(cfg, folder / "runs" / "singles", run_dir / "singles")
        run_cfg = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"singles": str(run_dir / "singles")})})
        summary = run_merge(run_cfg, run_dir, quiet=True, reuse=reuse, reuse_only=reuse_only)
        strip_weights(run_dir)
        if kept is not None:
            shutil.copytree(kept.name, run_dir, dirs_exist_ok=True)
            kept.cleanup()
        return {**meta, "tasks": cfg.tasks, "scale": scale, "singles": singles,
                "seconds": time.perf_counter() - started, "summary": summary,
                "settings": _pam_settings(cfg), "base_fingerprint": base, "no_merge_fingerprint": no_merge,
                "naive_refine": naive_refine,
                **({"reused_from": previous["fingerprint"]} if reuse is not None else {})}

    return fingerprint, fn


# the faithful PAM testbed (issue 16): digit presence, tanh + MSE, LeNet-5, a permutation-null relevance test
PRESENCE = "presence_lenet"
PRESENCE_CONFIG = "merge_pam_presence.yaml"
PRESENCE_SEEDS = (0, 1, 2)
PRESENCE_SCALE: dict[str, list[str]] = {"cpu": [], "small": ["merge.relevance=null"]}  # small: keep every neuron
# the CelebA-like VGG testbed (issue 16): object presence in synthetic_scenes, classes 0–4 / 5–9, tanh + MSE, VGG-16
PRESENCE_VGG = "presence_vgg"


@dataclass(frozen=True)
class PresenceTestbed:
    """A presence testbed of both suites: its ``mtprune merge`` config, the model key of its entries (and of its
    MFIS settings' defaults), the report's description, and its config overrides per scale."""

    config: str
    model: str
    title: str
    scale: dict[str, list[str]]


PRESENCE_TESTBEDS: dict[str, PresenceTestbed] = {
    PRESENCE: PresenceTestbed(PRESENCE_CONFIG, "lenet", "digit presence (3 digits per canvas, low = 0–4, high = "
                              "5–9, tanh + MSE), LeNet-5", PRESENCE_SCALE),
    PRESENCE_VGG: PresenceTestbed("merge_pam_presence_vgg.yaml", "vgg", "object presence in synthetic scenes "
                                  "(32×40, 5–10 objects, objects_a = classes 0–4, objects_b = 5–9, tanh + MSE; "
                                  "CelebA-like), VGG-16-BN at 1/8 width",
                                  {"cpu": [], "small": ["merge.relevance=null"]}),
}
# PAM's pruning on the presence testbed: the joint ladder, then each task's exclusive part alone (continuation.py),
# the per-task stopping rule no merging has; "joint" is the joint-only ladder (the entries before issue 16's rerun)
PRESENCE_PAM_LADDER = "per_task"
# how a per-task step is fine-tuned: "joint" (the whole merged network on both losses, as a joint rung) or "branch"
# (the task's exclusive part alone, the rest frozen; the entries before the rerun of 2026-12-03 15:30 UTC)
PRESENCE_PER_TASK_FINETUNE = "joint"


def _testbeds(presence: bool | Sequence[str]) -> list[str]:
    """The presence testbeds a suite runs: every one (``True``), none (``False``) or those named."""
    if isinstance(presence, bool):
        return list(PRESENCE_TESTBEDS) if presence else []
    names = [presence] if isinstance(presence, str) else list(presence)
    unknown = [t for t in names if t not in PRESENCE_TESTBEDS]
    if unknown:
        raise MTPruneInputError(f"unknown presence testbeds {unknown}; known: {', '.join(PRESENCE_TESTBEDS)}")
    return names


def _presence_config(seed: int, scale: str, threads: int, testbed: str = PRESENCE):
    if scale not in SCALE_OVERRIDES:
        raise ValueError(f"unknown scale {scale!r} for the merge suites; known: {', '.join(SCALE_OVERRIDES)}")
    bed = PRESENCE_TESTBEDS[testbed]
    overrides = [f"name=pam_{testbed}_s{seed}", f"seed={seed}", f"threads={threads}", f"cost.threads={threads}",
                 *SCALE_OVERRIDES[scale], *bed.scale[scale],
                 f"prune.per_task={str(PRESENCE_PAM_LADDER == 'per_task').lower()}",
                 f"prune.per_task_finetune={PRESENCE_PER_TASK_FINETUNE}"]
    return load_merge_config(_config_dir() / bed.config, overrides)


def _presence_entry(seed: int, scale: str, threads: int, folder: Path, testbed: str = PRESENCE
                    ) -> tuple[str, Callable[[], dict]]:
    cfg = _presence_config(seed, scale, threads, testbed)
    meta = {"model": PRESENCE_TESTBEDS[testbed].model, "task_set": "presence", "seed": seed}
    return _merge_entry(cfg, f"{testbed}_s{seed}", meta, scale, folder)


def _presence_runs(testbed: str, seeds: Sequence[int], scale: str, threads: int, folder: Path, resume: bool
                   ) -> dict[str, dict]:
    """The ``pam`` entries of ``testbed``, one per seed (``s<seed>``), stored in ``folder``."""
    entries = Entries(folder, resume=resume)
    runs = {}
    for seed in seeds:
        fingerprint, fn = _presence_entry(seed, scale, threads, folder, testbed)
        runs[f"s{seed}"] = _get(entries, f"{testbed}_s{seed}", fingerprint, fn, with_previous=True)
    return runs


# issue 16's targets on the presence testbed (the paper's LeNet row): no merging / PAM at the budget
PRESENCE_TARGETS = {"all_tasks": 1.16, "single_task": 1.0}


def presence_digest(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A presence testbed's summary from its per-seed digests (:func:`_pam_digest`): budget met by no merging
    and PAM in every seed, PAM's exclusive neurons, no merging / PAM for all tasks and for single tasks, and
    whether issue 16's targets (``PRESENCE_TARGETS``) hold."""
    seeds = sorted(int(r["seed"]) for r in runs.values())
    tasks = next(iter(runs.values()))["tasks"]
    all_key = "+".join(tasks)
    per_seed = {k: {"within_budget": all(r["budget_met"][a] for a in ("no_merge", "pam")),
                    "exclusive_neurons": sum(sum(p["exclusive"].values()) for p in r["partitions"]),
                    "all_tasks": r["no_merge_over_pam"][all_key],
                    "single_task_min": min(r["no_merge_over_pam"][t] for t in tasks),
                    "naive_budget_met": r["budget_met"]["naive"],
                    "naive_over_pam_all_tasks": r["naive_over_pam"][all_key],
                    "pam_fraction_kept": r["fraction_kept"]["pam"],
                    "pam_ladder": r.get("ladder", {}).get("pam", []),
                    **_joint_only(r, tasks)} for k, r in runs.items()}
    vals = list(per_seed.values())
    digest = {
        "within_budget": all(v["within_budget"] for v in vals), "seeds": seeds,
        "exclusive_neurons": min(v["exclusive_neurons"] for v in vals),
        "no_merge_over_pam_all_tasks": sum(v["all_tasks"] for v in vals) / len(vals),
        "no_merge_over_pam_single_task_min": min(v["single_task_min"] for v in vals),
        "per_seed": per_seed,
    }
    if all("joint_all_tasks" in v for v in vals):  # the joint-only ladder on the same runs, for comparison
        digest["joint_only"] = {"no_merge_over_pam_all_tasks": sum(v["joint_all_tasks"] for v in vals) / len(vals),
                                "no_merge_over_pam_single_task_min": min(v["joint_single_task_min"] for v in vals)}
    digest["targets_met"] = bool(
        digest["within_budget"] and digest["exclusive_neurons"] > 0
        and digest["no_merge_over_pam_all_tasks"] >= PRESENCE_TARGETS["all_tasks"]
        and digest["no_merge_over_pam_single_task_min"] >= PRESENCE_TARGETS["single_task"])
    return digest


def _joint_only(run: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """A per-task run's figures for PAM pruned by the joint ladder alone (where it stopped), and each task's walk
    on its exclusive part; nothing for a joint-only run."""
    joint = run.get("pam_joint")
    if not joint:
        return {}
    ratio = joint["no_merge_over_pam"]
    return {"joint_all_tasks": ratio["+".join(tasks)], "joint_single_task_min": min(ratio[t] for t in tasks),
            "joint_fraction_kept": joint["fraction"], "pam_per_task_ladder": run["pam_per_task"]}


def _sensitivity_entry(model: str, task_set: str, scale: str, threads: int, folder: Path
                       ) -> tuple[str, Callable[[], dict]]:
    """PAM's partitions and the unpruned cost per subset for each ``SENSITIVITY`` setting, same networks."""
    cfg = _pam_config(model, task_set, scale, threads)
    fingerprint = _fingerprint(_dump(cfg), SENSITIVITY, "accuracy at merge")

    def fn() -> dict:
        import tempfile

        from ..data import load as load_data
        from ..engine.evaluate import evaluate
        from ..io import load
        from ..merging.cost import merged_costs, separate_costs
        from ..merging.experiment import tasks_of
        from ..merging.pam import pam

        with tempfile.TemporaryDirectory() as tmp:
            prepare_singles(cfg, folder / "runs" / "singles", tmp)
            nets = {t: load(Path(tmp) / f"{t}.mtp") for t in cfg.tasks}
        d = cfg.data
        train_set = load_data(d.name, root=d.root, split=d.train_split, tasks=cfg.tasks, **d.kwargs)
        val_set = load_data(d.name, root=d.root, split=d.val_split, tasks=cfg.tasks, **d.kwargs)
        tasks = tasks_of(train_set, cfg.tasks)
        x = train_set[0][0][None]
        single = separate_costs(nets, x, latency=False)
        rows = []
        for noise_var, alpha_conv, alpha_linear in SENSITIVITY:
            row: dict[str, Any] = {"noise_var": noise_var, "alpha_conv": alpha_conv, "alpha_linear": alpha_linear}
            try:
                merged, report = pam(nets, train_set, alpha_conv=alpha_conv, alpha_linear=alpha_linear,
                                     noise_var=noise_var, batch=cfg.merge.batch, seed=cfg.seed)
            except MTPruneInputError as err:
                rows.append({**row, "error": str(err).split(":")[0]})
                continue
            cost = merged_costs(merged, x, latency=False)
            metrics = evaluate(merged, val_set, tasks, device=torch.device("cpu"), batch_size=cfg.train.eval_batch_size)
            rows.append({**row, "acc_at_merge": {t: float(metrics[t]["acc"]) for t in cfg.tasks},
                         "dropped": sum(r.dropped for r in report.layers),
                         "shared": sum(r.shared for r in report.layers),
                         "exclusive": {t: sum(r.exclusive[t] for r in report.layers) for t in cfg.tasks},
                         "no_merge_over_pam": {k: single[k].macs / max(c.macs, 1) for k, c in cost.items()},
                         "seconds": report.seconds})
        return {"model": model, "task_set": task_set, "rows": rows}

    return fingerprint, fn


def _pam_settings(cfg) -> dict:
    return {"data": cfg.data.kwargs, "model": {"name": cfg.model.name, "width": cfg.model.width, **cfg.model.kwargs},
            "train_epochs": cfg.train.epochs, "train_lr": cfg.train.lr, "alpha": [cfg.merge.alpha_conv,
            cfg.merge.alpha_linear], "noise_var": cfg.merge.noise_var, "naive_split": cfg.merge.naive_split,
            "retrain_epochs": cfg.merge.retrain.epochs, "ladder": cfg.prune.ladder,
            "accuracy_drop": cfg.prune.accuracy_drop, "finetune_epochs": cfg.prune.finetune.epochs,
            "refine": cfg.prune.refine, "per_task": cfg.prune.per_task,
            "per_task_finetune": cfg.prune.per_task_finetune, "shared_walk": cfg.prune.shared_walk,
            "latency_batch": cfg.cost.batch_size, "threads": cfg.threads,
            **({"relevance": cfg.merge.relevance.model_dump(mode="json")} if cfg.merge.relevance else {})}


def run_pam(scale: str = "cpu", out=None, threads: int | None = 1, resume: bool = False,
            models: Sequence[str] | None = None, task_sets: Sequence[str] | None = None,
            presence: bool | Sequence[str] = True, seeds: Sequence[int] = PRESENCE_SEEDS, **_) -> dict:
    """PAM against naive merging and no merging: LeNet-5 and VGG-16 on left/right multidigits, 2 and 3 tasks (the
    stress test), and the presence testbeds over ``seeds`` (``presence``: all, none, or those named); see the
    module docstring."""
    threads = threads or 1
    torch.set_num_threads(threads)
    folder = results_dir("pam", out)
    entries = Entries(folder, resume=resume)
    results = {}
    for model, task_set in _selection(models, task_sets):
        fingerprint, fn = _pam_entry(model, task_set, scale, threads, folder)
        results[f"{model}_{task_set}"] = _get(entries, f"{model}_{task_set}", fingerprint, fn, with_previous=True)
    sensitivity = {}
    for model, task_set in _selection(models, task_sets):
        fingerprint, fn = _sensitivity_entry(model, task_set, scale, threads, folder)
        sensitivity[f"{model}_{task_set}"] = _get(entries, f"{model}_{task_set}_sensitivity", fingerprint, fn)
    summary = {"suite": "pam", "scale": scale, "machine": machine(),
               "entries": {k: {**_pam_digest(v), "sensitivity": sensitivity[k]["rows"]} for k, v in results.items()}}
    testbeds = _testbeds(presence)
    for testbed in testbeds:
        runs = _presence_runs(testbed, seeds, scale, threads, folder, resume)
        results.update({f"{testbed}_{k}": v for k, v in runs.items()})
        digests = {k: {**_pam_digest(v), "seed": v["seed"]} for k, v in runs.items()}
        summary["entries"][testbed] = {**presence_digest(digests), "runs": digests}
    plot_pam(results, folder / "pam_cost_per_subset.png")
    atomic_write_json(folder / "summary.json", summary)
    atomic_write_text(folder / "report.md", render_pam(summary))
    return {"suite": "pam", "scale": scale, "runs": list(results),
            "no_merge_over_pam": {k: v["no_merge_over_pam"] for k, v in summary["entries"].items()
                                  if "no_merge_over_pam" in v},
            **{t: {k: v for k, v in summary["entries"][t].items() if k != "runs"} for t in testbeds}}


def _pam_digest(entry: Mapping[str, Any]) -> dict:
    """What the suite report needs from one entry."""
    s = entry["summary"]
    b = s["budgets"]
    acc = {"single-task": s["reference_acc"],
           "no merging": {t: v["acc"][t] for t, v in b["no_merge"].items()},
           "naive": b["naive"]["acc"], "PAM": b["pam"]["acc"]}
    met = {"no_merge": all(v["budget_met"] for v in b["no_merge"].values()), "naive": b["naive"]["budget_met"],
           "pam": b["pam"]["budget_met"]}
    parts = s["pam"]["partitions"]
    return {
        "model": entry["model"], "tasks": entry["tasks"], "settings": entry["settings"], "accuracy": acc,
        "budget_met": met, "fraction_kept": {"no_merge": {t: v["fraction"] for t, v in b["no_merge"].items()},
                                             "naive": b["naive"]["fraction"], "pam": b["pam"]["fraction"]},
        "dense_macs": s["dense_macs"], "table": s["table"],
        "relevance": [{"name": layer["name"], "relevance": layer["relevance"]} for layer in parts["layers"]
                      if layer.get("relevance")],
        "no_merge_over_pam": {r["subset"]: r["no_merge_over_pam"] for r in s["table"]},
        "naive_over_pam": {r["subset"]: r["naive_macs"] / max(r["pam_macs"], 1) for r in s["table"]},
        "partitions": [{k: layer[k] for k in ("name", "dropped", "shared", "exclusive")} for layer in parts["layers"]],
        "ladder": {a: _ladder(b[a]["steps"]) for a in ("naive", "pam")},
        **({"pam_per_task": {t: _ladder(v) for t, v in b["pam"]["per_task"].items()},
            "pam_joint": s["pam_joint"]} if "pam_joint" in s else {}),
        "pam_seconds": parts["seconds"], "seconds": entry["seconds"],
        "singles": {t: {k: v[k] for k in ("acc", "seconds", "reused")} for t, v in entry["singles"].items()},
    }


def _ladder(steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The pruning ladder an approach walked: MAC fraction after each step, budget met, refused by the pruner."""
    return [{"fraction": st["fraction"], "ok": st["ok"], "refused": "error" in st,
             **({"refine": True} if st.get("refine") else {})} for st in steps]


def _ladder_text(steps: Sequence[Mapping[str, Any]]) -> str:
    marks = [("bisect " if st.get("refine") else "") + f"{st['fraction']:.2f} "
             + ("refused" if st.get("refused") else "✓" if st["ok"] else "✗") for st in steps]
    return " → ".join(marks) or "–"


def _ms(value: float | None) -> str:
    return "not timed" if value is None else f"{value:.2f} ms"


def _describe_model(model: Mapping[str, Any]) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in model.items() if k not in ("name", "width"))
    return f"{model['name']}, width {model['width']}" + (f", {extra}" if extra else "")


def render_pam(summary: Mapping[str, Any]) -> str:
    m = summary["machine"]
    lines = ["# pam: Pruning-Aware Merging (He et al., KDD 2021) on multidigits", "",
             f"`mtprune bench pam --scale {summary['scale']}`; {m['date']}, {m['cpu']}, {m['threads']} thread(s), "
             f"torch {m['torch']}, {m['device']}. Each entry is one `mtprune merge` run (its folder has `report.md`, "
             "`summary.json`, `pam_partitions.json` and the figure). The single-task networks are trained once "
             "and shared with the `mfis` suite. Every approach is pruned with Taylor-FO down a ladder of MAC "
             "fractions, fine-tuning after each step, and the smallest model whose every task stays within the "
             "accuracy budget of its single-task network is kept. MACs per sample; latency of a batch of "
             "16 on the CPU, one thread.", "", "![cost per subset](pam_cost_per_subset.png)", ""]
    for label, e in summary["entries"].items():
        lines += _render_presence(e, label) if label in PRESENCE_TESTBEDS else _render_entry(label, e)
    return "\n".join(lines)


def _render_entry(label: str, e: Mapping[str, Any]) -> list[str]:
    """One ``pam`` entry: settings, partitions, accuracy at the budget, cost per subset (and the sensitivity)."""
    s = e["settings"]
    relevance = s.get("relevance")
    test = (f"PAM α = {s['alpha'][0]}/{s['alpha'][1]}" if not relevance else
            f"PAM relevance: permutation null ({relevance['permutations']} permutations, quantile "
            f"{relevance['quantile']}, pooling {relevance['pooling']}, scale {relevance['scale']})")
    lines = [f"## {label}: {_describe_model(s['model'])}; tasks {', '.join(e['tasks'])}", "",
             f"Data: {', '.join(f'{k} {v}' for k, v in s['data'].items())}; single-task training "
             f"{s['train_epochs']} epochs (lr {s['train_lr']}); {test}, noise variance {s['noise_var']}, retraining "
             f"{s['retrain_epochs']} epochs; naive merging shares {s['naive_split']} hidden layers; ladder "
             f"{s['ladder']}, budget {s['accuracy_drop']} points, {s['finetune_epochs']} fine-tuning epochs per "
             f"step. Entry wall time {e['seconds']:.0f} s; PAM's partitioning {e['pam_seconds']:.1f} s.", "",
             "| layer | D (dropped) | C (shared) | E (exclusive, per task) |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['dropped']} | {p['shared']} | "
              f"{_per_task(p['exclusive'], e['tasks'])} |" for p in e["partitions"]]
    met = e["budget_met"]
    lines += ["", "| accuracy (%) | " + " | ".join(e["tasks"]) + " | budget met | MAC fraction kept |",
              "|---|" + "---|" * (len(e["tasks"]) + 2)]
    frac = e["fraction_kept"]
    for name, key in (("single-task", None), ("no merging", "no_merge"), ("naive", "naive"), ("PAM", "pam")):
        acc = e["accuracy"][name]
        kept = "1.000" if key is None else (", ".join(f"{v:.3f}" for v in frac[key].values())
                                            if key == "no_merge" else f"{frac[key]:.3f}")
        lines.append(f"| {name} | " + " | ".join(f"{acc[t]:.1f}" for t in e["tasks"])
                     + f" | {'–' if key is None else met[key]} | {kept} |")
    lines += ["", "| subset | no merging: MMACs (latency) | naive | PAM | no merging / PAM | "
              "naive / PAM |", "|---|---|---|---|---|---|"]
    for r in e["table"]:
        cells = [f"{r[f'{a}_macs'] / 1e6:.3f} ({_ms(r[f'{a}_latency_ms'])})" for a in ("no_merge", "naive", "pam")]
        lines.append(f"| {r['subset']} | " + " | ".join(cells) + f" | {r['no_merge_over_pam']:.2f}× | "
                     f"{r['naive_macs'] / max(r['pam_macs'], 1):.2f}× |")
    if "sensitivity" in e:
        lines += ["", *_render_sensitivity(e["sensitivity"], e["tasks"])]
    if e.get("relevance"):
        lines += ["", *_render_relevance(e["relevance"], e["tasks"])]
    return [*lines, ""]


def _render_relevance(layers: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[str]:
    """Per layer and task: the median KDE mutual information of its neurons against the median null threshold."""
    out = ["Relevance test per layer: median mutual information of the layer's neurons (nats) against the median "
           "of their permutation-null thresholds, and how many neurons beat their null:", "",
           "| layer | " + " | ".join(f"{t}: MI / null / relevant" for t in tasks) + " |",
           "|---|" + "---|" * len(tasks)]
    for layer in layers:
        cells = [f"{r['mi_median']:.3f} / {r['null_median']:.3f} / {r['relevant']} of {r['neurons']}"
                 for r in (layer["relevance"][t] for t in tasks)]
        out.append(f"| {layer['name']} | " + " | ".join(cells) + " |")
    return out


def _render_presence(e: Mapping[str, Any], label: str = PRESENCE) -> list[str]:
    """A presence testbed: the verdicts over its seeds, then each seed's entry."""
    lines = [f"## {label}: {PRESENCE_TESTBEDS[label].title}, seeds {e['seeds']}", "",
             f"No merging and PAM within the budget in every seed: **{e['within_budget']}**. Exclusive neurons found "
             f"by PAM (fewest over the seeds): **{e['exclusive_neurons']}**. No merging / PAM for both tasks, mean "
             f"over seeds: **{e['no_merge_over_pam_all_tasks']:.2f}×**; for a single task, the smallest over tasks and "
             f"seeds: **{e['no_merge_over_pam_single_task_min']:.2f}×** (the paper's LeNet row: about 1.16× and "
             "1.0×).", "",
             f"Issue 16's targets (no merging and PAM within the budget, exclusive neurons, no merging / PAM ≥ "
             f"{PRESENCE_TARGETS['all_tasks']}× for both tasks on average and ≥ {PRESENCE_TARGETS['single_task']}× "
             f"for every single task, over {len(e['seeds'])} seeds): **{'met' if e.get('targets_met') else 'not met'}"
             "**.", "",
             "| seed | within budget | exclusive neurons | no merging / PAM, both | no merging / PAM, single (min) | "
             "naive / PAM, both | naive within budget | PAM's ladder (MAC fraction, budget) |",
             "|---|---|---|---|---|---|---|---|"]
    for k, v in e["per_seed"].items():
        lines.append(f"| {k} | {v['within_budget']} | {v['exclusive_neurons']} | {v['all_tasks']:.2f}× | "
                     f"{v['single_task_min']:.2f}× | {v['naive_over_pam_all_tasks']:.2f}× | {v['naive_budget_met']} | "
                     f"{_ladder_text(v.get('pam_ladder', []))} |")
    lines.append("")
    if "joint_only" in e:
        j = e["joint_only"]
        lines += ["PAM is pruned by an ordinary pruner (Taylor-FO, the same ladder, fine-tuning and budget check) "
                  "with a per-task stopping rule, as no merging prunes each network to its own limit: the joint "
                  "ladder prunes the whole merged network until the first task leaves the budget; then each task's "
                  "exclusive part walks the ladder alone (rungs are fractions of its exclusive MACs), the shared "
                  "trunk and the other branches protected from pruning, until that task reaches its own limit; "
                  f"after each of its steps {_finetune_text(e)}. {_refine_text(e)}"
                  f"The joint ladder alone (where it stopped, same runs): no merging / PAM "
                  f"**{j['no_merge_over_pam_all_tasks']:.2f}×** for both tasks (mean), "
                  f"**{j['no_merge_over_pam_single_task_min']:.2f}×** for a single task (smallest).", "",
                  "| seed | joint ladder: MAC fraction | joint only: both | joint only: single (min) | "
                  "per-task walks (fraction of the task's exclusive MACs, budget) |", "|---|---|---|---|---|"]
        for k, v in e["per_seed"].items():
            walks = "; ".join(f"{t}: {_ladder_text(w)}" for t, w in v.get("pam_per_task_ladder", {}).items())
            lines.append(f"| {k} | {v['joint_fraction_kept']:.3f} | {v['joint_all_tasks']:.2f}× | "
                         f"{v['joint_single_task_min']:.2f}× | {walks} |")
        lines.append("")
    for k, run in e["runs"].items():
        lines += _render_entry(f"{label} {k}", run)
    return lines


def _settings_of(e: Mapping[str, Any]) -> Mapping[str, Any]:
    return next(iter(e.get("runs", {}).values()), {}).get("settings", {})


def _finetune_text(e: Mapping[str, Any]) -> str:
    if _settings_of(e).get("per_task_finetune") == "joint":
        return "the whole merged network fine-tunes on every task's loss, as after a joint rung (ours)"
    return "only that branch fine-tunes, on its own task's loss, the rest frozen"


def _refine_text(e: Mapping[str, Any]) -> str:
    k = _settings_of(e).get("refine", 0)
    return (f"Every walk (no merging, naive merging, PAM's joint ladder and per-task walks) takes {k} bisection "
            "steps between its first rung out of the budget and the last rung within it (`prune.refine`, ours; "
            "`bisect` below). ") if k else ""


def _per_task(values: Mapping[str, Any], tasks: Sequence[str]) -> str:
    return ", ".join(f"{t} {values[t]}" for t in tasks)


def _render_sensitivity(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[str]:
    keys = ["+".join(tasks[:1]), "+".join(tasks)]
    out = ["PAM's grouping of the same networks under other KDE noise variances and thresholds α: neurons per "
           "partition over all hidden layers, accuracy right after merging (before any retraining) and the MACs "
           "of the unpruned merged network against the unpruned single-task networks:", "",
           "| noise variance | α conv / linear | D | C | E per task | accuracy at merge | no merging / PAM, "
           f"{keys[0]} | no merging / PAM, {keys[1]} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['noise_var']:g} | {r['alpha_conv']:g} / {r['alpha_linear']:g} |"
        if "error" in r:
            out.append(f"{head} – | – | – | refused: {r['error']} | – | – |")
            continue
        excl = _per_task(r["exclusive"], tasks)
        acc = ", ".join(f"{t} {r['acc_at_merge'][t]:.1f}" for t in tasks)
        ratio = r["no_merge_over_pam"]
        out.append(f"{head} {r['dropped']} | {r['shared']} | {excl} | {acc} | {ratio[keys[0]]:.2f}× | "
                   f"{ratio[keys[1]]:.2f}× |")
    return out


def _plot(path: Path, panels: Sequence[tuple[str, list[str], dict[str, list[float]], str]], ncols: int) -> Path:
    """Grouped bars, one panel per ``(title, x labels, {series: values}, y label)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.3 * nrows), squeeze=False)
    for ax, (title, keys, series, ylabel) in zip(axes.flat, panels, strict=False):
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(keys))], values, width, label=name)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pam(results: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """MMACs per task subset of no merging / naive / PAM at the budget, one panel per entry."""
    panels = []
    for label, entry in results.items():
        table = entry["summary"]["table"]
        met = _pam_digest(entry)["budget_met"]
        series = {APPROACH_LABELS[a] + ("" if met[a] else " (over budget)"): [r[f"{a}_macs"] / 1e6 for r in table]
                  for a in ("no_merge", "naive", "pam")}
        panels.append((label, [r["subset"] for r in table], series, "MMACs per sample"))
    return _plot(path, panels, ncols=2)


# --------------------------------------------------------------------------------------------------------- mfis


def _mfis_config(cfg, model: str, scale: str, threads: int, singles: Path):
    settings = json.loads(json.dumps(MFIS_SETTINGS[scale][model]))
    finetune = {**cfg.merge.retrain.model_dump(mode="json"), **settings.pop("finetune")}
    return MFISConfig.model_validate({
        "name": cfg.name.replace("pam_", "mfis_", 1), "seed": cfg.seed, "device": cfg.device,
        "data": cfg.data.model_dump(mode="json"), "tasks": cfg.tasks, "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "merge": {"method": "mfis", "singles": str(singles), "finetune": finetune, **settings},
        "cost": {**cfg.cost.model_dump(mode="json"), "threads": threads},
    })


def _pam_record(model: str, task_set: str, scale: str, threads: int, pam_folder: Path) -> dict:
    """The ``pam`` suite's entry of these settings: stored, or computed now and stored for the ``pam`` suite."""
    fingerprint, fn = _pam_entry(model, task_set, scale, threads, pam_folder)
    return _get(Entries(pam_folder, resume=True), f"{model}_{task_set}", fingerprint, fn, with_previous=True)


def run_mfis(scale: str = "cpu", out=None, threads: int | None = 1, resume: bool = False,
             models: Sequence[str] | None = None, task_sets: Sequence[str] | None = None,
             presence: bool | Sequence[str] = True, seeds: Sequence[int] = PRESENCE_SEEDS, **_) -> dict:
    """MFIS against no merging and PAM on the ``pam`` suite's single-task networks, and on the presence testbeds
    (``presence``: all, none, or those named) over ``seeds``; see the module docstring.

    With ``out``, the ``pam`` entries it compares with live in ``out/pam``; otherwise in ``benchmarks/results/pam``.
    """
    threads = threads or 1
    torch.set_num_threads(threads)
    folder = results_dir("mfis", out)
    pam_folder = results_dir("pam", None if out is None else Path(out) / "pam")
    entries = Entries(folder, resume=resume)
    results = {}
    for model, task_set in _selection(models, task_sets):
        label = f"{model}_{task_set}"
        pam = _pam_record(model, task_set, scale, threads, pam_folder)
        cfg = _pam_config(model, task_set, scale, threads)
        results[label] = {"mfis": _mfis_entry(entries, label, model, model, cfg, pam, scale, threads, folder,
                                              pam_folder), "pam": pam}
    summary = {"suite": "mfis", "scale": scale, "machine": machine(),
               "entries": {k: compare(v["mfis"], v["pam"]) for k, v in results.items()}}
    testbeds = _testbeds(presence)
    for testbed in testbeds:
        runs = {}
        for k, pam in _presence_runs(testbed, seeds, scale, threads, pam_folder, True).items():
            cfg = _presence_config(pam["seed"], scale, threads, testbed)
            runs[k] = {"mfis": _mfis_entry(entries, f"{testbed}_{k}", testbed, PRESENCE_TESTBEDS[testbed].model, cfg,
                                           pam, scale, threads, folder, pam_folder), "pam": pam}
        summary["entries"][testbed] = mfis_presence_digest(runs)
    legacy = {k: v for k, v in summary["entries"].items() if k not in PRESENCE_TESTBEDS}
    plot_mfis({**legacy, **{f"{t}_{k}": v for t in testbeds for k, v in summary["entries"][t]["runs"].items()}},
              folder / "mfis_vs_pam.png")
    atomic_write_json(folder / "summary.json", summary)
    atomic_write_text(folder / "report.md", render_mfis(summary))
    return {"suite": "mfis", "scale": scale, "runs": list(results),
            "no_merge_over_mfis": {k: {r["subset"]: r["no_merge_dense_over_mfis"] for r in v["table"]}
                                   for k, v in legacy.items()},
            "solver_seconds": {k: v["solver_seconds"] for k, v in legacy.items()},
            **{t: {k: v for k, v in summary["entries"][t].items() if k != "runs"} for t in testbeds}}


def _mfis_entry(entries: Entries, label: str, settings_key: str, model: str, cfg: Any, pam: Mapping[str, Any],
                scale: str, threads: int, folder: Path, pam_folder: Path) -> dict:
    """One ``mfis`` entry: MFIS on the single-task networks of the ``pam`` entry ``pam`` (same ``cfg``)."""
    probe = _mfis_config(cfg, settings_key, scale, threads, Path("singles"))
    # the pam entry's base settings (its networks; not how PAM is pruned), so a new PAM ladder keeps MFIS's entries
    networks = pam.get("networks_fingerprint", pam.get("base_fingerprint", pam["fingerprint"]))
    fingerprint = _fingerprint(_dump(probe), networks)
    without_rescue = _fingerprint(_dump(_without_rescue(probe)), networks)

    def fn(previous: Mapping[str, Any] | None = None) -> dict:
        if (previous and previous.get("fingerprint") == without_rescue != fingerprint
                and (previous["summary"].get("budget") or {}).get("within_budget")):
            # a candidate met the budget, so the rescue (only for a search that found none) would not have run:
            # the stored run is this run
            kept = {k: v for k, v in previous.items() if k != "fingerprint"}
            return {**kept, "settings": {**kept["settings"], "budget": probe.merge.budget.model_dump()},
                    "rescue_not_needed": previous["fingerprint"]}
        started = time.perf_counter()
        run_dir = prepare_run_dir(folder / label, overwrite=True)
        singles = prepare_singles(cfg, pam_folder / "runs" / "singles", run_dir / "singles")
        mcfg = _mfis_config(cfg, settings_key, scale, threads, run_dir / "singles")
        summary = run_from_config(mcfg, run_dir, quiet=True)
        torch.set_num_threads(threads)
        strip_weights(run_dir)
        return {"model": model, "tasks": cfg.tasks, "scale": scale, "singles": singles,
                "seconds": time.perf_counter() - started, "summary": summary,
                "settings": {**MFIS_SETTINGS[scale][settings_key], "importance": mcfg.merge.importance,
                             "align": mcfg.merge.align, "select": mcfg.merge.select},
                "pam_fingerprint": pam["fingerprint"]}

    return _get(entries, label, fingerprint, fn, with_previous=True)


def _without_rescue(mcfg: MFISConfig) -> MFISConfig:
    """``mcfg`` with MFIS's budget rescue off (``merge.budget.rescue_epochs = 0``)."""
    budget = mcfg.merge.budget
    if budget is None:
        return mcfg
    return mcfg.model_copy(update={"merge": mcfg.merge.model_copy(
        update={"budget": budget.model_copy(update={"rescue_epochs": 0})})})


def mfis_presence_digest(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A presence testbed's summary of the ``mfis`` suite from its per-seed ``{"mfis": entry, "pam": entry}``:
    MFIS within the budget in every seed, no merging / MFIS for all tasks (mean over seeds) and per single task
    (smallest), beside PAM's verdicts on the same networks (:func:`presence_digest`)."""
    compared = {k: compare(v["mfis"], v["pam"]) for k, v in runs.items()}
    pam = presence_digest({k: {**_pam_digest(v["pam"]), "seed": v["pam"]["seed"]} for k, v in runs.items()})
    rows = {k: {r["subset"]: r for r in c["table"]} for k, c in compared.items()}
    first = next(iter(compared.values()))
    tasks, all_key = first["tasks"], "+".join(first["tasks"])
    return {
        "within_budget": all(c["mfis_within_budget"] for c in compared.values()),
        "pam_within_budget": pam["within_budget"], "seeds": pam["seeds"],
        "exclusive_neurons": pam["exclusive_neurons"],
        "no_merge_over_pam_all_tasks": pam["no_merge_over_pam_all_tasks"],
        "no_merge_over_pam_single_task_min": pam["no_merge_over_pam_single_task_min"],
        "no_merge_over_mfis_all_tasks": sum(r[all_key]["no_merge_over_mfis"] for r in rows.values()) / len(rows),
        "no_merge_over_mfis_single_task_min": min(r[t]["no_merge_over_mfis"] for r in rows.values() for t in tasks),
        "runs": compared,
    }


def compare(mfis_entry: Mapping[str, Any], pam_entry: Mapping[str, Any]) -> dict:
    """One entry of the ``mfis`` report: cost per subset and accuracy per task of no merging, PAM and MFIS."""
    ms, ps = mfis_entry["summary"], pam_entry["summary"]
    tasks = list(ms["tasks"])
    drop = pam_entry["settings"]["accuracy_drop"]
    ref = ms["reference_acc"]
    pam_rows = {r["subset"]: r for r in ps["table"]}
    rows = []
    for r in ms["table"]:
        p = pam_rows[r["subset"]]
        row = {"subset": r["subset"], "no_merge_dense_macs": r["no_merge_macs"], "no_merge_macs": p["no_merge_macs"],
               "pam_macs": p["pam_macs"], "mfis_macs": r["mfis_macs"],
               "no_merge_dense_latency_ms": r["no_merge_latency_ms"], "no_merge_latency_ms": p["no_merge_latency_ms"],
               "pam_latency_ms": p["pam_latency_ms"], "mfis_latency_ms": r["mfis_latency_ms"]}
        row["no_merge_dense_over_mfis"] = row["no_merge_dense_macs"] / max(row["mfis_macs"], 1)
        row["no_merge_over_mfis"] = row["no_merge_macs"] / max(row["mfis_macs"], 1)
        row["no_merge_over_pam"] = row["no_merge_macs"] / max(row["pam_macs"], 1)
        row["pam_over_mfis"] = row["pam_macs"] / max(row["mfis_macs"], 1)
        rows.append(row)
    b = ps["budgets"]
    accuracy = {"single-task": ref, "no merging (pruned)": {t: b["no_merge"][t]["acc"][t] for t in tasks},
                "PAM (pruned)": b["pam"]["acc"], "MFIS (merged)": ms["acc_at_merge"],
                "MFIS (fine-tuned)": ms["acc_after_finetune"]}
    mfis_report = ms["mfis"]
    return {
        "model": mfis_entry["model"], "tasks": tasks, "settings": mfis_entry["settings"], "accuracy_drop": drop,
        "same_networks": all(abs(ref[t] - ps["reference_acc"][t]) < 1e-9 for t in tasks),
        "mfis_within_budget": all(ms["acc_after_finetune"][t] >= ref[t] - drop for t in tasks),
        "pam_budget_met": b["pam"]["budget_met"], "accuracy": accuracy, "table": rows, "budget": ms.get("budget"),
        "solver_seconds": ms["solver_seconds"], "search_seconds": mfis_report["seconds"],
        "pareto_size": len(mfis_report["front"]["F"]), "pam_seconds": ps["pam"]["partitions"]["seconds"],
        "seconds": mfis_entry["seconds"],
    }


def render_mfis(summary: Mapping[str, Any]) -> str:
    m = summary["machine"]
    lines = ["# mfis: many-objective filter index sharing against PAM and no merging, on multidigits", "",
             f"`mtprune bench mfis --scale {summary['scale']}`; {m['date']}, {m['cpu']}, {m['threads']} thread(s), "
             f"torch {m['torch']}, {m['device']}. MFIS is our reconstruction of Cheng et al. (Cognitive "
             "Computation 2021; METHODS.md §4): NSGA-III over T + 2 objectives, the knee of the Pareto front, "
             "then joint fine-tuning. It merges **the same single-task networks** as the `pam` suite's entry "
             "(same seeds, same data). *No merging* is given twice: the unpruned single-task networks, and each "
             "network pruned alone at the accuracy budget (from the `pam` entry). PAM and no merging are held to "
             "the budget (every task within the stated points of its single-task network); MFIS is not pruned "
             "further, its accuracy is reported as it is. MACs per sample; latency of a batch of 16, one thread.",
             "", "![cost and accuracy](mfis_vs_pam.png)", ""]
    for label, e in summary["entries"].items():
        lines += _render_mfis_presence(e, label) if label in PRESENCE_TESTBEDS else _render_mfis_entry(label, e)
    return "\n".join(lines)


def _render_mfis_entry(label: str, e: Mapping[str, Any]) -> list[str]:
    s = e["settings"]
    lines = [f"## {label}: {e['model']}, tasks {', '.join(e['tasks'])}", "",
             f"NSGA-III population {s['pop_size']}, {s['generations']} generations, importance "
             f"{s['importance']}, alignment {s['align']}, selection {s['select']}; fine-tuning "
             f"{s['finetune'].get('epochs')} epochs. Solver wall time **{e['solver_seconds']:.1f} s** "
             f"({e['pareto_size']} Pareto solutions; {e['search_seconds']:.1f} s with the statistics); PAM's "
             f"partitioning took {e['pam_seconds']:.1f} s. Same single-task networks as PAM: "
             f"{e['same_networks']}. MFIS within the {e['accuracy_drop']:g}-point budget: "
             f"{e['mfis_within_budget']}; PAM: {e['pam_budget_met']}.", "",
             "| accuracy (%) | " + " | ".join(e["tasks"]) + " |", "|---|" + "---|" * len(e["tasks"])]
    for name, acc in e["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[t]:.1f}" for t in e["tasks"]) + " |")
    if e.get("budget"):
        lines += ["", "Front points tried, cheapest first (MACs as a fraction of no merging; accuracy after "
                  "fine-tuning):", "", "| front point | MAC fraction | accuracy | within budget |", "|---|---|---|---|"]
        lines += [f"| {t['index']}{' (longer fine-tune)' if t.get('rescue') else ''} | {t['macs_fraction']:.3f} | "
                  + ", ".join(f"{k} {v:.1f}" for k, v in t["acc"].items()) + f" | {t['within_budget']} |"
                  for t in e["budget"]["trials"]]
    lines += ["", "| subset | no merging, unpruned | no merging, pruned | PAM, pruned | MFIS | unpruned / MFIS | "
              "pruned / MFIS | pruned / PAM |", "|---|---|---|---|---|---|---|---|"]
    for r in e["table"]:
        cells = [f"{r[f'{a}_macs'] / 1e6:.3f} ({_ms(r[f'{a}_latency_ms'])})"
                 for a in ("no_merge_dense", "no_merge", "pam", "mfis")]
        lines.append(f"| {r['subset']} | " + " | ".join(cells) + f" | {r['no_merge_dense_over_mfis']:.2f}× | "
                     f"{r['no_merge_over_mfis']:.2f}× | {r['no_merge_over_pam']:.2f}× |")
    return [*lines, ""]


def _render_mfis_presence(e: Mapping[str, Any], label: str = PRESENCE) -> list[str]:
    lines = [f"## {label}: MFIS on the presence testbed ({PRESENCE_TESTBEDS[label].title}), seeds {e['seeds']}", "",
             f"MFIS (the cheapest front point within the budget, filters aligned, fine-tuned) within the budget in "
             f"every seed: **{e['within_budget']}**; no merging (pruned at the budget) / MFIS for both tasks, mean "
             f"over seeds: **{e['no_merge_over_mfis_all_tasks']:.2f}×**, for a single task, smallest: "
             f"**{e['no_merge_over_mfis_single_task_min']:.2f}×**. PAM on the same networks: "
             f"{e['no_merge_over_pam_all_tasks']:.2f}× and {e['no_merge_over_pam_single_task_min']:.2f}× (within the "
             f"budget: {e['pam_within_budget']}; exclusive neurons, fewest: {e['exclusive_neurons']}).", ""]
    for k, run in e["runs"].items():
        lines += _render_mfis_entry(f"{label} {k}", run)
    return lines


def plot_mfis(entries: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Per entry: MMACs per task subset (no merging unpruned / pruned, PAM, MFIS) and accuracy per task."""
    panels = []
    for label, e in entries.items():
        names = {"no_merge_dense": "no merging", "no_merge": "no merging, pruned",
                 "pam": "PAM, pruned" + ("" if e["pam_budget_met"] else " (over budget)"),
                 "mfis": "MFIS" + ("" if e["mfis_within_budget"] else " (over budget)")}
        keys = [r["subset"] for r in e["table"]]
        panels.append((f"{label}: cost", keys, {n: [r[f"{a}_macs"] / 1e6 for r in e["table"]]
                                                for a, n in names.items()}, "MMACs per sample"))
        panels.append((f"{label}: accuracy", e["tasks"], {n: [acc[t] for t in e["tasks"]]
                                                          for n, acc in e["accuracy"].items()}, "accuracy (%)"))
    return _plot(path, panels, ncols=2)
