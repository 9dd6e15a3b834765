"""Sections of the ``speed`` suite that compare pruners side by side (called from ``bench/speed.py``).

5. **Side by side at one target.** For each model and target t, in one process: the dense model, mtprune at
   MACs t (``l1``, global ranking), mtprune at latency t (``target_latency=t``: a latency table measured on the
   benchmark's device, threads and batch, widths rounded to the device's channel blocking, ``round_to="auto"``),
   and Torch-Pruning's ``MetaPruner`` (magnitude, one uniform channel ratio found by bisection so that its MACs
   match t). The four forwards are timed in rotation by ``latency.times_to_precision`` (the timing function of the
   latency targets' feedback loop too), so that load drift hits all alike; the table gives each one's minimum and
   the median per-round speed-up over dense. **Fidelity** is speed-up × MACs kept (1.0: latency falls exactly as
   MACs do). The latency row also says whether the measured latency ratio (median per-round ratio to dense, as
   the feedback loop computes it) lies within 5 % of t; a target below the model's latency floor is refused.
5b. **Hardware widths at equal MACs** (``hardware_entry``, an entry of its own per model and target, with a
   fingerprint of its variants, so that section 5's entries stay valid when it is added or changed): dense,
   mtprune at MACs t as in section 5, and mtprune at MACs t with ``round_to="measured"`` (each layer kind's
   widths on the channel blocks found in latency sweeps on this device, ``pruning/blocking.py``), without and
   with ``rank_by="latency"`` (the ranking's near-ties reordered by predicted latency saved per MAC,
   ``allocate.plan_near_ties``), and mtprune at latency t with those blocks (``mtprune_latency_hw``: the latency
   row of section 5 rounds only depthwise and 1×1 widths, ``round_to="auto"``), timed in rotation like section 5.
6. **Time to prune.** ``mtprune.prune`` (``l1``, ``target_macs``) against Torch-Pruning's ``MetaPruner``
   (``GroupMagnitudeImportance``, uniform ratio ``1 - sqrt(t)``, which keeps about t of the MACs) on torchvision
   classifiers with two task heads, wall time of each call on the same input, from the same dense weights. Both
   calls do their whole job: tracing the dependency graph, scoring, choosing and removing channels. mtprune's
   call also bisects its removal fraction to the exact MACs target, validates every group before removing it and
   re-traces the pruned model (its rollback check); Torch-Pruning's call is one pass at a ratio fixed in advance
   (its MACs land near, not on, t). The predictors that Torch-Pruning is told to ignore are found before timing
   (its user names them). ``prune_repeats`` rounds, each on fresh copies, alternate which side runs first, after a
   garbage collection; the table gives each side's median.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..pruning.graph import PruningGraph, torch_pruning_magnitude
from ..pruning.latency import median_ratios, times_to_precision
from ..pruning.prune import count, prune
from ..utils.errors import MTPruneInputError
from .common import fingerprint

PRUNE_TIME_MODELS = ("densenet121", "resnet50", "efficientnet_b0")
VARIANTS = ("dense", "mtprune_macs", "mtprune_latency", "torch_pruning")
# section 5b, an entry of its own per model and target (the entries of section 5 stay valid): widths on the
# channel blocks measured on the device, at MACs t (without and with the ranking's near-ties reordered by the
# latency table) and at latency t, timed beside dense and mtprune_macs
HW_VARIANTS = {"mtprune_macs_hw": {"target_macs": True, "round_to": "measured"},
               "mtprune_macs_hw_ties": {"target_macs": True, "round_to": "measured", "rank_by": "latency"},
               "mtprune_latency_hw": {"target_latency": True, "round_to": "measured"}}
HW_VERSION = 4  # in the entries' fingerprint: bump when the variants change (3: MACs loop fixed; 4: timed to 2 %)
SIDE_VERSION = 4  # section 5's entries' fingerprint (2: two plans; 3: the MACs loop fixed; 4: timed to 2 %)
TIMING_PRECISION = 0.02  # relative standard error of the rotation's ratios to dense (latency.times_to_precision)


@dataclass(frozen=True)
class Compare:
    targets: tuple[float, ...]
    table_grid: int  # latency table: points per width dimension
    table_repeats: int
    table_warmup: int
    prune_models: tuple[str, ...]
    prune_input: int
    prune_targets: tuple[float, ...]
    models: tuple[str, ...] | None = None  # labels of the suite's models compared side by side (None: all)
    tp_trials: int = 8  # bisection steps for Torch-Pruning's channel ratio
    prune_repeats: int = 3  # rounds of the time-to-prune comparison (median)


COMPARE = {
    "small": Compare((0.5,), 2, 1, 0, ("resnet18",), 32, (0.5,), ("MobileNetV2 + DeepLab-v3 ASPP",), 4, 1),
    "cpu": Compare((0.5, 0.25, 0.1), 6, 5, 2, PRUNE_TIME_MODELS, 224, (0.5,)),
    "gpu": Compare((0.5, 0.25, 0.1), 6, 10, 3, PRUNE_TIME_MODELS, 224, (0.5,)),
}


class TwoHeads(nn.Module):
    """A torchvision classifier's convolutional features with two task heads: ``seg`` (1×1 convs, 5 classes)
    and ``cls`` (pooled linear, 10 classes)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        self.features = nn.Sequential(*list(net.children())[:-2]) if name.startswith("resnet") else net.features
        with torch.no_grad():
            channels = self.features.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
        self.heads = nn.ModuleDict({
            "seg": nn.Sequential(nn.Conv2d(channels, 64, 1), nn.ReLU(), nn.Conv2d(64, 5, 1)),
            "cls": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)),
        })

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def prune_time_entry(name: str, size: int, target: float, seed: int = 0, repeats: int = 1) -> dict:
    """Wall time of ``mtprune.prune`` and of Torch-Pruning's MetaPruner on the same model and target (module
    docstring, section 6): the median of ``repeats`` rounds, each on fresh copies of one dense model."""
    x = torch.zeros(1, 3, size, size)
    torch.manual_seed(seed)
    dense = TwoHeads(name).eval()
    protected = PruningGraph(dense, x).protected  # not timed; also imports Torch-Pruning before either is timed
    macs0 = count(dense, x)[1]
    ratio = 1 - math.sqrt(target)
    times: dict[str, list[float]] = {"mine": [], "theirs": []}
    for r in range(repeats):
        mine, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
        for side in ("mine", "theirs") if r % 2 == 0 else ("theirs", "mine"):
            gc.collect()
            t0 = time.perf_counter()
            if side == "mine":
                report = prune(mine, x, "l1", target_macs=target)
            else:
                torch_pruning_magnitude(theirs, x, ratio, protected=protected)
            times[side].append(time.perf_counter() - t0)
    t_mine, t_theirs = statistics.median(times["mine"]), statistics.median(times["theirs"])
    return {"model": name, "input": [3, size, size], "target_macs": target, "mtprune_s": t_mine,
            "torch_pruning_s": t_theirs, "ratio": t_mine / t_theirs, "within_2x": t_mine <= 2 * t_theirs,
            "mtprune_macs_ratio": report.macs_ratio, "torch_pruning_macs_ratio": count(theirs, x)[1] / macs0,
            "torch_pruning_ratio": ratio, "repeats": repeats, "mtprune_runs_s": times["mine"],
            "torch_pruning_runs_s": times["theirs"], "threads": torch.get_num_threads()}


