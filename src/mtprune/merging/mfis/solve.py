"""Solving MFIS with NSGA-III and choosing one solution of the Pareto front.

- NSGA-III (Deb & Jain, IEEE TEVC 18(4), 2014) from pymoo, with Das–Dennis reference directions (Das &
  Dennis, SIAM J. Optim. 8(3), 1998): the most partitions whose direction count fits the population.
- The front is the feasible non-dominated set of the final population, in a fixed order.
- Choice: the *knee*, the point farthest below the hyperplane through the front's extreme points after
  normalising each objective to [0, 1] over the front (Das 1999; Deb & Gupta 2011), or the knee of the points
  that meet user bounds (e.g. ``{"max_macs": 0.3}``).
- Resuming: with ``checkpoint``, the search state after each generation (population, generation counter, the
  algorithm's random generator, NSGA-III's normalisation points) is written atomically as a weights-only
  checkpoint, and a search that finds the file continues from it: the front is bit-identical to an uninterrupted run.

Solving a many-objective problem with an evolutionary algorithm is what Cheng et al. (Cognitive
Computation 2021) describe; everything else here is our reconstruction (METHODS.md §4).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
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
          quiet: bool = True, checkpoint: str | Path | None = None, checkpoint_every: int = 1) -> ParetoFront:
    """Run NSGA-III on the MFIS problem of ``landscape``; ``counts`` keeps a pre-specified rate exactly.

    ``checkpoint``: a file for the search state, written every ``checkpoint_every`` generations (and after the
    last); if it exists when the search starts, the search continues from it (same landscape and settings, else
    :class:`MTPruneInputError`) and ends bit-identical to an uninterrupted run with the same seed.
    """
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
    if checkpoint_every < 1:
        raise MTPruneInputError(f"checkpoint_every must be ≥ 1, got {checkpoint_every}")
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
    settings = {"algorithm": "NSGA-III", "pop_size": pop, "n_gen": n_gen, "seed": seed, "ref_dirs": "das-dennis",
                "n_partitions": p, "n_ref_dirs": len(ref_dirs), "n_var": layout.n_var, "n_obj": n_obj,
                "counts": None if counts is None else [int(c) for c in counts], "flips_per_block": flips_per_block}
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and path.is_file():
        history, spent = _restore_state(path, algorithm, problem, settings)
        start -= spent
    remaining = n_gen - len(history)  # off a terminal: about ten progress lines (engine/logging.py)
    with progress_bar(remaining, "MFIS NSGA-III", progress_enabled(quiet),
                      lines_every=0 if quiet else max(1, remaining // 10)) as step:
        while algorithm.has_next():
            algorithm.next()
            F, G = algorithm.pop.get("F"), algorithm.pop.get("G")
            ok = G[:, 0] <= 0
            best = F[ok].min(axis=0) if ok.any() else np.full(n_obj, np.nan)
            history.append({"gen": algorithm.n_gen - 1, "feasible": int(ok.sum()),
                            "min_macs": float(best[-2]), "min_dissimilarity": float(best[-1]),
                            "min_mean_loss": float(F[ok][:, :-2].mean(axis=1).min()) if ok.any() else float("nan")})
            step(f"generation {len(history)}/{n_gen} · feasible {int(ok.sum())}/{len(F)} · min MACs {best[-2]:.3f}"
                 f" · min mean loss {history[-1]['min_mean_loss']:.4g}")
            if path is not None and (len(history) % checkpoint_every == 0 or not algorithm.has_next()):
                _save_state(path, algorithm, settings, history, time.perf_counter() - start)
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
    return ParetoFront(X, F, landscape.objective_names(), time.perf_counter() - start, settings, history)


_STATE_KIND = "mfis-search-state"
_INDIVIDUAL_DATA = ("n_gen", "n_iter", "rank", "niche", "dist_to_niche")  # per-individual values pymoo keeps


def _save_state(path: Path, algorithm: Any, settings: dict[str, Any], history: list[dict[str, float]],
                seconds: float) -> None:
    """What decides the next generations, atomically, as a weights-only checkpoint (tensors, strings, numbers)."""
    import torch

    from mtprune.engine.checkpoint import save_checkpoint

    pop, norm = algorithm.pop, algorithm.survival.norm
    data: dict[str, Any] = {}
    for key in _INDIVIDUAL_DATA:
        have = [key in ind.data for ind in pop]
        if any(have):
            values = np.asarray([ind.data[key] if h else 0 for ind, h in zip(pop, have, strict=True)])
            data[key] = {"present": torch.tensor(have), "values": torch.from_numpy(np.ascontiguousarray(values))}

    def arr(a: np.ndarray | None) -> Any:
        return None if a is None else torch.from_numpy(np.array(a, dtype=np.float64))

    save_checkpoint(path, {
        "kind": _STATE_KIND, "settings": json.dumps(settings, sort_keys=True), "history": json.dumps(history),
        "seconds": float(seconds), "n_iter": int(algorithm.n_iter), "perc": float(algorithm.termination.perc),
        "force_termination": bool(algorithm.termination.force_termination),
        "n_eval": int(algorithm.evaluator.n_eval), "rng": json.dumps(algorithm.random_state.bit_generator.state),
        "X": torch.from_numpy(np.ascontiguousarray(pop.get("X"))),
        "F": arr(pop.get("F")), "G": arr(pop.get("G")), "H": arr(pop.get("H")),
        "evaluated": sorted(set().union(*(ind.evaluated for ind in pop))), "data": data,
        "ideal": arr(norm.ideal_point), "worst": arr(norm.worst_point), "nadir": arr(norm.nadir_point),
        "extreme": arr(norm.extreme_points)})


def _restore_state(path: Path, algorithm: Any, problem: Any,
                   settings: dict[str, Any]) -> tuple[list[dict[str, float]], float]:
    """Put the state of :func:`_save_state` into a freshly set-up ``algorithm``; returns (history, seconds)."""
    from pymoo.core.population import Population

    from mtprune.engine.checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    try:
        if payload.get("kind") != _STATE_KIND:
            raise ValueError(f"a {payload.get('kind')!r} checkpoint")
        saved = json.loads(payload["settings"])
        if saved != json.loads(json.dumps(settings, sort_keys=True)):
            diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise MTPruneInputError(f"{path}: the saved MFIS search has other settings ({', '.join(diff)}); "
                                    "delete it to search again")
        X = payload["X"].numpy().astype(bool)
        F, G, H = (payload[k].numpy() for k in ("F", "G", "H"))
        if X.ndim != 2 or X.shape[1] != problem.n_var or not (len(X) == len(F) == len(G) == len(H)):
            raise ValueError(f"a population of shape {tuple(X.shape)} for {problem.n_var} variables")
        check = problem.evaluate(X[:1], return_as_dictionary=True)  # the same landscape gives the same objectives
        if not (np.array_equal(check["F"], F[:1]) and np.array_equal(check["G"], G[:1])):
            raise MTPruneInputError(f"{path}: the saved MFIS search was made on other networks or data; "
                                    "delete it to search again")
        pop = Population.new("X", X)
        pop.set("F", F, "G", G, "H", H)
        evaluated = {str(e) for e in payload["evaluated"]}
        for key, entry in payload["data"].items():
            present, values = entry["present"].numpy(), entry["values"].numpy()
            for ind, has, value in zip(pop, present, values, strict=True):
                if has:
                    ind.data[key] = value.item() if key in ("n_gen", "n_iter") else value
        for ind in pop:
            ind.evaluated = set(evaluated)
        norm = algorithm.survival.norm
        norm.ideal_point, norm.worst_point = payload["ideal"].numpy(), payload["worst"].numpy()
        norm.nadir_point = None if payload["nadir"] is None else payload["nadir"].numpy()
        norm.extreme_points = None if payload["extreme"] is None else payload["extreme"].numpy()
        algorithm.random_state.bit_generator.state = json.loads(payload["rng"])
        algorithm.pop, algorithm.is_initialized, algorithm.start_time = pop, True, time.time()
        algorithm.n_iter = int(payload["n_iter"])
        algorithm.termination.perc = float(payload["perc"])
        algorithm.termination.force_termination = bool(payload["force_termination"])
        algorithm.evaluator.n_eval = int(payload["n_eval"])
        history = json.loads(payload["history"])
        if not isinstance(history, list) or len(history) != algorithm.n_iter - 1:
            raise ValueError(f"{len(history)} generations of history for generation {algorithm.n_iter - 1}")
        return history, float(payload["seconds"])
    except MTPruneInputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise MTPruneInputError(f"{path}: not the state of an MFIS search; cannot resume from it "
                                f"({type(err).__name__}: {err})") from err


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
        if how == "budget":
            raise MTPruneInputError("select 'budget' fine-tunes candidates, so it is a pipeline choice: use "
                                    "mtprune merge (merge.select: budget) or mfis.budget.select_within_budget")
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
