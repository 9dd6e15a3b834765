"""The objectives of MFIS, all minimised and cheap to evaluate (no training in the loop).

Cheng et al. (Cognitive Computation 2021) optimise filter selection against three criteria; only their
abstract is public, so these are our reconstruction (METHODS.md §4). For T tasks the objective vector is
``(loss_1, ..., loss_T, macs, dissimilarity)``: T + 2 objectives, a many-objective problem for T ≥ 2.

- ``loss_t``, the importance task t loses, ``1 − (Π_l kept_{t,l})^{1/L}``: one minus the geometric mean over
  the L hidden layers of what it keeps (a product, since what reaches the output has passed every layer; the
  root keeps the scale of one layer's share). At layer l the task keeps
  ``kept_{t,l} = Σ_{f: M_l[f,t]=1} I_t[f]·κ_t[f]·φ_t[f]`` of its importance ``I_t`` (normalised to sum 1 per
  layer):

  - ``κ_t[f]``: the share of the input weight mass (L1) of its original filter f, over the inputs the task
    kept, that the wiring rule (``encoding``) leaves connected. 1 at the first layer and for a slot that reads
    all of the task's inputs; a slot shared with tasks that do not keep those inputs loses them;
  - ``φ_t[f]``: how much of its own filter the task finds in the slot, ``max(0, cos(ŵ_{t,f}, m_f))`` with the
    merged filter ``m_f`` below (1 for a slot of its own). So a task pays for what merging changes, too.
- ``macs``: multiply-accumulates of the merged network serving all tasks, as a fraction of no merging
  (the T original networks run one after the other).
- ``dissimilarity``: mean over hidden layers of ``(1/F_l) Σ_{shared slots f} Σ_{t∈P_f} ||ŵ_{t,f} − m_f||²``,
  where ``ŵ_{t,f}`` is task t's original filter f scaled to unit L2 norm and ``m_f`` the mean of those of
  the tasks ``P_f`` sharing slot f: what initialising a shared slot from the mean loses.

Feasibility: every task keeps at least one slot at every layer after :func:`~.encoding.settle`; the number of
(layer, task) pairs without one is the constraint value (≤ 0 is feasible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mtprune.utils.errors import MTPruneInputError

from .encoding import Layout, Settled, reads, settle

__all__ = ["Evaluation", "Landscape", "LayerStats", "evaluate", "fidelity_table", "merge_cost_table", "network_macs",
           "no_merge_macs", "popcount", "subset_macs"]


def popcount(values: np.ndarray) -> np.ndarray:
    """Number of tasks in each bitmask."""
    return np.bitwise_count(np.asarray(values, dtype=np.int64)).astype(np.int64)


def _unit(filters: np.ndarray) -> np.ndarray:
    w = np.asarray(filters, dtype=np.float64)
    if w.ndim != 3:
        raise MTPruneInputError(f"filters must be [T, F, D], got shape {w.shape}")
    norms = np.linalg.norm(w, axis=2, keepdims=True)
    return np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)


def merge_cost_table(filters: np.ndarray) -> np.ndarray:
    """``[T, F, D]`` original filters → ``[F, 2^T]``: for every task set P, ``Σ_{t∈P} ||ŵ_t − mean_P ŵ||²``
    with ``ŵ`` the filter at unit L2 norm (a zero filter stays zero). Sets of fewer than 2 tasks cost 0."""
    w = _unit(filters)
    num_tasks, width, _ = w.shape
    table = np.zeros((width, 1 << num_tasks))
    sq = (w ** 2).sum(axis=2)  # [T, F]
    for p in range(1, 1 << num_tasks):
        members = [t for t in range(num_tasks) if p >> t & 1]
        if len(members) < 2:
            continue
        mean = w[members].mean(axis=0)
        table[:, p] = sq[members].sum(axis=0) - len(members) * (mean ** 2).sum(axis=1)
    return np.maximum(table, 0.0)


def fidelity_table(filters: np.ndarray) -> np.ndarray:
    """``[T, F, D]`` original filters → ``[T, F, 2^T]``: ``φ_t`` of slot f when the tasks P share it,
    ``max(0, cos(ŵ_t, mean_P ŵ))``; 1 when P = {t}; 0 when t ∉ P (or for a zero filter)."""
    w = _unit(filters)
    num_tasks, width, _ = w.shape
    table = np.zeros((num_tasks, width, 1 << num_tasks))
    for p in range(1, 1 << num_tasks):
        members = [t for t in range(num_tasks) if p >> t & 1]
        if len(members) == 1:
            table[members[0], :, p] = 1.0
            continue
        mean = w[members].mean(axis=0)
        norm = np.linalg.norm(mean, axis=1)
        for t in members:
            cos = np.divide((w[t] * mean).sum(axis=1), norm, out=np.zeros(width), where=norm > 0)
            table[t, :, p] = np.clip(cos, 0.0, 1.0)
    return table


@dataclass
class LayerStats:
    """What the objectives need of one hidden layer (in aligned slot order).

    ``link_macs``: MACs of one (filter, input channel) link per sample (conv: output H·W·kh·kw; linear: the
    features per input channel). ``fan_in``: at the first layer, the input channels every filter reads.
    ``importance``: ``[T, F]``, any non-negative scale (normalised here). ``mass``: ``[T, F, F_prev]``, the L1
    of task t's weights from input channel g into filter f (None at the first layer). ``merge_cost``:
    ``[F, 2^T]`` from :func:`merge_cost_table`; ``fidelity``: ``[T, F, 2^T]`` from :func:`fidelity_table`
    (None: φ = 1, merging costs the tasks nothing).
    """

    name: str
    width: int
    link_macs: int
    importance: np.ndarray
    merge_cost: np.ndarray
    mass: np.ndarray | None = None
    fan_in: int = 0
    fidelity: np.ndarray | None = None

    def __post_init__(self) -> None:
        imp = np.asarray(self.importance, dtype=np.float64)
        if imp.ndim != 2 or imp.shape[1] != self.width or (imp < 0).any() or not np.isfinite(imp).all():
            raise MTPruneInputError(f"{self.name}: importance must be finite, non-negative [T, {self.width}]")
        total = imp.sum(axis=1, keepdims=True)
        self.importance = np.where(total > 0, imp / np.where(total > 0, total, 1.0), 1.0 / self.width)
        if self.mass is not None:
            self.mass = np.abs(np.asarray(self.mass, dtype=np.float64))
        if self.fidelity is not None:
            self.fidelity = np.asarray(self.fidelity, dtype=np.float64)


@dataclass
class Landscape:
    """The statistics of T aligned task networks that MFIS optimises over."""

    tasks: tuple[str, ...]
    layers: list[LayerStats]
    head_widths: np.ndarray  # [T] output units of each task's output layer
    head_link_macs: int
    reference_macs: float = field(default=0.0)  # no merging; computed when 0

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.head_widths = np.asarray(self.head_widths, dtype=np.int64)
        if len(self.head_widths) != len(self.tasks):
            raise MTPruneInputError(f"{len(self.head_widths)} head widths for {len(self.tasks)} tasks")
        for k, layer in enumerate(self.layers):
            if layer.importance.shape[0] != len(self.tasks):
                raise MTPruneInputError(f"{layer.name}: importance for {layer.importance.shape[0]} tasks")
            if layer.merge_cost.shape != (layer.width, 1 << len(self.tasks)):
                raise MTPruneInputError(f"{layer.name}: merge_cost must be [{layer.width}, {1 << len(self.tasks)}]")
            if layer.fidelity is not None and layer.fidelity.shape != (len(self.tasks), layer.width,
                                                                       1 << len(self.tasks)):
                raise MTPruneInputError(f"{layer.name}: fidelity must be [T, {layer.width}, {1 << len(self.tasks)}]")
            if k > 0 and (layer.mass is None or layer.mass.shape != (len(self.tasks), layer.width,
                                                                     self.layers[k - 1].width)):
                raise MTPruneInputError(f"{layer.name}: mass must be [T, F, F_prev]")
        if self.reference_macs <= 0:
            self.reference_macs = float(no_merge_macs(self))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def layout(self) -> Layout:
        return Layout(self.tasks, tuple(layer.width for layer in self.layers),
                      tuple(layer.name for layer in self.layers))

    def objective_names(self) -> list[str]:
        return [f"loss[{t}]" for t in self.tasks] + ["macs", "dissimilarity"]


def network_macs(land: Landscape, task: int) -> int:
    """MACs of task ``task``'s original network, in full."""
    total = int(land.head_widths[task]) * land.layers[-1].width * land.head_link_macs
    for k, layer in enumerate(land.layers):
        fan = layer.fan_in if k == 0 else land.layers[k - 1].width
        total += layer.width * fan * layer.link_macs
    return total


