"""Variation operators of MFIS for pymoo that keep every genotype valid.

Valid (``encoding.validity_problems``): each task keeps at least one filter at every hidden layer and, with a
pre-specified pruning rate, exactly ``counts[l]`` there. The operators act on whole keep sets, the blocks of
the encoding (one per layer and task):

- sampling: a few structured individuals (all shared; each task its own most important filters; slots split
  between tasks by importance), the rest random keep sets, half of them drawn in proportion to importance;
- crossover: each block of a child comes whole from one parent (the other child gets the other block);
- mutation: bit flips within a block, then a repair of that block's count.

This operator design is ours: Cheng et al. (2021) only say the problem is solved by an evolutionary
algorithm (reconstruction, METHODS.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.sampling import Sampling

from .encoding import Layout

__all__ = ["BlockCrossover", "BlockMutation", "KeepSetSampling", "compare_by_violation", "repair_block"]


def compare_by_violation(pop, P: np.ndarray, random_state=None, **kwargs) -> np.ndarray:
    """Binary tournament of NSGA-III: the smaller constraint violation wins, ties at random.

    pymoo's own ``comp_by_cv_then_random`` (0.6.2) draws ties between infeasible solutions from a fresh,
    unseeded generator, so a seeded run would not repeat; this one draws every tie from ``random_state``.
    """
    cv = np.asarray(pop.get("CV"), dtype=np.float64).reshape(-1)
    a, b = P[:, 0], P[:, 1]
    coin = random_state.random(len(P)) < 0.5
    winner = np.where(coin, a, b)
    winner = np.where(cv[a] < cv[b], a, np.where(cv[b] < cv[a], b, winner))
    return winner[:, None].astype(int)


def repair_block(bits: np.ndarray, count: int | None, rng: np.random.Generator) -> np.ndarray:
    """Fix one keep set in place: exactly ``count`` ones when given, else at least one."""
    ones, zeros = np.flatnonzero(bits), np.flatnonzero(~bits)
    if count is None:
        if ones.size == 0:
            bits[rng.integers(bits.size)] = True
        return bits
    if ones.size > count:
        bits[rng.choice(ones, ones.size - count, replace=False)] = False
    elif ones.size < count:
        bits[rng.choice(zeros, count - ones.size, replace=False)] = True
    return bits


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:k]


class KeepSetSampling(Sampling):
    """Initial population of valid genotypes; ``importance[l]`` is ``[T, F_l]`` (any scale) or None."""

    def __init__(self, layout: Layout, counts: Sequence[int] | None = None,
                 importance: Sequence[np.ndarray] | None = None) -> None:
        super().__init__()
        self.layout, self.counts = layout, None if counts is None else list(counts)
        self.importance = None if importance is None else [np.asarray(i, dtype=np.float64) for i in importance]

    def _scores(self, k: int) -> np.ndarray:
        lay = self.layout
        if self.importance is None:
            return np.ones((lay.num_tasks, lay.widths[k]))
        imp = self.importance[k]
        return imp / np.maximum(imp.sum(axis=1, keepdims=True), 1e-12)

    def structured(self) -> list[np.ndarray]:
        """All shared; each task its own top filters; slots split between tasks (when a slot fits each)."""
        lay, out = self.layout, []
        shared, own, split = (np.zeros(lay.n_var, dtype=bool) for _ in range(3))
        for k, width in enumerate(lay.widths):
            scores = self._scores(k)
            count = width if self.counts is None else self.counts[k]
            common = _top(scores.sum(axis=0), count)
            owner = np.argmax(scores, axis=0)
            for t in range(lay.num_tasks):
                shared[lay.block(k, t)][common] = True
                own[lay.block(k, t)][_top(scores[t], count)] = True
                block = split[lay.block(k, t)]
                block[owner == t] = True
                if not block.any():
                    block[_top(scores[t], 1)] = True
        out += [shared, own]
        if self.counts is None:
            out.append(split)
        return out

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        rng = random_state
        lay = self.layout
        X = np.zeros((n_samples, lay.n_var), dtype=bool)
        fixed = self.structured()[:n_samples]
        for i, x in enumerate(fixed):
            X[i] = x
        for i in range(len(fixed), n_samples):
            weighted = i % 2 == 1
            for k, width in enumerate(lay.widths):
                scores = self._scores(k)
                for t in range(lay.num_tasks):
                    count = int(rng.integers(1, width + 1)) if self.counts is None else self.counts[k]
                    if weighted:  # Gumbel top-k: a draw without replacement in proportion to importance
                        keys = np.log(scores[t] + 1e-12) + rng.gumbel(size=width)
                        idx = _top(keys, count)
                    else:
                        idx = rng.choice(width, count, replace=False)
                    X[i, lay.block(k, t)][idx] = True
        return X


class BlockCrossover(Crossover):
    """Uniform crossover over keep sets: each (layer, task) block is inherited whole."""

    def __init__(self, layout: Layout, prob: float = 0.9) -> None:
        super().__init__(n_parents=2, n_offsprings=2, prob=prob)
        self.layout = layout

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        rng = random_state
        lay = self.layout
        _, n_matings, n_var = X.shape
        Q = np.empty((2, n_matings, n_var), dtype=bool)
        for m in range(n_matings):
            pick = rng.random((lay.depth, lay.num_tasks)) < 0.5
            for k in range(lay.depth):
                for t in range(lay.num_tasks):
                    b = lay.block(k, t)
                    first = 0 if pick[k, t] else 1
                    Q[0, m, b] = X[first, m, b]
                    Q[1, m, b] = X[1 - first, m, b]
        return Q


class BlockMutation(Mutation):
    """Flip each bit of a keep set with probability ``flips_per_block / F_l``, then repair its count."""

    def __init__(self, layout: Layout, counts: Sequence[int] | None = None, flips_per_block: float = 0.5,
                 prob: float = 1.0) -> None:
        super().__init__(prob=prob)
        self.layout, self.counts = layout, None if counts is None else list(counts)
        self.flips_per_block = float(flips_per_block)

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        rng = random_state
        lay = self.layout
        X = np.asarray(X).astype(bool).copy()
        for i in range(len(X)):
            for k, width in enumerate(lay.widths):
                p = min(0.5, self.flips_per_block / width)
                count = None if self.counts is None else self.counts[k]
                for t in range(lay.num_tasks):
                    block = X[i, lay.block(k, t)]
                    flip = rng.random(width) < p
                    if not flip.any():
                        continue
                    if count is not None and count < width:  # keep the count: pair each removal with an addition
                        ones, zeros = np.flatnonzero(block), np.flatnonzero(~block)
                        n = min(int(flip.sum()), ones.size, zeros.size)
                        if n:
                            block[rng.choice(ones, n, replace=False)] = False
                            block[rng.choice(zeros, n, replace=False)] = True
                    else:
                        block ^= flip
                    repair_block(block, count, rng)
        return X
