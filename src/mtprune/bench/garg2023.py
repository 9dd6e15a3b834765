"""Suite ``garg2023``: the two findings of Garg, Zhang, Guan, "Structured pruning for multi-task deep neural
networks" (arXiv 2304.06840, 2023; METHODS.md §1), on ``synthetic_scenes`` (seg, depth, normal; fresh training
scenes every epoch).

The paper's model: a VGG-16 backbone with one SmallASPP head per task, at a CPU width; here with BatchNorm
(VGG-16-BN: without it the CPU-sized VGG reached only 24 % mIoU, barely above a model that finds only wall and
ground). As in the paper only backbone filters are candidates (the heads lose input channels only), for both
criteria. One dense model per seed is trained once and shared by both criteria.

- (a) Taylor-FO against CosPrune along the paper's interleaved schedule (``interleaved_prune``: training goes on
  with AdamW and warm-restarted cosine annealing, and every ``interval`` iterations the lowest-scoring filters,
  scores averaged over the interval, are removed after restoring the interval's best validation weights),
  removing at every step the lowest-ranked filters worth the same fraction of the dense
  parameters (``params_per_step``), so both criteria meet at equal parameter counts step by step (removing equal
  filter counts did not: one filter of the last backbone layer, which feeds every head, weighs as much as a
  hundred of the first layer's). Beside them the control: the dense model trained on the same schedule without
  removals, so a pruned model's loss is measured against training alike. Paper: alike at matched parameters,
  CosPrune degrades more slowly at high pruning.
- (b) Some recorded architectures of each trajectory, rebuilt (``rebuild_from_widths``), re-initialised with
  the dense model's initialisation scheme and trained from scratch with the dense model's recipe, against
  their interleaved-pruned versions. Paper: at extreme pruning the retrained architectures do better.

Every trajectory point records the training epochs behind it (dense epochs + the interleaved iterations in
epochs); every scratch model gets the dense recipe's epochs. Every (seed, dense model), (seed, criterion) and
scratch retraining is a resumable entry (``--resume``), fingerprinted with its settings.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path

import torch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from .. import recipe
from ..config import RunConfig
from ..engine.checkpoint import load_model_state
from ..engine.trainer import Trainer
from ..models.layers import init_weights
from ..pruning.prune import count
from ..pruning.schedule import interleaved_prune, rebuild_from_widths
from ..report.plots import _save, plt
from ..tasks import delta_m
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from .common import Entries, SuiteData, fingerprint, machine, results_dir, suite_config

SUITE_VERSION = 3  # 2: interleaved schedule, VGG-16-BN, fresh scenes; 3: parameter budget per step, control
DENSE_VERSION = 2  # the dense models did not change in version 3
TRAJECTORY_VERSION = 2  # 2: every step measured recovered (after the interval of training that follows it)
CRITERIA = ("taylor", "cosprune")
CONTROL = "control"  # the dense model on the interleaved schedule, nothing removed (scores from taylor, unused)
TASKS = ("seg", "depth", "normal")
PRIMARY = {  # task -> (metric, axis label with units, higher is better)
    "seg": ("pixel_acc", "pixel accuracy (%)", True),
    "depth": ("abs_err", "absolute error (m)", False),
    "normal": ("mean", "mean angular error (°)", False),
}
BASE = {
    "name": "garg2023_bench", "device": "cpu",
    "data": {"name": "synthetic_scenes"},
    "tasks": {"preset": "synthetic_scenes", "names": list(TASKS)},
    # no dropout in the heads (as in the criteria suite: dropout 0.5 biased the eval-mode depth low)
    "model": {"name": "vgg16", "width": 0.125, "head": "small_aspp", "kwargs": {"batch_norm": True},
              "head_kwargs": {"dropout": 0.0}},
    "train": {"epochs": 30, "batch_size": 8, "lr": 0.001, "weight_decay": 0.0001, "optimizer": "adam",
              "scheduler": "cosine"},
}
# The interleaved schedule at the CPU scale: 9 removals of 7.5 % of the dense parameters each (0.325 kept at the
# end), one epoch of 512 fresh scenes (64 iterations of 8) between removals. The paper goes to 15.9 M of 84 M
# (0.19); here the heads' layers that only lose input channels hold 0.16 of the parameters and every backbone
# layer at its 5-filter minimum leaves about 0.22, where both criteria would end at the same widths. The paper's
# AdamW weight decay 1e-2 and cosine restarts; its lr (5e-5, for an ImageNet-pretrained VGG) is replaced by a
# quarter of the dense lr, as in the criteria suite's fine-tuning.
SCHEDULE = {"interval": 64, "params_per_step": 0.075, "steps": 9, "lr": 0.00025, "weight_decay": 0.01,
            "restart_epochs": 10, "min_channels": 5}
# scale -> config overrides and plan: seeds, schedule, steps retrained from scratch
SCALES: dict[str, dict] = {
    "small": {"config": {"data": {"name": "synthetic_scenes",
                                  "kwargs": {"n_train": 24, "n_val": 8, "height": 32, "width": 40}},
                         "model": {"head_kwargs": {"hidden": 256, "dropout": 0.0}},
                         "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8}},
              "seeds": (0,), **SCHEDULE, "interval": 3, "params_per_step": 0.25, "steps": 2, "scratch_steps": (2,)},
    "cpu": {"config": {}, "seeds": (0, 1, 2), **SCHEDULE, "scratch_steps": (5, 9)},
    "gpu": {"config": {"device": "auto", "model": {"width": 0.5},
                       "data": {"name": "synthetic_scenes", "kwargs": {"n_train": 2048, "height": 128, "width": 160}},
                       "train": {"epochs": 40, "batch_size": 16}},
            "seeds": (0, 1, 2), **SCHEDULE, "interval": 128, "steps": 9, "scratch_steps": (5, 9)},
}


def _config(scale: str, seed: int) -> RunConfig:
    return suite_config(BASE, SCALES[scale]["config"], seed, f"garg2023 bench ({scale})")


class _Setup(SuiteData):
    """One seed's data and its dense model (trained once, in ``runs/s<seed>/dense``)."""

    def __init__(self, cfg: RunConfig, runs: Path) -> None:
        super().__init__(cfg)
        self.dir = runs / f"s{cfg.seed}"
        self.dense_dir = self.dir / "dense"

    def train(self, model: torch.nn.Module, run_dir: Path, resume: bool) -> dict:
        """Train with the dense recipe, keep the best validation checkpoint, return its metrics and cost."""
        start = time.perf_counter()
        opts = recipe.train_options(self.cfg, quiet=True, resume=resume and (run_dir / "checkpoints").is_dir())
        summary = Trainer(model, self.tasks, self.train_set, self.val_set, run_dir, opts).fit()
        if summary.best_checkpoint:
            load_model_state(model, summary.best_checkpoint)
        params, macs = count(model, self.x)
        return {"metrics": self.evaluate(model), "params": params, "macs": macs, "epochs": self.cfg.train.epochs,
                "best_epoch": summary.best_epoch, "seconds": time.perf_counter() - start}


