"""Suite ``garg2023``: the two findings of Garg, Zhang, Guan, "Structured pruning for multi-task deep neural
networks" (arXiv 2304.06840, 2023; METHODS.md §1), on ``synthetic_scenes`` (seg, depth, normal).

The paper's model: a VGG-16 backbone (no BatchNorm) with one SmallASPP head per task, at a CPU width. As in
the paper only backbone filters are pruned (the heads lose input channels only). One dense model per seed is
trained once and shared by both criteria.

- (a) Taylor-FO against CosPrune along the same iterative schedule (``target_params`` reached geometrically
  in ``steps`` steps, each fine-tuned for the same epochs): per-task metric against parameter count.
  Paper: alike at matched parameters, CosPrune degrades more slowly at high pruning.
- (b) Some recorded architectures of each trajectory, rebuilt (``rebuild_from_widths``), re-initialised with
  the dense model's initialisation scheme and trained from scratch with the dense model's recipe, against
  their iteratively pruned versions. Paper: at extreme pruning the retrained architectures do better.

Every (seed, dense model), (seed, criterion) and scratch retraining is a resumable entry (``--resume``).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from .. import recipe
from ..config import RunConfig, parse_config
from ..engine.checkpoint import load_model_state
from ..engine.trainer import Trainer
from ..models.layers import init_weights
from ..pipeline import compress
from ..pruning.prune import count
from ..pruning.schedule import rebuild_from_widths
from ..report.plots import _save, plt
from ..tasks import delta_m
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from .common import Entries, SuiteData, machine, results_dir, suite_config

CRITERIA = ("taylor", "cosprune")
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
    "model": {"name": "vgg16", "width": 0.125, "head": "small_aspp"},
    "train": {"epochs": 24, "batch_size": 8, "lr": 0.001, "weight_decay": 0.0001, "optimizer": "adam",
              "scheduler": "cosine"},
}
# scale -> config overrides and schedule: seeds, params target, steps, fine-tuning epochs, steps retrained
SCALES: dict[str, dict] = {
    "small": {"config": {"data": {"name": "synthetic_scenes",
                                  "kwargs": {"n_train": 24, "n_val": 8, "height": 32, "width": 40}},
                         "model": {"head_kwargs": {"hidden": 256}},
                         "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8}},
              "seeds": (0,), "target_params": 0.4, "steps": 2, "finetune_epochs": 1, "scratch_steps": (2,)},
    "cpu": {"config": {}, "seeds": (0, 1), "target_params": 0.25, "steps": 5, "finetune_epochs": 2,
            "scratch_steps": (3, 5)},
    "gpu": {"config": {"device": "auto", "model": {"width": 0.5},
                       "data": {"name": "synthetic_scenes", "kwargs": {"n_train": 2048, "height": 128, "width": 160}},
                       "train": {"epochs": 40, "batch_size": 16}},
            "seeds": (0, 1, 2), "target_params": 0.2, "steps": 8, "finetune_epochs": 4, "scratch_steps": (4, 6, 8)},
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
        return {"metrics": self.evaluate(model), "params": params, "macs": macs,
                "seconds": time.perf_counter() - start}


def _dense(setup: _Setup, resume: bool) -> dict:
    return setup.train(recipe.build_configured_model(setup.cfg, setup.tasks), setup.dense_dir, resume)


def _iterative(setup: _Setup, criterion: str, plan: dict, dense: dict, resume: bool) -> dict:
    """Iterative pruning of the seed's dense model with ``criterion`` (backbone filters only)."""
    start = time.perf_counter()
    cfg = setup.cfg
    prune = {"start": str(setup.dense_dir), "criterion": criterion, "target_params": plan["target_params"],
             "schedule": "iterative", "steps": plan["steps"], "allocator": "global", "min_channels": 5,
             "part_ratios": {t: 0.0 for t in setup.tasks},  # heads lose input channels only (Garg et al.)
             "stats_batches": 8, "stats_batch_size": 8,
             "finetune": {**cfg.train.model_dump(), "epochs": plan["finetune_epochs"], "lr": cfg.train.lr / 2}}
    run_cfg = parse_config({**cfg.model_dump(), "prune": prune}, "garg2023 bench")
    run_dir = setup.dir / criterion
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = compress(run_cfg, run_dir, quiet=True, resume=resume)
    steps = [{"step": r["step"], "params": r["params"], "macs": r["macs"], "metrics": r["metrics"],
              "delta_m": delta_m(r["metrics"], dense["metrics"], setup.tasks), "widths": r["widths"]}
             for r in summary["trajectory"]]
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


