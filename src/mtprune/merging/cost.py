"""The cost of serving every subset of tasks, for three ways of serving them (He et al., KDD 2021, §4):

- **no merging**: one network per task (each pruned alone); ``cost(S) = Σ_{t∈S} cost_t``;
- **naive merging**: a shared trunk up to a chosen layer, then one branch per task;
- **PAM**: ``cost(S) = FLOPs(all C) + Σ_{t∈S} FLOPs(E_t)``.

FLOPs are counted as multiply-accumulates (MACs) of conv and linear layers per sample, with the real input
widths (``mtprune.measure``). Latency is measured: for a merged model, ``model(x, tasks=S)``; without merging,
the networks of S run one after the other.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor, nn

from mtprune.measure import measure_latency, profile
from mtprune.utils.errors import MTPruneInputError

__all__ = ["SubsetCost", "cost_table", "costs_to_dict", "merged_costs", "plot_costs", "separate_costs", "subset_keys"]


@dataclass
class SubsetCost:
    macs: int
    latency_ms: float | None = None


def subset_keys(tasks: Sequence[str]) -> list[str]:
    """All 2^T − 1 non-empty subsets as ``"a+b"`` keys, by size, then in task order."""
    tasks = list(tasks)
    return ["+".join(c) for r in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, r)]


class _Named(nn.Module):
    """A single-output network seen as ``{task: output}`` (for ``profile``)."""

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x: Tensor) -> object:
        out = self.net(x)
        return out if isinstance(out, Mapping) else {self.task: out}


def separate_costs(models: Mapping[str, nn.Module], example: Tensor, *, latency: bool = True, warmup: int = 3,
                   repeats: int = 10) -> dict[str, SubsetCost]:
    """No merging: each task runs its own network; MACs add up, latency is measured running them in turn."""
    macs = {t: profile(_Named(m, t), example, latency=False).macs for t, m in models.items()}
    out: dict[str, SubsetCost] = {}
    for key in subset_keys(list(models)):
        subset = key.split("+")
        cost = SubsetCost(sum(macs[t] for t in subset))
        if latency:
            nets = [models[t] for t in subset]
            modes = [n.training for n in nets]
            for n in nets:
                n.eval()
            try:
                device = next(nets[0].parameters()).device
                x = example.to(device)
                cost.latency_ms = measure_latency(lambda nets=nets, x=x: [n(x) for n in nets], warmup=warmup,
                                                  repeats=repeats, device=device)
            finally:
                for n, m in zip(nets, modes, strict=True):
                    n.train(m)
        out[key] = cost
    return out


def merged_costs(model: nn.Module, example: Tensor, *, latency: bool = True, warmup: int = 3, repeats: int = 10
                 ) -> dict[str, SubsetCost]:
    """A multi-task model that runs ``model(x, tasks=S)``: MACs of the layers S needs, latency of that call."""
    prof = profile(model, example, latency=latency, subsets_latency=latency, warmup=warmup, repeats=repeats,
                   subsets=True)
    return {k: SubsetCost(v, prof.latency_per_subset_ms.get(k)) for k, v in prof.macs_per_subset.items()}


def cost_table(costs: Mapping[str, Mapping[str, SubsetCost]], reference: str = "no_merge",
               ) -> list[dict[str, object]]:
    """One row per task subset: each approach's MACs and latency, and ``reference`` / approach MAC ratios."""
    approaches = list(costs)
    if reference not in costs:
        raise MTPruneInputError(f"reference approach {reference!r} not among {approaches}")
    keys = list(costs[reference])
    for name, table in costs.items():
        if set(table) != set(keys):
            raise MTPruneInputError(f"approach {name!r} covers subsets {sorted(table)}, expected {sorted(keys)}")
    rows = []
    for key in keys:
        row: dict[str, object] = {"subset": key, "size": len(key.split("+"))}
        for name in approaches:
            c = costs[name][key]
            row[f"{name}_macs"] = c.macs
            row[f"{name}_latency_ms"] = c.latency_ms
        for name in approaches:
            if name != reference:
                row[f"{reference}_over_{name}"] = costs[reference][key].macs / max(costs[name][key].macs, 1)
        rows.append(row)
    return rows


def costs_to_dict(costs: Mapping[str, Mapping[str, SubsetCost]]) -> dict[str, dict[str, dict]]:
    return {a: {k: asdict(c) for k, c in t.items()} for a, t in costs.items()}


def plot_costs(costs: Mapping[str, Mapping[str, SubsetCost]], path: str | Path, title: str = "",
               labels: Mapping[str, str] | None = None) -> Path:
    """Grouped bars: MACs (top) and latency (bottom) of every task subset for each approach (PNG, Agg).

    ``labels`` renames approaches in the legend (e.g. to flag one that missed the accuracy budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    approaches = list(costs)
    keys = list(next(iter(costs.values())))
    has_latency = all(c.latency_ms is not None for t in costs.values() for c in t.values())
    panels = 2 if has_latency else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 1.1 * len(keys) + 2), 3.2 * panels), squeeze=False)
    width = 0.8 / len(approaches)
    for p, (metric, label) in enumerate([("macs", "MMACs per sample"), ("latency_ms", "latency (ms)")][:panels]):
        ax = axes[p][0]
        for i, name in enumerate(approaches):
            vals = [getattr(costs[name][k], metric) for k in keys]
            vals = [v / 1e6 for v in vals] if metric == "macs" else vals
            ax.bar([j + (i - (len(approaches) - 1) / 2) * width for j in range(len(keys))], vals, width,
                   label=(labels or {}).get(name, name.replace("_", " ")))
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlabel("task subset")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