def _dense(setup: _Setup, resume: bool) -> dict:
    if not resume and setup.dense_dir.exists():
        shutil.rmtree(setup.dense_dir)  # never resume another recipe's checkpoints
    return setup.train(recipe.build_configured_model(setup.cfg, setup.tasks), setup.dense_dir, resume)


def _entry_dir(path: Path, key: str, resume: bool) -> bool:
    """Make ``path`` the run directory of the entry fingerprinted ``key``; True when it resumes a run of that same
    entry. A directory left by other settings (another suite version) is cleared, never resumed."""
    mark = path / "entry_fingerprint"
    same = resume and mark.is_file() and mark.read_text() == key
    if not same and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mark, key)
    return same


def _interleaved(setup: _Setup, criterion: str, plan: dict, dense: dict, resume: bool, key: str) -> dict:
    """The paper's interleaved schedule from the seed's dense model with ``criterion`` (backbone filters only), or
    with nothing removed (``CONTROL``)."""
    start = time.perf_counter()
    cfg = setup.cfg
    rebuild = lambda: recipe.build_configured_model(cfg, setup.tasks)  # noqa: E731
    model = rebuild()
    load_model_state(model, setup.dense_dir / "checkpoints" / "best.pt")
    run_dir = setup.dir / criterion
    resume = _entry_dir(run_dir, key, resume)
    removal = {"filters_per_step": 0} if criterion == CONTROL else {"params_per_step": plan["params_per_step"]}
    _, records = interleaved_prune(
        model, setup.x, setup.tasks, setup.train_set, setup.val_set, run_dir,
        criterion="taylor" if criterion == CONTROL else criterion, interval=plan["interval"], **removal,
        max_steps=plan["steps"],
        lr=plan["lr"], weight_decay=plan["weight_decay"], restart_epochs=plan["restart_epochs"],
        batch_size=cfg.train.batch_size, min_channels=plan["min_channels"], seed=cfg.seed, device=cfg.device,
        rebuild=rebuild, resume=resume, exclude_parts=tuple(setup.tasks))  # heads lose input channels only
    per_epoch = math.ceil(len(setup.train_set) / cfg.train.batch_size)
    # each step as it is worth once training has gone on (interleaved_prune's recovered state: the interval after
    # the removal), and right after the removal (``pruned_*``)
    steps = []
    for r in records:
        metrics, iteration = r.extra.get("recovered", r.metrics), r.extra.get("recovered_iteration", r.iteration or 0)
        steps.append({"step": r.step, "params": r.params, "macs": r.macs, "metrics": metrics,
                      "delta_m": delta_m(metrics, dense["metrics"], setup.tasks), "pruned_metrics": r.metrics,
                      "pruned_delta_m": delta_m(r.metrics, dense["metrics"], setup.tasks), "widths": r.widths,
                      "iteration": iteration, "epochs": cfg.train.epochs + iteration / per_epoch})
    return {"criterion": criterion, "seed": cfg.seed, "trajectory": steps, "seconds": time.perf_counter() - start}