def _scratch(setup: _Setup, criterion: str, point: dict, dense: dict, resume: bool) -> dict:
    """The architecture of one trajectory point, re-initialised and trained with the dense recipe."""
    rebuild = lambda: recipe.build_configured_model(setup.cfg, setup.tasks)  # noqa: E731
    model = rebuild_from_widths(rebuild, setup.x, point["widths"], seed=setup.cfg.seed)
    _zoo_init(model, setup.cfg.seed)
    out = setup.train(model, setup.dir / f"{criterion}_scratch_{point['step']}", resume)
    return {"criterion": criterion, "seed": setup.cfg.seed, "step": point["step"], **out,
            "delta_m": delta_m(out["metrics"], dense["metrics"], setup.tasks),
            "iterative": {k: point[k] for k in ("params", "metrics", "delta_m")}}


def run(scale: str = "cpu", out=None, threads: int | None = 1, resume: bool = False, **_) -> dict:
    """Run the suite; writes ``results.json``, ``results.md`` and the figures under ``benchmarks/results/garg2023``."""
    if scale not in SCALES:
        raise MTPruneInputError(f"garg2023: scale must be one of {sorted(SCALES)}, got {scale!r}")
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    plan = SCALES[scale]
    folder = results_dir("garg2023", out)
    entries = Entries(folder, resume=resume)
    dense, trajectories, scratch = {}, {c: [] for c in CRITERIA}, []
    for seed in plan["seeds"]:
        setup = _Setup(_config(scale, seed), folder / "runs")
        dense[seed] = entries.get(f"s{seed}_dense", lambda s=setup: _dense(s, resume))
        if not (setup.dense_dir / "checkpoints" / "best.pt").is_file():  # the entry survived, its model did not
            dense[seed] = _dense(setup, False)
        for crit in CRITERIA:
            traj = entries.get(f"s{seed}_{crit}",
                               lambda s=setup, c=crit, d=dense[seed]: _iterative(s, c, plan, d, resume))
            trajectories[crit].append(traj)
            for point in traj["trajectory"]:
                if point["step"] in plan["scratch_steps"]:
                    scratch.append(entries.get(
                        f"s{seed}_{crit}_scratch_{point['step']}",
                        lambda s=setup, c=crit, p=point, d=dense[seed]: _scratch(s, c, p, d, resume)))
    result = {"suite": "garg2023", "scale": scale, "machine": machine(),
              "config": _config(scale, plan["seeds"][0]).model_dump(mode="json"),
              "plan": {k: v for k, v in plan.items() if k != "config"},
              "dense": {str(k): v for k, v in dense.items()},
              "trajectories": trajectories, "scratch": scratch,
              "summary": {c: summarise_trajectory(trajectories[c]) for c in CRITERIA},
              "scratch_summary": summarise_scratch(scratch),
              "seconds": time.perf_counter() - start,
              "compute_seconds": sum(e["seconds"] for e in [*dense.values(), *scratch,
                                                           *(t for ts in trajectories.values() for t in ts)])}
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
            "delta_m": _mean_std([p["delta_m"] for p in points]),
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
    last = len(summ[CRITERIA[0]]) - 1
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
         "seeds_cosprune_higher_delta_m": sum(g > 0 for g in gaps_dm), "seeds": seeds}
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
                 + (f"; alike by the rule below at steps {', '.join(str(x['step']) for x in between if x['alike'])}"
                    f" but not at step{'s' if len(unlike) > 1 else ''} {', '.join(str(x['step']) for x in unlike)}"
                    if unlike else ", alike by the rule below at every step"))
    else:
        alike = "There is no intermediate step"
    direction = "more slowly" if a["cosprune_slower"] else ("faster" if a["seeds_cosprune_higher_delta_m"] == 0
                                                            else "neither clearly faster nor more slowly")
    return (f"**Finding (a) {'holds' if a['holds'] else 'does not hold here'}.** {alike}. At the most pruned step "
            f"({a['params'][c] / 1e6:.3f} M CosPrune, {a['params'][t] / 1e6:.3f} M Taylor parameters) CosPrune "
            f"degrades {direction}: seg pixel accuracy {_pm(a['pixel_acc'][c], n)} % against Taylor's "
            f"{_pm(a['pixel_acc'][t], n)} % (higher in {a['seeds_cosprune_higher_pixel_acc']} of {n} seeds), Δm "
            f"{_pm(a['delta_m'][c], n)} against {_pm(a['delta_m'][t], n)} % (higher in "
            f"{a['seeds_cosprune_higher_delta_m']} of {n}). Paper: 42.5 against 39 pixel accuracy at 15.9 M of 84 M.")


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
    epochs, ft = train["epochs"], plan["finetune_epochs"]
    setting = (
        f"Setting: `synthetic_scenes` ({', '.join(TASKS)}), VGG-16 (no BN) + SmallASPP heads at width {width}, "
        f"{dense[0]['params'] / 1e6:.3f} M parameters. Dense model: {_n(epochs, 'epoch')} of Adam (lr {train['lr']}, "
        f"weight decay {train['weight_decay']}, cosine), best validation checkpoint. Iterative pruning of backbone "
        f"filters only (global ranking, at least 5 filters per layer), to {plan['target_params']} of the parameters "
        f"in {plan['steps']} geometric steps, each followed by {_n(ft, 'fine-tuning epoch')} (lr {train['lr'] / 2}, "
        f"best validation checkpoint). Retraining from scratch: the recorded widths of steps "
        f"{', '.join(map(str, plan['scratch_steps']))}, re-initialised at random with the dense model's scheme (He "
        f"normal), trained with the dense recipe "
        f"({_n(epochs, 'epoch')}; the iteratively pruned model at step k has had {epochs} + k × {ft} epochs). "
        f"{_n(n, 'seed')} (dense model, pruning statistics, initialisation); mean ± std over seeds. Δm: against "
        "the dense model of the same seed, over every metric of every task (%, higher is better).")
    lines = [
        "# Garg et al. 2023: Taylor against CosPrune, iterative pruning against retraining from scratch", "",
        f"Command: `mtprune bench garg2023 --scale {r['scale']} --threads {m['threads']}`; {m['cores']} cores, "
        f"{m['device']}, torch {m['torch']}, {m['date']}; {r['compute_seconds'] / 60:.1f} min of compute (the sum over "
        "the suite's entries).", "", setting, "",
        "## Verdicts", "", _verdict_a(r), "", _verdict_b(r), "",
        "## (a) Along the iterative schedule", "",
        "| criterion | step | params (M) | kept | seg pixel acc % | seg mIoU % | depth abs err (m) | normal mean ° "
        "| Δm % |", "|---|---|---|---|---|---|---|---|---|"]
    for crit, steps in r["summary"].items():
        for s in steps:
            mt = s["metrics"]
            lines.append(f"| {crit} | {s['step']} | {s['params'] / 1e6:.3f} | {s['params_kept']:.3f} | "
                         f"{_pm(mt['seg']['pixel_acc'], n)} | {_pm(mt['seg']['miou'], n)} | "
                         f"{_pm(mt['depth']['abs_err'], n, '.3f')} | {_pm(mt['normal']['mean'], n)} | "
                         f"{_pm(s['delta_m'], n)} |")
    lines += ["", "![metric against parameters](a_metric_vs_params.png)", "",
              "## (b) The same architectures retrained from scratch", "",
              "| criterion | step | params (M) | seg pixel acc %: iterative | scratch | Δm %: iterative | scratch | "
              "scratch better (seeds) |", "|---|---|---|---|---|---|---|---|"]
    for crit, rows in r["scratch_summary"].items():
        for row in rows:
            it, sc = row["iterative"], row["scratch"]
            better = min(row["scratch_better_pixel_acc"], row["scratch_better_delta_m"])
            lines.append(f"| {crit} | {row['step']} | {sc['params'] / 1e6:.3f} | "
                         f"{_pm(it['metrics']['seg']['pixel_acc'], n)} | {_pm(sc['metrics']['seg']['pixel_acc'], n)} "
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
    """Readable ticks on a log axis of any span: 1-2-5 steps, or the data's own values on a narrow span."""
    lo, hi = min(xs), max(xs)
    ticks = [m * 10.0**k for k in range(-3, 4) for m in (1, 2, 5) if lo / 1.05 <= m * 10.0**k <= hi * 1.05]
    if len(ticks) < 3:
        ticks = []
        for x in sorted(xs):
            if not ticks or x / ticks[-1] > 1.02:
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
    """(a): one panel per task (its main metric) plus Δm, against parameters; one line per criterion."""
    fig, axes = _panels(ref, "Iterative pruning: Taylor-FO against CosPrune (error bars: std over seeds)")
    for crit in (c for c in CRITERIA if c in summary):
        _line(axes, summary[crit], crit, marker="o", color=COLORS[crit])
    _x_ticks(axes, [p["params"] / 1e6 for steps in summary.values() for p in steps])
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