def no_merge_macs(land: Landscape) -> int:
    """MACs of the T original networks, each in full, run one after the other."""
    return sum(network_macs(land, t) for t in range(land.num_tasks))


@dataclass
class Evaluation:
    objectives: np.ndarray  # [T + 2]
    violation: int  # (layer, task) pairs without a slot; feasible when 0
    settled: Settled
    macs: int  # absolute MACs of the merged network, all tasks


def _fan(settled: Settled, land: Landscape, k: int) -> np.ndarray:
    """Input channels each slot of layer k reads (0 for pruned slots)."""
    p = settled.patterns[k]
    if k == 0:
        return np.where(p > 0, land.layers[0].fan_in, 0)
    return reads(settled.patterns[k - 1], p).sum(axis=1)


def subset_macs(settled: Settled, land: Landscape, subset: int | None = None) -> int:
    """MACs of serving the tasks in bitmask ``subset`` (all when None): the slots some task of the subset
    depends on, and the output layers of the subset."""
    full = (1 << land.num_tasks) - 1
    s = full if subset is None else int(subset)
    total = 0
    for k, layer in enumerate(land.layers):
        needed = (settled.users[k] & s) > 0
        total += int(_fan(settled, land, k)[needed].sum()) * layer.link_macs
    last = settled.patterns[-1]
    for t in range(land.num_tasks):
        if s >> t & 1:
            total += int(land.head_widths[t]) * int(((last >> t) & 1).sum()) * land.head_link_macs
    return total