def _zoo_init(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise with the dense model's own scheme (He normal convs, zero biases, task output layers
    N(0, 0.01)), sized for the thin layers: PyTorch's default init, which ``rebuild_from_widths`` leaves, has a
    sixth of He's variance per layer, which starves a 16-layer chain without BatchNorm of signal."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_weights(model)
        for head in model.heads.values():
            for layer in getattr(head, "predictor", []):
                torch.nn.init.normal_(layer.weight, 0.0, 0.01)


def _scratch(setup: _Setup, criterion: str, point: dict, dense: dict, resume: bool, key: str) -> dict:
    """The architecture of one trajectory point, re-initialised and trained with the dense recipe."""
    rebuild = lambda: recipe.build_configured_model(setup.cfg, setup.tasks)  # noqa: E731
    model = rebuild_from_widths(rebuild, setup.x, point["widths"], seed=setup.cfg.seed)
    _zoo_init(model, setup.cfg.seed)
    run_dir = setup.dir / f"{criterion}_scratch_{point['step']}"
    out = setup.train(model, run_dir, _entry_dir(run_dir, key, resume))
    return {"criterion": criterion, "seed": setup.cfg.seed, "step": point["step"], **out,
            "delta_m": delta_m(out["metrics"], dense["metrics"], setup.tasks),
            "iterative": _iterative(point)}


def _iterative(point: dict) -> dict:
    """What a scratch row compares with: its trajectory point (recovered metrics, epochs)."""
    return {k: point[k] for k in ("params", "metrics", "delta_m", "epochs")}


