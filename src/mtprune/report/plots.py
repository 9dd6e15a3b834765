"""Matplotlib figures (headless, Agg): metric against MACs along a schedule, per-layer widths."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..utils.atomic import atomic_save  # noqa: E402


def _save(fig, path: Path) -> Path:
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_metric_vs_macs(points: Sequence[Mapping], metrics: Mapping[str, str], path: str | Path,
                        title: str = "Per-task metric against MACs",
                        reference: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """``points``: dicts with ``macs`` (absolute), ``label`` (series name) and ``metrics`` {task: {metric: v}};
    ``metrics``: task → the metric to plot; ``reference``: the dense model's metrics, drawn as a dashed line.
    One panel per task, one line per series."""
    tasks = list(metrics)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    series: dict[str, list[Mapping]] = {}
    for p in points:
        series.setdefault(p.get("label", "run"), []).append(p)
    for ax, task in zip(axes[0], tasks, strict=True):
        metric = metrics[task]
        for label, pts in series.items():
            pts = sorted(pts, key=lambda p: p["macs"])
            ax.plot([p["macs"] / 1e6 for p in pts], [p["metrics"][task][metric] for p in pts], marker="o", label=label)
        if reference is not None and task in reference:
            ax.axhline(reference[task][metric], color="black", ls="--", lw=1, label="dense")
        ax.set_title(f"{task}: {metric}")
        ax.set_xlabel("MMACs per sample")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, Path(path))


def plot_width_trajectory(widths: Sequence[Mapping[str, int]], labels: Sequence[str], path: str | Path) -> Path:
    """Channels per prunable layer group at each step of an iterative schedule, in network order."""
    names = list(widths[0])
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 3.6))
    cmap = plt.get_cmap("viridis")
    for i, (w, label) in enumerate(zip(widths, labels, strict=True)):
        ax.plot(range(len(names)), [w.get(n, 0) for n in names], marker=".", color=cmap(i / max(1, len(widths) - 1)),
                label=label)
    ax.set_xticks(list(range(len(names))))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_xlabel("layer group (network order)")
    ax.set_ylabel("channels")
    ax.set_title("Per-layer widths along the schedule")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_widths(before: Mapping[str, int], after: Mapping[str, int], path: str | Path) -> Path:
    """Channels per prunable layer group, before and after pruning, in network order."""
    names = list(before)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 3.6))
    xs = range(len(names))
    ax.bar(xs, [before[n] for n in names], color="#c8d3e0", label="before")
    ax.bar(xs, [after.get(n, 0) for n in names], color="#3b6ea5", label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_xlabel("layer group (network order)")
    ax.set_ylabel("channels")
    ax.legend()
    ax.set_title("Per-layer widths")
    return _save(fig, Path(path))
