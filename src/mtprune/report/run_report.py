"""``report.md`` of a compression run: the side-by-side table, the per-subset cost, and the figures."""

from __future__ import annotations

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