def _tp_at_macs(dense: nn.Module, x1: Tensor, target: float, trials: int = 8) -> tuple[nn.Module, float]:
    """Torch-Pruning's uniform magnitude pruning at the channel ratio whose MACs come closest to ``target``."""
    protected = PruningGraph(dense, x1).protected
    macs0 = count(dense, x1)[1]
    lo, hi = 0.0, 0.95
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(trials):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(dense)
        torch_pruning_magnitude(trial, x1, mid, protected=protected)
        kept = count(trial, x1)[1] / macs0
        if best is None or abs(kept - target) < abs(best[0] - target):
            best = (kept, trial, mid)
        lo, hi = (mid, hi) if kept > target else (lo, mid)
    return best[1], best[2]


def side_by_side_entry(dense: nn.Module, target: float, input_hw: tuple[int, int], batch: int, repeats: int,
                       tolerance: float, min_channels: int, device: torch.device, threads: int, cmp: Compare,
                       table_dir: Path) -> dict:
    """Dense, mtprune at MACs ``target``, mtprune at latency ``target`` and Torch-Pruning at MACs ``target``."""
    h, w = input_hw
    x1 = torch.zeros(1, 3, h, w)
    at_macs = copy.deepcopy(dense)
    r_macs = prune(at_macs, x1, "l1", target_macs=target, min_channels=min_channels, tolerance=tolerance)
    at_latency = copy.deepcopy(dense)
    setting = table_setting(device, threads, batch, cmp, table_dir)
    t0 = time.perf_counter()
    try:
        r_lat, refused = prune(at_latency, x1, "l1", target_latency=target, latency=setting,
                               min_channels=min_channels, round_to="auto"), None
    except MTPruneInputError as e:  # a target below the latency floor is refused: nothing to time
        r_lat, refused = None, str(e)
    latency_prune_s = time.perf_counter() - t0
    tp, tp_ratio = _tp_at_macs(dense, x1, target, cmp.tp_trials)
    macs0 = count(dense, x1)[1]
    nets = {"dense": dense, "mtprune_macs": at_macs, "mtprune_latency": at_latency, "torch_pruning": tp}
    if refused:
        del nets["mtprune_latency"]
    rows, times = _timed_rows(nets, x1, batch, macs0, repeats, device)
    if refused:
        rows["mtprune_latency"] = {"refused": refused, "within_5pct": False, "prune_s": latency_prune_s}
    else:  # the ratio the feedback loop aims at, computed the same way (latency.median_ratios)
        measured = median_ratios(times, "dense")["mtprune_latency"]
        lat = r_lat.extra["latency"]
        rows["mtprune_latency"].update({
            "latency_ratio": measured, "within_5pct": abs(measured - target) <= 0.05 * target,
            "predicted_ratio": lat["predicted_ratio"], "prune_s": latency_prune_s, "table": lat["setting"],
            "feedback": lat["feedback"], "floor": lat.get("floor"), "candidates": lat.get("candidates")})
    rows["torch_pruning"]["channel_ratio"] = tp_ratio
    rows["mtprune_macs"]["macs_ratio_reported"] = r_macs.macs_ratio
    for n in nets.values():
        n.cpu()
    return {"target": target, **rows}


