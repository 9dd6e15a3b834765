"""PAGCP's per-layer loss thresholds θ (Ye et al., TPAMI 2023), as the authors' code pairs them with the layers.

``θ_j = θ_0 λ^j`` with λ solved so that ``Π_{j<n} (1 + θ_j) = budget`` for the n candidate layers of a round
(``ratio_compute`` in HankYe/PAGCP ``prune/sensitivity.py``). The code then

- orders the layers by the MACs a probe removal saves, **ascending when λ > 1** and descending when λ ≤ 1, so
  the layers that save the most MACs always get the largest θ (:func:`probe_order`);
- advances θ (``thres *= exp``) only after a layer is actually pruned: ``j`` counts the layers pruned so far
  in the round, not the position in the order (:class:`Thresholds`).

Since at most n layers are pruned, the layers pruned in a round use θ_0 … θ_{k-1}, k ≤ n, whose product of
``1 + θ`` stays within ``budget``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def _softplus(z: float) -> float:
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def solve_lambda(theta0: float, n_layers: int, budget: float) -> float:
    """λ > 0 with ``Π_{i<n} (1 + θ0 λ^i) = budget`` (Ye et al. 2023): bisection on log λ, then Newton.

    A solution exists iff ``n_layers >= 2`` and ``1 + theta0 < budget``; otherwise ``ValueError``.
    """
    if n_layers < 2:
        raise ValueError(f"λ is free with fewer than 2 layers (got {n_layers}): use theta_schedule")
    if not (theta0 > 0 and budget > 1 and 1 + theta0 < budget):
        raise ValueError(f"need 0 < theta0 and 1 + theta0 < budget, got theta0={theta0}, budget={budget}")
    goal, log_t = math.log(budget), math.log(theta0)

    def f(mu: float) -> float:  # Σ log(1 + θ0 e^{iμ}) - log(budget), increasing in μ = log λ
        return sum(_softplus(log_t + i * mu) for i in range(n_layers)) - goal

    lo, hi = -1.0, 1.0
    while f(lo) > 0:
        lo *= 2
    while f(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(mid)):
            break
    mu = (lo + hi) / 2
    for _ in range(3):  # Newton polish: f'(μ) = Σ i·σ(log θ0 + iμ)
        slope = sum(i / (1 + math.exp(-(log_t + i * mu))) for i in range(1, n_layers))
        if slope <= 0:
            break
        mu -= f(mu) / slope
    return math.exp(mu)


def theta_schedule(theta0: float | None, n_layers: int, budget: float) -> tuple[list[float], float]:
    """``([θ_0 … θ_{n-1}], λ)`` with ``θ_i = θ0 λ^i`` and ``Π(1 + θ_i) = budget``.

    ``theta0=None`` takes half the uniform allowance ``budget^(1/n) - 1`` (so λ > 1); one layer gets
    ``budget - 1``.
    """
    if n_layers <= 0:
        return [], 1.0
    if n_layers == 1:
        return [budget - 1.0], 1.0
    t0 = (budget ** (1.0 / n_layers) - 1.0) / 2 if theta0 is None else float(theta0)
    lam = solve_lambda(t0, n_layers, budget)
    return [t0 * lam**i for i in range(n_layers)], lam


def probe_order(items: Sequence[T], saved: Callable[[T], float], lam: float) -> list[T]:
    """``items`` in the order they are probed: by MACs ``saved`` ascending when ``lam > 1`` (θ grows along the
    order), descending otherwise, so the layers saving the most MACs get the largest θ (Ye et al.'s code).
    Ties keep the given order."""
    return sorted(items, key=saved, reverse=lam <= 1)


class Thresholds:
    """θ along a round: ``θ_0 λ^j`` where ``j`` counts the layers pruned so far (it advances on :meth:`pruned`)."""

    def __init__(self, thetas: Sequence[float]) -> None:
        self.thetas = list(thetas)
        self.advanced = 0

    @property
    def current(self) -> float:
        return self.thetas[min(self.advanced, len(self.thetas) - 1)]

    def pruned(self) -> None:
        """A layer was pruned: the next one gets the next θ."""
        self.advanced += 1
