"""The Markdown report: one table of models (per-task metrics, Δm, params, MACs, latency) and the figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..utils.atomic import atomic_write_text


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def model_table(rows: Sequence[Mapping], metrics: Mapping[str, Sequence[str]]) -> str:
    """rows: dicts with ``name``, ``metrics`` {task: {metric: v}}, and optionally ``delta_m``, ``params``,
    ``macs``, ``latency_ms``."""
    cols = [f"{t} {m}" for t, ms in metrics.items() for m in ms]
    head = ["model", *cols, "Δm %", "params (M)", "MMACs", "latency (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [_fmt(r["metrics"][t][m]) for t, ms in metrics.items() for m in ms]
        cells = [r["name"], *vals, _fmt(r.get("delta_m")),
                 _fmt(r["params"] / 1e6, 3) if r.get("params") else "–",
                 _fmt(r["macs"] / 1e6, 1) if r.get("macs") else "–", _fmt(r.get("latency_ms"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write ``# title`` and each ``(heading, body)`` section atomically."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path