def _timed_rows(nets: dict[str, nn.Module], x1: Tensor, batch: int, macs0: int, repeats: int,
                device: torch.device) -> tuple[dict, dict]:
    """Time ``nets`` (``"dense"`` among them) in rotation on a batch shaped like ``x1`` with
    ``latency.times_to_precision``, the feedback loop's timing function (``repeats`` rounds, up to twice that
    while a ratio to dense is less certain than 2 %); per net: minimum ms, median per-round speed-up over dense,
    MACs kept, fidelity, rounds timed. The nets are left on ``device`` in eval mode."""
    kept = {k: count(n, x1)[1] / macs0 for k, n in nets.items()}
    xb = torch.rand(batch, *x1.shape[1:], device=device)
    nets = {k: n.to(device).eval() for k, n in nets.items()}
    times = times_to_precision({k: (lambda n=n: n(xb)) for k, n in nets.items()}, "dense", repeats,
                               precision=TIMING_PRECISION, max_rounds=2 * repeats, device=device)
    rows = {}
    for k in nets:
        speedup = statistics.median(d / p for d, p in zip(times["dense"], times[k], strict=True))
        rows[k] = {"latency_ms": min(times[k]), "speedup": speedup, "macs_kept": kept[k],
                   "fidelity": speedup * kept[k], "rounds": len(times[k])}
    return rows, times