def run(scale: str = "cpu", out=None, threads: int | None = 1, resume: bool = False,
        seeds: tuple[int, ...] | None = None, **_) -> dict:
    """Run the suite; writes ``results.json``, ``results.md`` and the figures under ``benchmarks/results/garg2023``.
    ``seeds`` runs a subset of the scale's seeds (a final ``resume`` run without it gathers them)."""
    if scale not in SCALES:
        raise MTPruneInputError(f"garg2023: scale must be one of {sorted(SCALES)}, got {scale!r}")
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    plan = SCALES[scale] if not seeds else {**SCALES[scale], "seeds": tuple(seeds)}
    folder = results_dir("garg2023", out)
    entries = Entries(folder, resume=resume)
    dense, trajectories, scratch = {}, {c: [] for c in (*CRITERIA, CONTROL)}, []
    for seed in plan["seeds"]:
        setup = _Setup(_config(scale, seed), folder / "runs")
        config = setup.cfg.model_dump(mode="json")
        base = (SUITE_VERSION, config)
        dense[seed] = entries.get(f"s{seed}_dense", lambda s=setup: _dense(s, resume),
                                  fingerprint(DENSE_VERSION, config))
        if not (setup.dense_dir / "checkpoints" / "best.pt").is_file():  # the entry survived, its model did not
            dense[seed] = _dense(setup, False)
        schedule = {k: v for k, v in plan.items() if k not in ("config", "seeds", "scratch_steps")}
        for crit in (*CRITERIA, CONTROL):
            key = fingerprint(*base, schedule, crit, TRAJECTORY_VERSION)
            traj = entries.get(f"s{seed}_{crit}",
                               lambda s=setup, c=crit, d=dense[seed], k=key: _interleaved(s, c, plan, d, resume, k),
                               key)
            trajectories[crit].append(traj)
            for point in traj["trajectory"] if crit != CONTROL else ():
                if point["step"] in plan["scratch_steps"]:
                    key = fingerprint(*base, schedule, crit, point["widths"])
                    fn = lambda s=setup, c=crit, p=point, d=dense[seed], k=key: _scratch(s, c, p, d, resume, k)  # noqa: E731
                    row = entries.get(f"s{seed}_{crit}_scratch_{point['step']}", fn, key)
                    # the architecture alone keys the scratch model; its comparison is the current trajectory's point
                    scratch.append({**row, "iterative": _iterative(point)})
    result = {"suite": "garg2023", "scale": scale, "machine": machine(),
              "config": _config(scale, plan["seeds"][0]).model_dump(mode="json"),
              "plan": {k: v for k, v in plan.items() if k != "config"},
              "dense": {str(k): v for k, v in dense.items()},
              "trajectories": trajectories, "scratch": scratch,
              "summary": {c: summarise_trajectory(trajectories[c]) for c in (*CRITERIA, CONTROL)},
              "scratch_summary": summarise_scratch(scratch),
              "seconds": time.perf_counter() - start,
              "compute_seconds": sum(e["seconds"] for e in [*dense.values(), *scratch,
                                                           *(t for ts in trajectories.values() for t in ts)])}
    result["n_train"] = len(setup.train_set)
    result["dense_summary"] = {k: _mean_std([d["metrics"]["seg"][k] for d in dense.values()])
                               for k in ("miou", "pixel_acc")}
    result["verdicts"] = verdicts(result)
    atomic_write_json(folder / "results.json", result)
    dense_ref = {t: _mean_std([d["metrics"][t][PRIMARY[t][0]] for d in dense.values()])[0] for t in TASKS}
    plot_trajectories(result["summary"], dense_ref, folder / "a_metric_vs_params.png")
    plot_scratch(result["scratch_summary"], dense_ref, folder / "b_scratch_vs_iterative.png")
    atomic_write_text(folder / "results.md", markdown(result))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _point_summary(points: list[dict], params0: float) -> dict:
    return {"params": statistics.fmean(p["params"] for p in points),
            "params_kept": statistics.fmean(p["params"] for p in points) / params0,
            "epochs": statistics.fmean(p.get("epochs", 0.0) for p in points),
            "delta_m": _mean_std([p["delta_m"] for p in points]),
            "pruned_delta_m": _mean_std([p.get("pruned_delta_m", p["delta_m"]) for p in points]),
            "metrics": {t: {m: _mean_std([p["metrics"][t][m] for p in points]) for m in points[0]["metrics"][t]}
                        for t in points[0]["metrics"]},
            "seeds": len(points)}


def summarise_trajectory(runs: list[dict]) -> list[dict]:
    """Per step, over seeds: mean parameters, mean ± std of every metric and of Δm."""
    params0 = statistics.fmean(r["trajectory"][0]["params"] for r in runs)
    n = min(len(r["trajectory"]) for r in runs)
    return [{"step": i, **_point_summary([r["trajectory"][i] for r in runs], params0)} for i in range(n)]


def summarise_scratch(rows: list[dict]) -> dict[str, list[dict]]:
    """criterion → per retrained step: the scratch and the iterative model, mean ± std over seeds."""
    out: dict[str, list[dict]] = {}
    for crit in CRITERIA:
        for step in sorted({r["step"] for r in rows if r["criterion"] == crit}):
            rs = [r for r in rows if r["criterion"] == crit and r["step"] == step]
            out.setdefault(crit, []).append({
                "step": step, "seeds": len(rs),
                "scratch": _point_summary(rs, 1.0),
                "iterative": _point_summary([r["iterative"] for r in rs], 1.0),
                "gap_pixel_acc": _mean_std([r["metrics"]["seg"]["pixel_acc"]
                                            - r["iterative"]["metrics"]["seg"]["pixel_acc"] for r in rs]),
                "gap_delta_m": _mean_std([r["delta_m"] - r["iterative"]["delta_m"] for r in rs]),
                "scratch_better_pixel_acc": sum(r["metrics"]["seg"]["pixel_acc"]
                                                > r["iterative"]["metrics"]["seg"]["pixel_acc"] for r in rs),
                "scratch_better_delta_m": sum(r["delta_m"] > r["iterative"]["delta_m"] for r in rs)})
    return out


