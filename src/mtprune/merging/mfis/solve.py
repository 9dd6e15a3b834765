"""Solving MFIS with NSGA-III and choosing one solution of the Pareto front.

- NSGA-III (Deb & Jain, IEEE TEVC 18(4), 2014) from pymoo, with Das–Dennis reference directions (Das &
  Dennis, SIAM J. Optim. 8(3), 1998): the most partitions whose direction count fits the population.
- The front is the feasible non-dominated set of the final population, in a fixed order.
- Choice: the *knee*, the point farthest below the hyperplane through the front's extreme points after
  normalising each objective to [0, 1] over the front (Das 1999; Deb & Gupta 2011), or the knee of the points
  that meet user bounds (e.g. ``{"max_macs": 0.3}``).

Solving a many-objective problem with an evolutionary algorithm is what Cheng et al. (Cognitive
Computation 2021) describe; everything else here is our reconstruction (METHODS.md §4).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import Any

import numpy as np

from mtprune.utils.errors import MTPruneInputError

from .objectives import Landscape

__all__ = ["ParetoFront", "knee_point", "reference_partitions", "select_solution", "solve"]


@dataclass
class ParetoFront:
    """The non-dominated feasible solutions: decision vectors ``X`` and objectives ``F`` (rows match)."""

    X: np.ndarray
    F: np.ndarray
    names: list[str]
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "F": self.F.tolist(), "seconds": self.seconds, "settings": self.settings,
                "history": self.history}


def reference_partitions(n_obj: int, pop_size: int) -> int:
    """The most Das–Dennis partitions p with at most ``pop_size`` directions, C(n_obj + p − 1, p) (p ≥ 1)."""
    p = 1
    while comb(n_obj + p, p + 1) <= pop_size:
        p += 1
    return p


def _first_front(F: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of F (minimisation)."""
    keep = []
    for i in range(len(F)):
        no_worse, better = (F - F[i] <= 0).all(axis=1), (F - F[i] < 0).any(axis=1)
        dominated = bool(np.any(no_worse & better))
        if not dominated:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def solve(landscape: Landscape, *, pop_size: int = 100, n_gen: int = 100, seed: int = 0,
          n_partitions: int | None = None, counts: Sequence[int] | None = None, flips_per_block: float = 0.5,
          quiet: bool = True) -> ParetoFront:
    """Run NSGA-III on the MFIS problem of ``landscape``; ``counts`` keeps a pre-specified rate exactly."""
    try:
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.operators.selection.tournament import TournamentSelection
        from pymoo.util.ref_dirs import get_reference_directions
    except ImportError as err:  # pragma: no cover - pymoo is a dependency of merging
        raise ImportError("MFIS needs pymoo: pip install 'pymoo>=0.6.1'") from err

    from mtprune.engine.logging import progress_bar, progress_enabled

    from .encoding import validity_problems
    from .operators import BlockCrossover, BlockMutation, KeepSetSampling, compare_by_violation
    from .problem import MFISProblem

    if pop_size < 4 or n_gen < 1:
        raise MTPruneInputError(f"pop_size must be ≥ 4 and n_gen ≥ 1, got {pop_size} and {n_gen}")
    start = time.perf_counter()
    problem = MFISProblem(landscape)
    layout = problem.layout
    n_obj = problem.n_obj
    p = reference_partitions(n_obj, pop_size) if n_partitions is None else int(n_partitions)
    ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=p)
    pop = max(pop_size, len(ref_dirs))
    importance = [layer.importance for layer in landscape.layers]
    algorithm = NSGA3(ref_dirs, pop_size=pop, sampling=KeepSetSampling(layout, counts, importance),
                      selection=TournamentSelection(func_comp=compare_by_violation),
                      crossover=BlockCrossover(layout), mutation=BlockMutation(layout, counts, flips_per_block),
                      eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", n_gen), seed=seed, verbose=False)
    history: list[dict[str, float]] = []
    with progress_bar(n_gen, "MFIS NSGA-III", progress_enabled(quiet)) as step:
        while algorithm.has_next():
            algorithm.next()
            F, G = algorithm.pop.get("F"), algorithm.pop.get("G")
            ok = G[:, 0] <= 0
            best = F[ok].min(axis=0) if ok.any() else np.full(n_obj, np.nan)
            history.append({"gen": algorithm.n_gen - 1, "feasible": int(ok.sum()),
                            "min_macs": float(best[-2]), "min_dissimilarity": float(best[-1]),
                            "min_mean_loss": float(F[ok][:, :-2].mean(axis=1).min()) if ok.any() else float("nan")})
            step(f"feasible {int(ok.sum())}/{len(F)} · min MACs {best[-2]:.3f}")
    X, F, G = algorithm.pop.get("X"), algorithm.pop.get("F"), algorithm.pop.get("G")
    ok = np.flatnonzero(G[:, 0] <= 0)
    if ok.size == 0:
        raise MTPruneInputError("MFIS found no feasible solution (a task left without filters at some layer); "
                                "raise n_gen or pop_size, or lower the pruning rate")
    X, F = X[ok].astype(bool), F[ok]
    front = _first_front(F)
    X, F = X[front], F[front]
    _, unique = np.unique(X, axis=0, return_index=True)
    X, F = X[unique], F[unique]
    order = np.lexsort(F.T[::-1])
    X, F = X[order], F[order]
    for x in X:  # the operators guarantee this; a broken operator should fail loudly
        bad = validity_problems(x, layout, counts)
        if bad:
            raise RuntimeError(f"MFIS operators produced an invalid genotype: {bad[0]}")
    settings = {"algorithm": "NSGA-III", "pop_size": pop, "n_gen": n_gen, "seed": seed, "ref_dirs": "das-dennis",
                "n_partitions": p, "n_ref_dirs": len(ref_dirs), "n_var": layout.n_var, "n_obj": n_obj,
                "counts": None if counts is None else list(counts), "flips_per_block": flips_per_block}
    return ParetoFront(X, F, landscape.objective_names(), time.perf_counter() - start, settings, history)


def knee_point(F: np.ndarray) -> int:
    """Index of the knee: the point farthest below the hyperplane through the extreme points (for each
    objective, the point where it is worst), objectives normalised to [0, 1] over ``F``. Falls back to the plane Σf = 1
    when the extreme points do not span a hyperplane with positive normal. Ties: the first index."""
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2 or len(F) == 0:
        raise MTPruneInputError("knee_point needs a non-empty [n, M] array")
    if len(F) <= 2:
        return int(np.argmin(F.sum(axis=1))) if len(F) == 2 else 0
    lo, hi = F.min(axis=0), F.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    Z = (F - lo) / span
    m = Z.shape[1]
    normal = np.ones(m)
    worst = np.argmax(Z, axis=0)  # the extreme point of objective i is where objective i is worst
    E = Z[worst]
    if len(np.unique(worst)) == m:
        try:
            a = np.linalg.solve(E, np.ones(m))
            if np.all(a > 1e-12) and np.all(np.isfinite(a)):
                normal = a
        except np.linalg.LinAlgError:
            pass
    dist = (1.0 - Z @ normal) / np.linalg.norm(normal)
    return int(np.argmax(dist))


def select_solution(front: ParetoFront, how: str | Mapping[str, float] = "knee") -> int:
    """The index in ``front`` of the chosen solution.

    ``"knee"``: :func:`knee_point` of the whole front. A mapping of bounds, any of ``max_macs`` (fraction of
    no merging), ``max_loss`` (every task's importance lost), ``max_dissimilarity``: the knee of the points
    that meet them.
    """
    F = front.F
    if isinstance(how, str):
        if how != "knee":
            raise MTPruneInputError(f"select must be 'knee' or a mapping of bounds, got {how!r}")
        return knee_point(F)
    known = {"max_macs", "max_loss", "max_dissimilarity"}
    unknown = sorted(set(how) - known)
    if unknown:
        raise MTPruneInputError(f"unknown selection bound(s) {unknown}; known: {sorted(known)}")
    ok = np.ones(len(F), dtype=bool)
    if "max_macs" in how:
        ok &= F[:, -2] <= float(how["max_macs"])
    if "max_loss" in how:
        ok &= F[:, :-2].max(axis=1) <= float(how["max_loss"])
    if "max_dissimilarity" in how:
        ok &= F[:, -1] <= float(how["max_dissimilarity"])
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        raise MTPruneInputError(
            f"no Pareto solution meets {dict(how)}: the front reaches MACs ≥ {F[:, -2].min():.3f}, max task loss "
            f"≥ {F[:, :-2].max(axis=1).min():.3f}, dissimilarity ≥ {F[:, -1].min():.3f}")
    return int(idx[knee_point(F[idx])])