def table_setting(device: torch.device, threads: int, batch: int, cmp: Compare, table_dir: Path) -> dict:
    """The latency setting of the side-by-side rows: the benchmark's device, threads and batch."""
    return {"device": str(device), "threads": threads if device.type == "cpu" else None, "batch": batch,
            "grid": cmp.table_grid, "repeats": cmp.table_repeats, "warmup": cmp.table_warmup,
            "cache_dir": str(table_dir)}


def hardware_entry(dense: nn.Module, target: float, input_hw: tuple[int, int], batch: int, repeats: int,
                   tolerance: float, min_channels: int, device: torch.device, threads: int, cmp: Compare,
                   table_dir: Path) -> dict:
    """Section 5b: dense, mtprune at MACs ``target`` (as in section 5) and the ``HW_VARIANTS`` at the same
    target, timed in rotation (``times_to_precision``). Each row: minimum ms, median per-round speed-up over dense,
    MACs kept, fidelity; the hardware rows also the blocks found (``round_to``) and the latency predicted by the
    table for their plan and for the importance ranking's (``rank_by="latency"``)."""
    h, w = input_hw
    x1 = torch.zeros(1, 3, h, w)
    setting = table_setting(device, threads, batch, cmp, table_dir)
    nets, reports, prune_s = {"dense": dense}, {}, {}
    refused = {}
    for k, kw in {"mtprune_macs": {"target_macs": True}, **HW_VARIANTS}.items():
        net = copy.deepcopy(dense)
        kw = {name: target if v is True else v for name, v in kw.items()}
        t0 = time.perf_counter()
        try:
            reports[k] = prune(net, x1, "l1", min_channels=min_channels, tolerance=tolerance,
                               **({"latency": setting, **kw} if k != "mtprune_macs" else kw))
        except MTPruneInputError as e:  # a latency target below the floor: nothing to time
            refused[k] = str(e)
            continue
        nets[k] = net
        prune_s[k] = time.perf_counter() - t0
    rows, times = _timed_rows(nets, x1, batch, count(dense, x1)[1], repeats, device)
    measured = median_ratios(times, "dense")
    for k in reports.keys() & HW_VARIANTS.keys():
        lat = reports[k].extra.get("latency", {})
        rows[k].update({"round_to": reports[k].extra.get("round_to"), "prune_s": prune_s[k],
                        "predicted_ratio": lat.get("predicted_ratio"),
                        "predicted_ratio_by_importance": lat.get("predicted_ratio_by_importance"),
                        "latency_ratio": measured[k], "feedback": lat.get("feedback"),
                        "candidates": lat.get("candidates")})
        if "target_latency" in HW_VARIANTS[k]:
            rows[k]["within_5pct"] = abs(measured[k] - target) <= 0.05 * target
    rows.update({k: {"refused": why, "within_5pct": False} for k, why in refused.items()})
    for n in nets.values():
        n.cpu()
    return {"target": target, "variants": list(nets), **rows}


def hardware_fingerprint(cmp: Compare, min_channels: int, tolerance: float) -> str:
    """What section 5b's entries depend on besides their key (model, target): a changed variant reruns them."""
    return fingerprint("side_hw", HW_VERSION, HW_VARIANTS, cmp.table_grid, cmp.table_repeats, cmp.table_warmup,
                       min_channels, tolerance)


def _latency_note(row: dict) -> str:
    """A latency row's measured ratio (predicted), whether it is within 5 % of the target, and which candidate
    plan ``prune`` kept (``latency.macs_candidate``: the knapsack or the MACs ranking), when it compared two."""
    kept = {"latency": "knapsack", "macs": "MACs ranking"}.get((row.get("candidates") or {}).get("chosen"))
    return (f"{row['latency_ratio']:.3f} ({row['predicted_ratio']:.3f}) {'✓' if row['within_5pct'] else '✗'}"
            + (f", kept: {kept}" if kept else ""))