def _paired(result: dict, step: int, key) -> list[float]:
    """Per seed: cosprune's value minus taylor's at ``step`` of the trajectory."""
    taylor, cosprune = (result["trajectories"][c] for c in CRITERIA)
    return [key(c["trajectory"][step]) - key(t["trajectory"][step]) for t, c in zip(taylor, cosprune, strict=True)]


def _pa(point: dict) -> float:
    return point["metrics"]["seg"]["pixel_acc"]


def verdicts(result: dict) -> dict[str, dict]:
    """Each finding of the paper, judged from the numbers.

    (a) holds when, at the most pruned step, CosPrune's seg pixel accuracy and Δm are both above Taylor's in
    every seed, and at the intermediate steps the two are alike (|mean Δm gap| < 1 point, or a gap whose sign
    differs between seeds). (b) holds when, at the most pruned retrained architecture, the scratch model beats
    the iteratively pruned one in pixel accuracy and Δm in every seed, for both criteria.
    """
    summ, seeds = result["summary"], len(result["dense"])
    last = min(len(summ[c]) for c in CRITERIA) - 1  # both criteria have removed the same parameters by then
    gaps_pa, gaps_dm = _paired(result, last, _pa), _paired(result, last, lambda p: p["delta_m"])
    slower = all(g > 0 for g in gaps_pa) and all(g > 0 for g in gaps_dm)
    between = []  # the intermediate steps: CosPrune's Δm minus Taylor's
    for step in range(1, last):
        g = _paired(result, step, lambda p: p["delta_m"])
        between.append({"step": step, "params_kept": summ["taylor"][step]["params_kept"],
                        "gap": statistics.fmean(g), "seeds_cosprune_higher": sum(x > 0 for x in g),
                        "alike": abs(statistics.fmean(g)) < 1.0 or min(g) < 0 < max(g)})
    alike = all(x["alike"] for x in between)
    a = {"holds": slower and alike, "cosprune_slower": slower, "alike_before_last": alike, "between": between,
         "last_step": last, "params": {c: summ[c][last]["params"] for c in CRITERIA},
         "pixel_acc": {c: summ[c][last]["metrics"]["seg"]["pixel_acc"] for c in CRITERIA},
         "delta_m": {c: summ[c][last]["delta_m"] for c in CRITERIA},
         "seeds_cosprune_higher_pixel_acc": sum(g > 0 for g in gaps_pa),
         "seeds_cosprune_higher_delta_m": sum(g > 0 for g in gaps_dm), "seeds": seeds,
         "control_delta_m": summ[CONTROL][min(last, len(summ[CONTROL]) - 1)]["delta_m"] if CONTROL in summ else None}
    b: dict = {"seeds": seeds, "per_criterion": {}}
    for crit, rows in result["scratch_summary"].items():
        row = rows[-1]
        b["per_criterion"][crit] = {
            "step": row["step"], "params": row["scratch"]["params"],
            "scratch_pixel_acc": row["scratch"]["metrics"]["seg"]["pixel_acc"],
            "iterative_pixel_acc": row["iterative"]["metrics"]["seg"]["pixel_acc"],
            "scratch_delta_m": row["scratch"]["delta_m"], "iterative_delta_m": row["iterative"]["delta_m"],
            "seeds_scratch_better": min(row["scratch_better_pixel_acc"], row["scratch_better_delta_m"])}
    b["holds_for"] = [c for c, v in b["per_criterion"].items() if v["seeds_scratch_better"] == seeds]
    b["holds"] = bool(b["per_criterion"]) and len(b["holds_for"]) == len(b["per_criterion"])
    return {"a": a, "b": b}


