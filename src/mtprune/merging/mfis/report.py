"""What MFIS reports: the Pareto front (pairwise scatter and parallel coordinates, PNG), the chosen solution's
sharing per layer (how many slots 1..T tasks share), and its cost per task subset.

Reconstruction of Cheng et al. (Cognitive Computation 2021), METHODS.md §4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .solve import ParetoFront

__all__ = ["MFISReport", "plot_front", "sharing_table"]


def sharing_table(matrices: Sequence[np.ndarray], tasks: Sequence[str], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per layer: width, pruned slots, slots shared by exactly k tasks (k = 1..T), filters each task keeps."""
    rows = []
    for name, m in zip(names, matrices, strict=True):
        m = np.asarray(m, dtype=bool)
        users = m.sum(axis=1)
        rows.append({"layer": name, "width": int(m.shape[0]), "pruned": int((users == 0).sum()),
                     "shared_by": {str(k): int((users == k).sum()) for k in range(1, len(tasks) + 1)},
                     "kept": {t: int(m[:, i].sum()) for i, t in enumerate(tasks)}})
    return rows


def _short(name: str) -> str:
    return name.replace("dissimilarity", "dissim.")


def plot_front(front: ParetoFront, chosen: int, path: str | Path, title: str = "") -> list[Path]:
    """Two PNGs: ``<path>_pairs.png`` (every pair of objectives) and ``<path>_parallel.png`` (normalised to
    [0, 1] over the front); the chosen solution in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    F, names = np.asarray(front.F), [_short(n) for n in front.names]
    m = F.shape[1]
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    n = m - 1  # row i, column j: objective i + 1 against objective j (the lower triangle)
    fig, axes = plt.subplots(n, n, figsize=(2.0 * n + 0.6, 2.0 * n + 0.6), squeeze=False)
    for i in range(n):
        for j in range(n):
            ax = axes[i][j]
            if j > i:
                ax.set_visible(False)
                continue
            ax.scatter(F[:, j], F[:, i + 1], s=6, c="0.45", linewidths=0)
            ax.scatter(F[chosen, j], F[chosen, i + 1], s=50, c="red", marker="*")
            ax.tick_params(labelsize=6)
            if i == n - 1:
                ax.set_xlabel(names[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(names[i + 1], fontsize=7)
    fig.suptitle(title or f"MFIS Pareto front ({len(F)} solutions; red star: chosen)", fontsize=9)
    fig.subplots_adjust(left=0.1, bottom=0.08, right=0.98, top=0.94, wspace=0.3, hspace=0.3)
    pairs = base.with_name(base.name + "_pairs.png")
    fig.savefig(pairs, dpi=100)
    plt.close(fig)
    out.append(pairs)

    lo, hi = F.min(axis=0), F.max(axis=0)
    Z = (F - lo) / np.where(hi > lo, hi - lo, 1.0)
    fig, ax = plt.subplots(figsize=(1.4 * m + 2, 3.6))
    for k, z in enumerate(Z):
        if k != chosen:
            ax.plot(range(m), z, color="0.6", alpha=0.5, lw=0.8)
    ax.plot(range(m), Z[chosen], color="red", lw=2.0, label="chosen")
    ax.set_xticks(range(m))
    ax.set_xticklabels([f"{n}\n[{a:.3g}, {b:.3g}]" for n, a, b in zip(names, lo, hi, strict=True)], fontsize=7)
    ax.set_ylabel("normalised over the front (0 = best)")
    ax.legend(fontsize=8)
    ax.set_title(title or "MFIS Pareto front, parallel coordinates", fontsize=9)
    fig.subplots_adjust(left=0.08, bottom=0.2, right=0.98, top=0.9)
    parallel = base.with_name(base.name + "_parallel.png")
    fig.savefig(parallel, dpi=100)
    plt.close(fig)
    out.append(parallel)
    return out


@dataclass
class MFISReport:
    """What :func:`~mtprune.merging.mfis.run.mfis` did: the front, the chosen solution and its structure."""

    tasks: list[str]
    layer_names: list[str]
    widths: list[int]
    front: ParetoFront
    chosen: int
    keep: dict[str, list[list[int]]]  # settled keep sets, per task per layer (aligned slot indices)
    sharing: list[dict[str, Any]]
    dropped: list[int]  # slots the wiring rule dropped, per layer
    subset_macs: dict[str, int]  # the merged network, per task subset (analytic; equals mtprune.profile)
    no_merge_macs: dict[str, int]  # the original networks run one after the other
    alignment: list[float] = field(default_factory=list)  # mean matched activation correlation per layer
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objectives(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.front.names, self.front.F[self.chosen], strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "layer_names": self.layer_names, "widths": self.widths,
                "chosen": self.chosen, "objectives": self.objectives, "front": self.front.to_dict(),
                "keep": self.keep, "sharing": self.sharing, "dropped": self.dropped, "subset_macs": self.subset_macs,
                "no_merge_macs": self.no_merge_macs, "alignment": self.alignment, "settings": self.settings,
                "seconds": self.seconds, "extra": self.extra}

    def sharing_markdown(self) -> str:
        T = len(self.tasks)
        head = ("| layer | width | pruned | " + " | ".join(f"shared by {k}" for k in range(1, T + 1)) + " | "
                + " | ".join(f"kept by {t}" for t in self.tasks) + " | dropped by wiring |")
        rule = "|" + "---|" * (4 + 2 * T)
        rows = [f"| {r['layer']} | {r['width']} | {r['pruned']} | "
                + " | ".join(str(r["shared_by"][str(k)]) for k in range(1, T + 1)) + " | "
                + " | ".join(str(r["kept"][t]) for t in self.tasks) + f" | {d} |"
                for r, d in zip(self.sharing, self.dropped, strict=True)]
        return "\n".join([head, rule, *rows])

    def markdown(self, accuracy: Mapping[str, Mapping[str, float]] | None = None, plots: Sequence[str] = ()) -> str:
        """A Markdown section: settings, chosen objectives, sharing, cost (and accuracy) per task subset."""
        s = self.front.settings
        lines = ["## MFIS (reconstruction of Cheng et al., Cognitive Computation 2021)", "",
                 f"NSGA-III, {s.get('pop_size')} individuals × {s.get('n_gen')} generations, "
                 f"{s.get('n_ref_dirs')} Das–Dennis directions (p = {s.get('n_partitions')}), seed {s.get('seed')}; "
                 f"{len(self.front.F)} Pareto solutions in {self.front.seconds:.1f} s (total {self.seconds:.1f} s).",
                 "", "Chosen solution: " + ", ".join(f"{k} {v:.3f}" for k, v in self.objectives.items()) + ".", "",
                 self.sharing_markdown(), "", "| subset | no merging MMACs | MFIS MMACs | no merging / MFIS |"
                 + ("".join(f" {name} |" for name in accuracy) if accuracy else ""),
                 "|---|---|---|---|" + ("---|" * len(accuracy) if accuracy else "")]
        for key, macs in self.subset_macs.items():
            ref = self.no_merge_macs[key]
            row = f"| {key} | {ref / 1e6:.3f} | {macs / 1e6:.3f} | {ref / max(macs, 1):.2f}× |"
            if accuracy:
                row += "".join(f" {', '.join(f'{t} {acc[t]:.1f}' for t in key.split('+') if t in acc)} |"
                               for acc in accuracy.values())
            lines.append(row)
        lines.append("")
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
        return "\n".join(lines) + "\n"
