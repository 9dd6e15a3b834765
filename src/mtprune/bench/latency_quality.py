"""Suite ``latency_quality``: at equal latency, is a latency-targeted model as good as a MACs-targeted one?

On the ``criteria`` suite's testbed (synthetic_scenes, seg/depth/normal, Deeplab-ResNet-18 + ASPP; its dense
model trained once per seed, here in ``runs/``), for each seed and MACs target t:

1. **at equal MACs**: ``task_taylor`` with global ranking prunes a copy to ``target_macs=t``; its latency ratio
   r to the dense model on this machine's setting (CPU threads, the config's evaluation batch, or CUDA on
   ``--scale gpu``) is then measured, the two timed alongside (``pruning.latency.PairedTimer``);
2. **at equal latency**: ``task_taylor`` prunes another copy to ``target_latency=r`` (HALP-style knapsack,
   widths rounded to the device's channel blocking, the measured feedback loop on);
3. both are fine-tuned alike (the ``criteria`` suite's recipe: ``ft_epochs`` at ``FT_LR_FACTOR`` times the dense
   learning rate, last epoch kept; the dense model settled by one such cycle, as in ``criteria``), and their
   forwards are timed in one rotation with the dense one until the ratios are known to 1 %
   (``pruning.latency.times_to_precision``, as the feedback loop and ``mtprune bench speed`` time them). The row
   is judged on the two pruned models' own per-round ratio from that rotation (:func:`judge`).

The latency table is measured (or loaded) before anything is timed: the ratio r of step 1 is then taken in the
state of the process that step 2's feedback loop and step 3 time in.

Each row gives Δm (against the seed's dense model) after fine-tuning for both, their MACs kept and measured
latencies; the summary says whether Δm at equal latency is no worse than at equal MACs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..io import load as load_model
from ..pruning.latency import LatencySetting, PairedTimer, median_ratios, model_latency, times_to_precision
from ..pruning.prune import as_losses, prune
from ..tasks import delta_m
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from ..utils.runtime import seed_everything
from .common import Entries, fingerprint, machine, results_dir, timing_identity, where
from .criteria import SCALES, STATS_BATCHES, _config, _Setup, settled_dense

CRITERION = "task_taylor"
#: in the entries' fingerprint (2: the latency target also times the MACs ranking cut at the goal,
#: ``latency.macs_candidate``, and keeps the plan with the most importance within it)
VERSION = 4  # 3: paired timings to 2 % (latency.precision); 4: table first, final rotation to 1 %, direct ratio
PRECISION = 0.01  # of the final rotation's ratios (latency.times_to_precision): the verdict rests on it
TABLE = {"small": {"grid": 2, "repeats": 1, "warmup": 0}, "cpu": {"grid": 6, "repeats": 5, "warmup": 2},
         "gpu": {"grid": 6, "repeats": 10, "warmup": 3}}


def _setting(scale: str, setup: _Setup, table_dir: Path) -> dict:
    cuda = setup.cfg.device != "cpu" and torch.cuda.is_available()
    return {"device": "cuda" if cuda else "cpu", "threads": None if cuda else torch.get_num_threads(),
            "batch": setup.cfg.train.eval_batch_size or setup.cfg.train.batch_size, "cache_dir": str(table_dir),
            **TABLE[scale]}


def quality_entry(setup: _Setup, target: float, ft_epochs: int, run_dir: Path, setting: dict,
                  repeats: int = 10) -> dict:
    """One seed and target: prune at MACs ``target``, measure its latency ratio to the dense model, prune to that
    ratio, fine-tune both (the row's verdict is :func:`judge`'s)."""
    cfg, x = setup.cfg, setup.x
    models, reports = {}, {}
    dense = load_model(setup.dense_path, base=setup.fresh())
    # the latency table before any timing: after it was measured, the same pruned models timed 2-7 % slower against
    # the dense one than before (MACs 0.5 and 0.1, 2026-12-04), so a target taken before is not the one judged after
    model_latency(dense, x, setting)
    for kind in ("equal_macs", "equal_latency"):
        seed_everything(cfg.seed)  # both decide from the same statistics batches
        model = load_model(setup.dense_path, base=setup.fresh())
        target_kw = ({"target_macs": target} if kind == "equal_macs" else
                     {"target_latency": reports["equal_macs"]["latency_ratio"], "latency": setting,
                      "round_to": "auto"})
        try:
            rep = prune(model, x, CRITERION, data=setup.stats_data(), losses=as_losses(setup.tasks),
                        batches=STATS_BATCHES, min_channels=2, seed=cfg.seed, **target_kw)
        except MTPruneInputError as e:  # its latency lies below the floor (or measured >= dense): nothing to compare
            reports[kind] = {"refused": str(e)}
            continue
        reports[kind] = {"macs_kept": rep.macs_ratio, "params_kept": rep.params_ratio,
                         "prediction": rep.extra.get("latency")}
        if kind == "equal_macs":  # its latency, as a ratio to the dense model timed alongside
            timer = PairedTimer(dense, x, LatencySetting.parse(setting))
            reports[kind]["latency_ratio"] = timer(copy.deepcopy(model))["ratio"]
        models[kind] = model
    dense_metrics = setup.evaluate(dense)
    dev = torch.device(setting["device"])
    xb = x[:1].expand(setting["batch"], *x.shape[1:]).contiguous().to(dev)
    nets = {"dense": dense.eval().to(dev), **{k: m.eval().to(dev) for k, m in models.items()}}
    times = times_to_precision({k: (lambda n=net: n(xb)) for k, net in nets.items()}, "dense", repeats,
                               precision=PRECISION, device=dev)
    ratios = median_ratios(times, "dense")
    row = {"target_macs": target, "seed": cfg.seed, "dense_ms": min(times["dense"]), "rounds": len(times["dense"])}
    if "equal_latency" in models:  # the judged figure: the two pruned models' per-round ratio, timed side by side
        row["latency_vs_macs"] = median_ratios(times, "equal_macs")["equal_latency"]
    for kind, model in models.items():
        setup.finetune(model, ft_epochs, run_dir / kind)
        metrics = setup.evaluate(model)
        speedup = 1 / ratios[kind]
        row[kind] = {**reports[kind], "measured_ms": min(times[kind]), "speedup": speedup, "metrics": metrics,
                     "delta_m": delta_m(metrics, dense_metrics, setup.tasks)}
    if "equal_latency" not in models:
        row["equal_latency"] = reports["equal_latency"]
    return row


LATENCY_MATCH = 0.05  # the latency-targeted model's speed-up may differ at most this much from the MACs-targeted one


def judge(row: dict) -> dict:
    """A row's verdict. The two models are compared only when the latency-targeted one really runs at the
    equal-MACs model's latency (its measured speed-up within ``LATENCY_MATCH`` of it, either way): a slower one
    would buy its quality with latency, a faster one pay latency it was not asked to, so such a row counts as
    ``latency_matched`` False and gets no verdict."""
    a, b = row["equal_macs"], row["equal_latency"]
    if "delta_m" not in b:  # refused
        return {**row, "latency_matched": None, "latency_no_worse": None}
    ratio = row.get("latency_vs_macs", a["speedup"] / b["speedup"])  # b's latency over a's
    matched = abs(1 / ratio - 1) <= LATENCY_MATCH
    return {**row, "latency_matched": matched, "latency_no_worse": b["delta_m"] >= a["delta_m"] if matched else None}


def run(scale: str = "cpu", out=None, threads: int | None = 2, resume: bool = False, **_) -> dict:
    """Run the suite; writes results.json and results.md under ``benchmarks/results/latency_quality``."""
    if scale not in SCALES:
        raise MTPruneInputError(f"latency_quality: scale must be one of {sorted(SCALES)}, got {scale!r}")
    if threads:
        torch.set_num_threads(threads)
    folder = results_dir("latency_quality", out)
    runs = folder / "runs"
    entries = Entries(folder, resume=resume)
    _, targets, seeds, ft_epochs = SCALES[scale]
    rows = []
    for seed in seeds:
        setup = _Setup(_config(scale, seed), runs)
        _, base = settled_dense(entries, setup, resume, ft_epochs)
        setting = _setting(scale, setup, folder / "latency_tables")
        for target in targets:
            key = f"quality_{target}_s{seed}"
            fp = fingerprint(*base, ft_epochs, STATS_BATCHES, CRITERION, setting, VERSION,
                             timing_identity(setting["device"], setting["threads"]))
            rows.append(judge(entries.get(key, lambda s=setup, t=target, k=key, st=setting: quality_entry(
                s, t, ft_epochs, runs / k, st), fp)))  # judged here, so stored rows follow the current rule
    result = {"suite": "latency_quality", "scale": scale, "machine": machine(), "criterion": CRITERION,
              "finetune_epochs": ft_epochs, "config": _config(scale, 0).model_dump(mode="json"), "rows": rows,
              "no_worse": sum(bool(r["latency_no_worse"]) for r in rows),
              "of": sum(r["latency_no_worse"] is not None for r in rows),
              "refused": sum(r["latency_matched"] is None for r in rows),
              "unmatched": sum(r["latency_matched"] is False for r in rows), "latency_match": LATENCY_MATCH}
    atomic_write_json(folder / "results.json", result)
    atomic_write_text(folder / "results.md", markdown(result))
    return result


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# latency_quality ({r['scale']})", "",
             f"`{r['criterion']}`, one-shot, fine-tuned {r['finetune_epochs']} epochs alike; {m['threads']} threads "
             f"on {where(m)}, torch {m['torch']}, {m['date']}. Equal latency = the latency target is the measured "
             "latency of the model pruned at equal MACs; in brackets, the plan the latency target kept (the latency "
             "knapsack, or the importance ranking cut at the MACs that meet the goal).", "",
             "| MACs target | seed | dense ms | equal MACs: ms, speed-up, MACs kept, Δm | equal latency: ms, "
             "speed-up, MACs kept, Δm | latency matched | no worse |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        a, b = row["equal_macs"], row["equal_latency"]
        first = (f"| {row['target_macs']} | {row['seed']} | {row['dense_ms']:.1f} | {a['measured_ms']:.1f}, "
                 f"{a['speedup']:.2f}×, {a['macs_kept']:.3f}, {a['delta_m']:+.2f} | ")
        if "refused" in b:
            lines.append(first + f"refused: {b['refused'].split(':')[0]} | | |")
            continue
        verdict = "–" if row["latency_no_worse"] is None else ("yes" if row["latency_no_worse"] else "no")
        kept = ((b.get("prediction") or {}).get("candidates") or {}).get("chosen")
        plan = {"macs": " (MACs ranking)", "latency": " (knapsack)"}.get(kept, "")
        vs = f" ({row['latency_vs_macs']:.3f})" if "latency_vs_macs" in row else ""
        lines.append(first + f"{b['measured_ms']:.1f}, {b['speedup']:.2f}×, {b['macs_kept']:.3f}, "
                     f"{b['delta_m']:+.2f}{plan} | {'yes' if row['latency_matched'] else 'no'}{vs} | {verdict} |")
    match = r.get("latency_match", LATENCY_MATCH)
    lines += ["", f"Latency matched: the latency-targeted model's measured speed-up is within {match:.0%} of the "
              "equal-MACs model's, either way (in brackets, its latency over the equal-MACs model's: the median "
              "per-round ratio of the two, timed in one rotation); only matched rows are judged. At equal latency, "
              f"Δm no worse than at equal MACs in {r['no_worse']} of {r['of']} matched rows; "
              f"{r.get('unmatched', 0)} rows not matched (the latency-targeted model ran slower or faster than its "
              "target), "
              f"{r['refused']} refused (the MACs model's latency ratio was no target: below the latency floor or "
              "not below 1)."]
    return "\n".join(lines) + "\n"