def _pm(ms: tuple[float, float] | list[float], seeds: int, fmt: str = ".2f") -> str:
    return f"{ms[0]:{fmt}} ± {ms[1]:{fmt}}" if seeds > 1 else f"{ms[0]:{fmt}}"


def _verdict_a(r: dict) -> str:
    a, n = r["verdicts"]["a"], r["verdicts"]["a"]["seeds"]
    t, c = "taylor", "cosprune"
    between = a["between"]
    if between:
        worst = max(between, key=lambda x: abs(x["gap"]))
        unlike = [x for x in between if not x["alike"]]
        alike = (f"Before the last step the criteria are within {abs(worst['gap']):.2f} points of Δm of each other "
                 f"(largest gap at step {worst['step']}, {worst['params_kept']:.2f} of the parameters kept: CosPrune "
                 f"{worst['gap']:+.2f}, higher in {worst['seeds_cosprune_higher']} of {n} seeds)"
                 + (", alike by the rule below at every step" if not unlike else
                    f"; not alike by the rule below at step{'s' if len(unlike) > 1 else ''} "
                    f"{', '.join(str(x['step']) for x in unlike)}"
                    + (f" (alike at {', '.join(str(x['step']) for x in between if x['alike'])})"
                       if len(unlike) < len(between) else "")))
    else:
        alike = "There is no intermediate step"
    direction = "more slowly" if a["cosprune_slower"] else ("faster" if a["seeds_cosprune_higher_delta_m"] == 0
                                                            else "neither clearly faster nor more slowly")
    return (f"**Finding (a) {'holds' if a['holds'] else 'does not hold here'}.** {alike}. At the most pruned step "
            f"({a['params'][c] / 1e6:.3f} M CosPrune, {a['params'][t] / 1e6:.3f} M Taylor parameters) CosPrune "
            f"degrades {direction}: seg pixel accuracy {_pm(a['pixel_acc'][c], n)} % against Taylor's "
            f"{_pm(a['pixel_acc'][t], n)} % (higher in {a['seeds_cosprune_higher_pixel_acc']} of {n} seeds), Δm "
            f"{_pm(a['delta_m'][c], n)} against {_pm(a['delta_m'][t], n)} % (higher in "
            f"{a['seeds_cosprune_higher_delta_m']} of {n})"
            + (f"; the control (same training, nothing removed) is at Δm {_pm(a['control_delta_m'], n)} %"
               if a.get("control_delta_m") else "")
            + ". Paper: 42.5 against 39 pixel accuracy at 15.9 M of 84 M.")


