"""``report.md`` of a compression run: the side-by-side table, the per-subset cost, and the figures."""

from __future__ import annotations

import json
from pathlib import Path

from .markdown import model_table, write_report
from .plots import plot_metric_vs_macs, plot_width_trajectory, plot_widths


def _subset_table(rows: list[dict]) -> str:
    subsets = list(rows[0]["macs_per_subset"])
    head = ["task subset", *(r["name"] for r in rows)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in subsets:
        lines.append("| " + " | ".join([s, *(f"{r['macs_per_subset'][s] / 1e6:.1f}" for r in rows)]) + " |")
    return "MMACs per sample to run each subset of tasks (only the heads needed):\n\n" + "\n".join(lines)


def _epoch_scores(path: Path) -> list[float]:
    """The per-epoch validation scores of a training run's ``metrics.jsonl`` (empty when absent or damaged)."""
    try:
        return [float(json.loads(line)["score"]) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def above_dense_note(run_dir: Path, rows: list[dict]) -> str | None:
    """Why a pruned model can score above the dense one: the fine-tuning epochs after each pruning step are
    training the dense model never got, and when the dense model was still improving at its end, that extra
    training, not pruning, lifts Δm. ``None`` when no pruned row is above dense."""
    above = [r for r in rows if r["name"] not in ("dense", "untrained") and (r.get("delta_m") or 0.0) > 0.0]
    if not above:
        return None
    dense = _epoch_scores(run_dir / "dense" / "metrics.jsonl")
    extra = sum(len(_epoch_scores(p)) for p in sorted((run_dir / "prune").rglob("metrics.jsonl")))
    best = max(above, key=lambda r: r["delta_m"])
    text = (f"The {best['name']} model scores above the dense one (Δm {best['delta_m']:+.2f} %). That is no "
            "evidence that pruning helps: ")
    if extra:
        text += f"its {extra} fine-tuning epochs are training the dense model never got"
    else:
        text += "its training differs from the dense model's"
    if len(dense) >= 4:
        q = len(dense) - max(1, len(dense) // 4)
        rise = dense[-1] - max(dense[:q])
        if rise > 0:
            text += (f", and the dense model was still improving when its {len(dense)} epochs ended (its validation "
                     f"score rose by {rise:.2f} over the last {len(dense) - q} epochs), so it is not at a plateau")
    return (text + ". Train the dense model longer, or compare against the dense model fine-tuned for the same "
            "epochs (the control of `mtprune bench criteria`), before reading this row as a gain.")


def write_run_report(run_dir: str | Path, summary: dict) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    tasks = summary["tasks"]
    primary = {t: next(iter(ms)) for t, ms in tasks.items()}
    rows = summary["models"]
    sections = [("Models", model_table(rows, {t: list(ms) for t, ms in tasks.items()}) + "\n\n"
                 "Δm is against the dense model (Maninis et al. 2019), in percent; higher is better. "
                 f"Latency: median of repeated forwards, batch {rows[0]['setting'].get('batch_size')}, "
                 f"{rows[0]['setting'].get('threads')} threads on {rows[0]['setting'].get('device')}.")]
    note = above_dense_note(run_dir, rows)
    if note:
        sections.append(("Reading the table", note))
    sections.append(("Cost per task subset", _subset_table(rows)))
    points = [{"label": f"{summary['schedule']} ({summary['criterion']})", "macs": r["macs"], "metrics": r["metrics"]}
              for r in summary["trajectory"]]
    dense = next((r for r in rows if r["name"] == "dense"), None)
    if points:
        plot_metric_vs_macs(points, primary, plots / "metric_vs_macs.png",
                            reference=dense["metrics"] if dense else None)
        sections.append(("Metric against MACs along the schedule", "![metric vs MACs](plots/metric_vs_macs.png)"))
    plot_widths(summary["widths_before"], summary["widths_after"], plots / "widths.png")
    sections.append(("Per-layer widths", "![widths](plots/widths.png)"))
    steps = [r for r in summary["trajectory"] if r.get("widths")]
    if len(steps) > 1:
        plot_width_trajectory([r["widths"] for r in steps], [f"step {r['step']}" for r in steps],
                              plots / "width_trajectory.png")
        sections.append(("Per-layer widths along the schedule", "![width trajectory](plots/width_trajectory.png)"))
    if summary.get("pagcp"):  # PAGCP (Ye et al. 2023): per-round layer ratios and per-task loss ratios
        from ..pruning.pagcp import pagcp_markdown

        sections.append(("PAGCP allocation", pagcp_markdown(summary["pagcp"])))
    return write_report(run_dir / "report.md", f"mtprune report: {summary['name']}", sections)
