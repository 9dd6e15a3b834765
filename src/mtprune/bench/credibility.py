"""Is the ``criteria`` testbed able to rank pruning criteria? Its credibility numbers, from the suite's own entries.

A testbed on which pruning itself helps cannot rank criteria (issue 13): the dense model must be at a plateau (the
control, fine-tuned alike without pruning, barely moves), pruning must not act as a regulariser (random pruning
gains nothing, no pruned model beats the control), and heavy pruning must cost visibly. And a gradient criterion's
decisions must rest on enough data that its scores are stable: the split-half rank correlation of its per-channel
scores (scores computed on two disjoint halves of the statistics data, Spearman ρ within each channel group, the
median over groups) must be high.

``credibility(rows, split_half)`` computes exactly the keys of ``credibility.json``; every per-task number is the
mean over seeds of a method's per-task term of Δm (``task_delta``, % against the dense model of the same seed):

- ``control_max_abs_task_change_pct``: the largest |mean change| of any task for the control;
- ``random_0.25_max_task_gain_pct``: random pruning's largest mean task change at MACs 0.25 (either pool);
- ``max_task_gain_over_control_0.25_pct``: the largest (pruned − control) mean task change at MACs 0.25, over
  every pruned row of both pools;
- ``best_delta_m_0.1_pct``: the best mean Δm at MACs 0.1 over every pruned row of both pools;
- ``seeds_min``: the fewest seeds behind any (pool, method, target) cell, the control included;
- ``score_split_half_rank_corr``: criterion → median over seeds of its split-half ρ.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils.atomic import atomic_write_json

CONTROL = "dense, fine-tuned alike"  # the criteria suite's control row (criteria.DENSE_FT)
KEYS = ("control_max_abs_task_change_pct", "random_0.25_max_task_gain_pct", "max_task_gain_over_control_0.25_pct",
        "best_delta_m_0.1_pct", "seeds_min", "score_split_half_rank_corr")


def spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman's rank correlation of two score vectors (average ranks for ties); ``None`` when undefined
    (fewer than 3 values, or a constant vector)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if a.numel() < 3 or a.numel() != b.numel():
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else None


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n−1, ties sharing their mean rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def split_half_rank_corr(model: nn.Module, example_inputs: Tensor, criterion: str, batches: Sequence,
                         losses: Mapping, seed: int = 0, *, second: Iterable | None = None,
                         half: int | None = None) -> dict:
    """Scores of ``criterion`` on the first and on the second half of ``batches`` (disjoint), Spearman ρ between
    them in every channel group of the whole model; returns the per-group ρ and their median. With ``second``
    (and ``half``, the batches of each), ``batches`` and ``second`` are the two decisions' data, read lazily."""
    from ..pruning.criteria import get_criterion
    from ..pruning.graph import PruningGraph
    from ..pruning.prune import as_losses, criterion_scores

    if second is None:
        half = len(batches) // 2
        parts = (batches[:half], batches[half:2 * half])
    else:
        parts = (batches, second)
    if half is None or half < 1:
        raise ValueError("split-half scores need at least 2 batches")
    graph = PruningGraph(model, example_inputs)
    crit = get_criterion(criterion, seed=seed)
    first, second = (criterion_scores(model, graph, crit, data=part, losses=as_losses(losses), batches=half)
                     for part in parts)
    per_group = {graph.groups[k].root: spearman(first[k], second[k]) for k in first if k in second}
    values = [v for v in per_group.values() if v is not None]
    return {"criterion": criterion, "batches_per_half": half, "per_group": per_group,
            "median": statistics.median(values) if values else None}


def _mean(values: Iterable[float]) -> float:
    return statistics.fmean(values)


def _cells(rows: Iterable[Mapping]) -> dict[tuple, list[Mapping]]:
    out: dict[tuple, list[Mapping]] = {}
    for r in rows:
        pool = "control" if r["method"] == CONTROL else r.get("pool", "all")
        out.setdefault((pool, r["method"], float(r["target_macs"])), []).append(r)
    return out


MACS_TOLERANCE = 0.05  # a row reached its MACs target when it keeps at most 5 % more than the target


def reached_target(row: Mapping) -> bool:
    """Whether a pruned row kept no more MACs than its target allows (a method may stop early: PAGCP ends when
    no layer can lose channels within its loss bound); rows that did not are not at that target."""
    return row["macs_kept"] <= float(row["target_macs"]) * (1 + MACS_TOLERANCE)


def _task_means(rows: Sequence[Mapping]) -> dict[str, float]:
    return {t: _mean(r["task_delta"][t] for r in rows) for t in rows[0]["task_delta"]}


def credibility(rows: Sequence[Mapping], split_half: Sequence[Mapping]) -> dict:
    """The keys of ``credibility.json`` (module docstring) from the suite's method rows and split-half entries;
    a number with no rows behind it is ``None``."""
    cells = _cells(rows)
    control = [r for r in rows if r["method"] == CONTROL]
    ctrl = _task_means(control) if control else None
    pruned = {k: v for k, v in cells.items() if k[0] != "control"}
    at25 = [rs for (_, _, t), rs in pruned.items() if t == 0.25]
    random25 = [max(_task_means(rs).values()) for (_, m, t), rs in pruned.items() if m == "random" and t == 0.25]
    over = [max(_task_means(rs)[t] - ctrl[t] for t in ctrl) for rs in at25] if ctrl else []
    # the best model at MACs 0.1 must be at 0.1: a cell counts only when all its rows reached the target
    at10 = [_mean(r["delta_m"] for r in rs) for (_, _, t), rs in pruned.items()
            if t == 0.1 and all(reached_target(r) for r in rs)]
    corr: dict[str, list[float]] = {}
    for e in split_half:
        if e.get("median") is not None:
            corr.setdefault(e["criterion"], []).append(e["median"])
    return {
        "control_max_abs_task_change_pct": max(abs(v) for v in ctrl.values()) if ctrl else None,
        "random_0.25_max_task_gain_pct": max(random25) if random25 else None,
        "max_task_gain_over_control_0.25_pct": max(over) if over else None,
        "best_delta_m_0.1_pct": max(at10) if at10 else None,
        "seeds_min": min(len({r["seed"] for r in rs}) for rs in cells.values()) if cells else 0,
        "score_split_half_rank_corr": {c: statistics.median(v) for c, v in sorted(corr.items())},
    }


def read_entries(folder: str | Path) -> tuple[list[dict], list[dict]]:
    """The criteria suite's stored entries under ``folder/entries``: (method rows, split-half entries); the
    dense models' entries are skipped."""
    rows, halves = [], []
    for path in sorted((Path(folder) / "entries").glob("*.json")):
        entry = json.loads(path.read_text())
        if entry.get("kind") == "split_half":
            halves.append(entry)
        elif "method" in entry and "task_delta" in entry:
            rows.append(entry)
    return rows, halves


def write_credibility(folder: str | Path, rows: Sequence[Mapping], split_half: Sequence[Mapping]) -> dict:
    """Compute the credibility numbers of a suite run and write them to ``folder/credibility.json``."""
    result = credibility(rows, split_half)
    atomic_write_json(Path(folder) / "credibility.json", result)
    return result