def _verdict_b(r: dict) -> str:
    b, n = r["verdicts"]["b"], r["verdicts"]["b"]["seeds"]
    parts = [f"{crit} at {v['params'] / 1e6:.3f} M parameters (step {v['step']}): pixel accuracy "
             f"{_pm(v['scratch_pixel_acc'], n)} % from scratch against {_pm(v['iterative_pixel_acc'], n)} % "
             f"iteratively pruned, Δm {_pm(v['scratch_delta_m'], n)} against {_pm(v['iterative_delta_m'], n)} % "
             f"(scratch better on both in {v['seeds_scratch_better']} of {n} seeds)"
             for crit, v in b["per_criterion"].items()]
    verdict = ("holds" if b["holds"] else f"holds for {', '.join(b['holds_for'])} only, not for "
               f"{', '.join(c for c in b['per_criterion'] if c not in b['holds_for'])}" if b["holds_for"]
               else "does not hold here")
    text = "; ".join(parts)
    return (f"**Finding (b) {verdict}.** " + text[:1].upper() + text[1:]
            + ". Paper: about 44.4 (CosPrune) and 41.8 (Taylor) from scratch against about 35 iteratively pruned, "
              "at 14.4 M of 84 M.")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def markdown(r: dict) -> str:
    m, plan, n = r["machine"], r["plan"], len(r["dense"])
    train, width = r["config"]["train"], r["config"]["model"]["width"]
    dense = list(r["dense"].values())
    epochs = train["epochs"]
    bn = "BN" if r["config"]["model"].get("kwargs", {}).get("batch_norm") else "no BN"
    per_step = plan["interval"] * train["batch_size"] / r["n_train"]
    setting = (
        f"Setting: `synthetic_scenes` ({', '.join(TASKS)}; fresh training scenes every epoch), VGG-16 ({bn}) + "
        f"SmallASPP heads at width {width}, {dense[0]['params'] / 1e6:.3f} M parameters. Dense model: "
        f"{_n(epochs, 'epoch')} of Adam (lr {train['lr']}, weight decay {train['weight_decay']}, cosine), best "
        f"validation checkpoint; it reaches seg mIoU {_pm(r['dense_summary']['miou'], n)} %, pixel accuracy "
        f"{_pm(r['dense_summary']['pixel_acc'], n)} %. Interleaved pruning (Garg et al.) of backbone filters only "
        f"(global ranking, at least {plan['min_channels']} filters per layer): training goes on with AdamW (lr "
        f"{plan['lr']}, weight decay {plan['weight_decay']}, cosine restarted every {plan['restart_epochs']} epochs) "
        f"and every {plan['interval']} iterations ({per_step:g} epochs) the lowest-scoring filters worth "
        f"{plan['params_per_step']:.0%} of the dense parameters are removed (equal parameters for both criteria at "
        f"every step), {plan['steps']} times; the model at step k ≥ 1 has had {epochs} + (k + 1) × {per_step:g} "
        "epochs (the interval after its removal included). "
        "Control: the dense model trained on the same schedule, nothing removed. Retraining from scratch: the "
        "recorded widths of steps "
        f"{', '.join(map(str, plan['scratch_steps']))}, re-initialised at random with the dense model's scheme (He "
        f"normal), trained with the dense recipe ({_n(epochs, 'epoch')}). "
        f"{_n(n, 'seed')} (dense model, pruning statistics, initialisation); mean ± std over seeds. Δm: against "
        "the dense model of the same seed, over every metric of every task (%, higher is better).")
    lines = [
        "# Garg et al. 2023: Taylor against CosPrune, interleaved pruning against retraining from scratch", "",
        f"Command: `mtprune bench garg2023 --scale {r['scale']} --threads {m['threads']}`; {m['cores']} cores, "
        f"{m['device']}, torch {m['torch']}, {m['date']}; {r['compute_seconds'] / 60:.1f} min of compute (the sum over "
        "the suite's entries).", "", setting, "",
        "## Verdicts", "", _verdict_a(r), "", _verdict_b(r), "",
        "## (a) Along the interleaved schedule", "",
        "Each step after the interval of training that follows its removal (its best validation state; the last "
        "removal gets one more interval), as the epochs column counts; the last column is the same step right after "
        "the removal.", "",
        "| criterion | step | epochs | params (M) | kept | seg pixel acc % | seg mIoU % | depth abs err (m) | "
        "normal mean ° | Δm % | Δm % right after the removal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for crit, steps in r["summary"].items():
        for s in steps:
            mt = s["metrics"]
            lines.append(f"| {crit} | {s['step']} | {s['epochs']:g} | {s['params'] / 1e6:.3f} | "
                         f"{s['params_kept']:.3f} | "
                         f"{_pm(mt['seg']['pixel_acc'], n)} | {_pm(mt['seg']['miou'], n)} | "
                         f"{_pm(mt['depth']['abs_err'], n, '.3f')} | {_pm(mt['normal']['mean'], n)} | "
                         f"{_pm(s['delta_m'], n)} | {_pm(s['pruned_delta_m'], n)} |")
    lines += ["", "![metric against parameters](a_metric_vs_params.png)", "",
              "## (b) The same architectures retrained from scratch", "",
              "| criterion | step | params (M) | epochs: pruned | scratch | seg pixel acc %: pruned | scratch | "
              "Δm %: pruned | scratch | scratch better (seeds) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for crit, rows in r["scratch_summary"].items():
        for row in rows:
            it, sc = row["iterative"], row["scratch"]
            better = min(row["scratch_better_pixel_acc"], row["scratch_better_delta_m"])
            lines.append(f"| {crit} | {row['step']} | {sc['params'] / 1e6:.3f} | {it['epochs']:g} | "
                         f"{sc['epochs']:g} | {_pm(it['metrics']['seg']['pixel_acc'], n)} | "
                         f"{_pm(sc['metrics']['seg']['pixel_acc'], n)} "
                         f"| {_pm(it['delta_m'], n)} | {_pm(sc['delta_m'], n)} | {better} of {row['seeds']} |")
    lines += ["", "![scratch against iterative](b_scratch_vs_iterative.png)", "",
              "Verdict rules: (a) holds when, at the most pruned step, CosPrune's seg pixel accuracy and Δm are both "
              "above Taylor's in every seed, and at every intermediate step the criteria are alike (|mean Δm gap| "
              "< 1 point, or the gap changes sign between seeds). (b) holds when, at the most pruned retrained "
              "architecture, the scratch model beats the iterative one in pixel accuracy and Δm in every seed, for "
              "both criteria.", ""]
    return "\n".join(lines)


def _panels(ref: dict[str, float], title: str):
    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(3.6 * (len(TASKS) + 1), 3.4))
    for ax, task in zip(axes, TASKS, strict=False):
        metric, label, higher = PRIMARY[task]
        ax.axhline(ref[task], color="grey", ls=":", lw=1.2, label="dense")
        ax.set_title(f"{task} ({'higher' if higher else 'lower'} is better)")
        ax.set_ylabel(label)
    axes[-1].axhline(0, color="grey", ls=":", lw=1.2, label="dense")
    axes[-1].set_title("Δm against dense (higher is better)")
    axes[-1].set_ylabel("Δm (%)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M, log scale)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig, axes


def _x_ticks(axes, xs: list[float]) -> None:
    """Readable ticks on a log axis of any span: 1-2-5 steps, finer round steps on a shorter span, or the data's
    own values (at least 15 % apart, so labels never overlap) on a narrow one."""
    lo, hi = min(xs), max(xs)
    ticks: list[float] = []
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [m * 10.0**k for k in range(-3, 4) for m in mantissas if lo / 1.05 <= m * 10.0**k <= hi * 1.05]
        if len(ticks) >= 3:
            break
    if len(ticks) < 3:
        ticks = []
        for x in sorted(xs):
            if not ticks or x / ticks[-1] > 1.15:
                ticks.append(x)
    for ax in axes:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_locator(NullLocator())


def _line(axes, points: list[dict], label: str, **style) -> None:
    xs = [p["params"] / 1e6 for p in points]
    for ax, task in zip(axes, TASKS, strict=False):
        metric = PRIMARY[task][0]
        ax.errorbar(xs, [p["metrics"][task][metric][0] for p in points],
                    yerr=[p["metrics"][task][metric][1] for p in points], label=label, capsize=2, **style)
    axes[-1].errorbar(xs, [p["delta_m"][0] for p in points], yerr=[p["delta_m"][1] for p in points], label=label,
                      capsize=2, **style)


COLORS = {"taylor": "tab:blue", "cosprune": "tab:orange"}


def plot_trajectories(summary: dict[str, list[dict]], ref: dict[str, float], path: Path) -> Path:
    """(a): one panel per task (its main metric) plus Δm, against parameters; one line per criterion, and the
    control's last step (dense parameters, trained as long) as a dashed level."""
    fig, axes = _panels(ref, "Interleaved pruning: Taylor-FO against CosPrune (error bars: std over seeds)")
    for crit in (c for c in CRITERIA if c in summary):
        _line(axes, summary[crit], crit, marker="o", color=COLORS[crit])
    if summary.get(CONTROL):
        last = summary[CONTROL][-1]
        for ax, task in zip(axes, TASKS, strict=False):
            ax.axhline(last["metrics"][task][PRIMARY[task][0]][0], color="black", ls="--", lw=1, label="control")
        axes[-1].axhline(last["delta_m"][0], color="black", ls="--", lw=1, label="control")
    _x_ticks(axes, [p["params"] / 1e6 for c in CRITERIA for p in summary.get(c, [])])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_scratch(summary: dict[str, list[dict]], ref: dict[str, float], path: Path) -> Path:
    """(b): the retrained architectures, iteratively pruned (solid) against trained from scratch (dashed)."""
    fig, axes = _panels(ref, "Same architectures: iteratively pruned (solid) against retrained from scratch (dashed)")
    for crit in (c for c in CRITERIA if c in summary):
        rows = summary[crit]
        _line(axes, [r["iterative"] for r in rows], f"{crit}, iterative", marker="o", color=COLORS[crit])
        _line(axes, [r["scratch"] for r in rows], f"{crit}, from scratch", marker="s", ls="--", mfc="none",
              color=COLORS[crit])
    _x_ticks(axes, [r[k]["params"] / 1e6 for rows in summary.values() for r in rows for k in ("iterative", "scratch")])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
