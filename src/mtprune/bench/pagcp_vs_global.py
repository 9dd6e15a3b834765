"""Suite ``pagcp``: does performance-aware allocation (PAGCP, Ye et al. 2023) protect the weakest task?

One dense model is trained on ``synthetic_scenes`` (seg, depth, normal); it is then pruned one-shot with the
same criterion at the same MACs targets by global ranking and by the PAGCP allocator, and each pruned model is
fine-tuned for the same number of epochs. Reported: per-task metrics, each task's own relative change (its term
of Δm) and Δm, against the dense model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import parse_config
from ..pipeline import compress
from ..recipe import prepare_run_dir
from ..report.plots import _save, plt
from ..utils.atomic import atomic_write_json, atomic_write_text
from .common import machine, results_dir

BASE = {
    "name": "pagcp_bench", "device": "cpu",
    "data": {"name": "synthetic_scenes"},
    "tasks": {"preset": "synthetic_scenes", "names": ["seg", "depth", "normal"]},
    "model": {"name": "deeplab_resnet34", "width": 0.25, "head": "aspp_v2", "head_kwargs": {"hidden": 128}},
    "train": {"epochs": 20, "batch_size": 16, "lr": 0.001, "scheduler": "cosine"},
}


def _task_changes(metrics: dict, dense: dict, directions: dict) -> dict[str, float]:
    out = {}
    for task, ms in directions.items():
        terms = [(1 if up else -1) * (metrics[task][m] - dense[task][m]) / abs(dense[task][m]) for m, up in ms.items()]
        out[task] = 100 * sum(terms) / len(terms)
    return out


def run(scale: str = "cpu", out=None, targets=(0.5, 0.25), criterion: str = "l1", finetune_epochs: int = 3,
        threads: int | None = 2, **_) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    folder = results_dir("pagcp", out)
    raw = json.loads(json.dumps(BASE))
    if scale == "small":
        raw["data"]["kwargs"] = {"n_train": 64, "n_val": 32}
        raw["train"]["epochs"] = 2
        finetune_epochs = 1
    rows, dense_dir = [], None
    for target in targets:
        for allocator in ("global", "pagcp"):
            prune = {"criterion": criterion, "target_macs": target, "schedule": "one_shot", "allocator": allocator,
                     "stats_batches": 8, "finetune": {"epochs": finetune_epochs, "batch_size": 16, "lr": 0.0005}}
            if dense_dir is not None:
                prune["start"] = str(dense_dir)
            cfg = parse_config({**raw, "prune": prune}, "pagcp bench")
            run_dir = prepare_run_dir(folder / f"{allocator}_{target}", overwrite=True)
            summary = compress(cfg, run_dir, quiet=True)
            dense_dir = dense_dir or run_dir / "dense"
            by_name = {r["name"]: r for r in summary["models"]}
            pruned, dense = by_name["pruned"], by_name["dense"]
            changes = _task_changes(pruned["metrics"], dense["metrics"], summary["tasks"])
            rows.append({"target_macs": target, "allocator": allocator, "macs_ratio": pruned["macs"] / dense["macs"],
                         "delta_m": pruned["delta_m"], "task_change": changes, "worst_task": min(changes.values()),
                         "metrics": pruned["metrics"], "dense_metrics": dense["metrics"]})
    result = {"suite": "pagcp", "scale": scale, "criterion": criterion, "machine": machine(), "config": raw,
              "finetune_epochs": finetune_epochs, "rows": rows}
    atomic_write_json(folder / "results.json", result)
    _plot(rows, folder / "pagcp_vs_global.png")
    atomic_write_text(folder / "results.md", _markdown(result))
    return result


def _plot(rows, path: Path) -> None:
    tasks = list(rows[0]["task_change"])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([t + i * width for t in range(len(tasks))], [r["task_change"][t] for t in tasks], width,
               label=f"{r['allocator']} @ {r['target_macs']}")
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))])
    ax.set_xticklabels(tasks)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("task's change vs dense (%)")
    ax.legend(fontsize=7)
    _save(fig, path)


def _markdown(r: dict) -> str:
    m = r["machine"]
    tasks = list(r["rows"][0]["task_change"])
    lines = [f"# PAGCP against global ranking ({r['criterion']}, one-shot, {r['finetune_epochs']} fine-tuning epochs)",
             "", f"Command: `mtprune bench pagcp --scale {r['scale']}`; {m['threads']} threads, {m['cores']} cores, "
             f"{m['device']}, {m['date']}.", "",
             "| MACs target | allocator | MACs kept | " + " | ".join(f"{t} change %" for t in tasks)
             + " | weakest task % | Δm % |", "|" + "---|" * (5 + len(tasks))]
    for row in r["rows"]:
        lines.append(f"| {row['target_macs']} | {row['allocator']} | {row['macs_ratio']:.3f} | "
                     + " | ".join(f"{row['task_change'][t]:+.2f}" for t in tasks)
                     + f" | {row['worst_task']:+.2f} | {row['delta_m']:+.2f} |")
    lines += ["", "![per-task change](pagcp_vs_global.png)", ""]
    return "\n".join(lines)