def evaluate(matrices: Sequence[np.ndarray], land: Landscape) -> Evaluation:
    """The objective vector and the constraint violation of one set of index matrices."""
    settled = settle(matrices)
    num_tasks = land.num_tasks
    bits = np.int64(1) << np.arange(num_tasks, dtype=np.int64)
    kept = np.ones(num_tasks)
    dissimilarity = 0.0
    for k, layer in enumerate(land.layers):
        p = settled.patterns[k]
        has = (p[None, :] & bits[:, None]) > 0  # [T, F]
        if k == 0:
            kappa = np.ones((num_tasks, layer.width))
        else:
            prev = settled.patterns[k - 1]
            r = reads(prev, p).astype(np.float64)  # [F, F_prev]
            kept_in = ((prev[None, :] & bits[:, None]) > 0).astype(np.float64)  # [T, F_prev]
            num = np.einsum("tfg,fg->tf", layer.mass, r)
            den = np.einsum("tfg,tg->tf", layer.mass, kept_in)
            kappa = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        phi = 1.0 if layer.fidelity is None else layer.fidelity[:, np.arange(layer.width), p]
        kept *= (layer.importance * kappa * phi * has).sum(axis=1)
        shared = popcount(p) >= 2
        dissimilarity += float(layer.merge_cost[np.flatnonzero(shared), p[shared]].sum()) / layer.width
    depth = len(land.layers)
    macs = subset_macs(settled, land)
    loss = 1.0 - np.power(np.clip(kept, 0.0, 1.0), 1.0 / depth)
    objectives = np.concatenate([loss, [macs / land.reference_macs, dissimilarity / depth]])
    return Evaluation(objectives, len(settled.starved), settled, macs)