def markdown(side: list[dict], prune_time: list[dict]) -> list[str]:
    """The two sections' tables."""
    lines = ["", "## Side by side: dense, mtprune at equal MACs, mtprune at equal latency, Torch-Pruning", "",
             "Fidelity = speed-up × MACs kept (1.0: latency falls as MACs do). The latency row prunes to "
             "`target_latency` = the target with a latency table of this device; ✓ when the measured latency ratio "
             "lies within 5 % of the target. The `_hw` rows (timed in their own rotation, beside dense and "
             "mtprune_macs again, whose fidelity there the last column gives) prune at MACs t with widths on the "
             "channel blocks measured on this device (`round_to=\"measured\"`); `_hw_ties` also reorders the "
             "near-ties of the ranking by the latency table (`rank_by=\"latency\"`); `mtprune_latency_hw` prunes "
             "to latency t with those blocks.", "",
             "| model | target | variant | ms | speed-up | MACs kept | fidelity | latency ratio (predicted) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in side:
        for k in VARIANTS:
            v = row[k]
            if "refused" in v:
                lines.append(f"| {row['model']} | {row['target']} | {k} | | | | | refused: below the latency floor |")
                continue
            extra = _latency_note(v) if k == "mtprune_latency" else ""
            lines.append(f"| {row['model']} | {row['target']} | {k} | {v['latency_ms']:.1f} | {v['speedup']:.2f}× | "
                         f"{v['macs_kept']:.3f} | {v['fidelity']:.2f} | {extra} |")
        hw = row.get("hardware")
        for k in HW_VARIANTS if hw else ():
            v, base = hw[k], hw["mtprune_macs"]
            if "refused" in v:
                lines.append(f"| {row['model']} | {row['target']} | {k} | | | | | refused: below the latency floor |")
                continue
            blocks = ", ".join(f"{kind} {b}" for kind, b in sorted((v.get("round_to") or {}).items())
                               if kind != "default" and b > 1) or "none"
            note = f"beside mtprune_macs {base['fidelity']:.2f}; blocks: {blocks}"
            if "within_5pct" in v:
                note = f"{_latency_note(v)}; {note}"
            elif v.get("predicted_ratio_by_importance") is not None:
                note += f"; predicted {v['predicted_ratio']:.3f} (ranking {v['predicted_ratio_by_importance']:.3f})"
            lines.append(f"| {row['model']} | {row['target']} | {k} | {v['latency_ms']:.1f} | {v['speedup']:.2f}× | "
                         f"{v['macs_kept']:.3f} | {v['fidelity']:.2f} | {note} |")
    rounds = max((r.get("repeats", 1) for r in prune_time), default=1)
    lines += ["", "## Time to prune: mtprune.prune against Torch-Pruning's MetaPruner", "",
              "Wall time of one call each, from the same dense weights, median of "
              f"{rounds} round{'s' if rounds > 1 else ''} (alternating which runs first). Both trace the dependency "
              "graph, score, choose and remove channels; mtprune also bisects to the exact MACs target, validates "
              "every group and re-traces the pruned model, Torch-Pruning prunes once at the uniform ratio "
              "1 - sqrt(target).", "",
              "| model | input | MACs target | mtprune s | Torch-Pruning s | ratio | MACs kept (mtprune / TP) |",
              "|---|---|---|---|---|---|---|"]
    for r in prune_time:
        lines.append(f"| {r['model']} | {r['input'][1]}² | {r['target_macs']} | {r['mtprune_s']:.2f} | "
                     f"{r['torch_pruning_s']:.2f} | {r['ratio']:.2f}{'' if r['within_2x'] else ' (> 2×)'} | "
                     f"{r['mtprune_macs_ratio']:.3f} / {r['torch_pruning_macs_ratio']:.3f} |")
    return lines
