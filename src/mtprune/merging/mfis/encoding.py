"""Index matrices of MFIS and their compact encoding (Cheng et al., Cognitive Computation 13(4), 2021).

Only the abstract of Cheng et al. is public: this is our reconstruction (``docs`` / METHODS.md §4).

T task networks of one chain architecture have ``F_l`` filters at hidden layer l. The merged network has
``F_l`` *slots* there, and the index matrix ``M_l ∈ {0,1}^{F_l×T}`` says which tasks use which slot:
``M_l[f, t] = 1`` when task t keeps its filter f and places it in slot f. A slot used by several tasks is
shared (one filter), a slot used by none is pruned. The *pattern* of a slot is the set of its tasks as a
bitmask (bit t for task t).

The optimiser sees one boolean vector: per layer, per task, the keep set of that task as a row of ``F_l``
bits (``x[offset_l + t*F_l + f] = M_l[f, t]``). Sharing is implicit: two tasks that keep index f share slot f.

Wiring rule (our choice; it generalises PAM's "C reads C, E_t reads E_t and C" to all task sets): a slot of
pattern P reads the slots of the previous layer whose pattern contains P. So a slot computes one activation,
the same for every task that uses it, and a task never reads a slot it does not use. :func:`settle` drops
the slots this rule leaves without input, and those nothing reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mtprune.utils.errors import MTPruneInputError

__all__ = [
    "Layout", "Settled", "decode", "encode", "from_keep_sets", "keep_counts", "pattern_names", "patterns",
    "settle", "to_keep_sets", "validity_problems",
]


@dataclass(frozen=True)
class Layout:
    """Where each layer's and task's keep set sits in the decision vector."""

    tasks: tuple[str, ...]
    widths: tuple[int, ...]  # F_l per hidden layer
    names: tuple[str, ...] = ()  # layer names, for messages and reports

    def __post_init__(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise MTPruneInputError(f"MFIS needs distinct task names, got {list(self.tasks)}")
        if len(self.tasks) > 16:
            raise MTPruneInputError(f"MFIS supports at most 16 tasks, got {len(self.tasks)}")
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise MTPruneInputError(f"layer widths must be positive, got {list(self.widths)}")
        if self.names and len(self.names) != len(self.widths):
            raise MTPruneInputError(f"{len(self.names)} layer names for {len(self.widths)} layers")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def offsets(self) -> list[int]:
        """Start of each layer's block (``T * F_l`` bits) in the decision vector."""
        return [0, *np.cumsum([self.num_tasks * w for w in self.widths]).tolist()][:-1]

    @property
    def n_var(self) -> int:
        return self.num_tasks * int(sum(self.widths))

    def block(self, layer: int, task: int) -> slice:
        """The bits of ``task``'s keep set at ``layer``."""
        start = self.offsets[layer] + task * self.widths[layer]
        return slice(start, start + self.widths[layer])

    def layer_name(self, layer: int) -> str:
        return self.names[layer] if self.names else f"layer{layer}"


def encode(matrices: Sequence[np.ndarray], layout: Layout) -> np.ndarray:
    """Index matrices ``[F_l, T]`` → the boolean decision vector."""
    if len(matrices) != layout.depth:
        raise MTPruneInputError(f"{len(matrices)} index matrices for {layout.depth} layers")
    parts = []
    for k, m in enumerate(matrices):
        m = np.asarray(m)
        if m.shape != (layout.widths[k], layout.num_tasks):
            raise MTPruneInputError(f"index matrix of {layout.layer_name(k)} has shape {m.shape}, expected "
                                    f"{(layout.widths[k], layout.num_tasks)}")
        parts.append(m.astype(bool).T.reshape(-1))
    return np.concatenate(parts)


def decode(x: np.ndarray, layout: Layout) -> list[np.ndarray]:
    """The boolean decision vector → index matrices ``[F_l, T]``."""
    x = np.asarray(x).astype(bool).reshape(-1)
    if x.size != layout.n_var:
        raise MTPruneInputError(f"decision vector has {x.size} entries, the layout needs {layout.n_var}")
    return [x[o:o + layout.num_tasks * w].reshape(layout.num_tasks, w).T.copy()
            for o, w in zip(layout.offsets, layout.widths, strict=True)]


def to_keep_sets(matrices: Sequence[np.ndarray], layout: Layout) -> dict[str, list[list[int]]]:
    """Per task, per layer, the sorted slot indices it keeps."""
    return {t: [np.flatnonzero(m[:, i]).tolist() for m in matrices] for i, t in enumerate(layout.tasks)}


def from_keep_sets(keep: Mapping[str, Sequence[Sequence[int]]], layout: Layout) -> list[np.ndarray]:
    """Keep sets (as from :func:`to_keep_sets`) → index matrices."""
    missing = [t for t in layout.tasks if t not in keep]
    if missing:
        raise MTPruneInputError(f"keep sets lack task(s) {missing}")
    mats = [np.zeros((w, layout.num_tasks), dtype=bool) for w in layout.widths]
    for i, t in enumerate(layout.tasks):
        if len(keep[t]) != layout.depth:
            raise MTPruneInputError(f"task {t!r}: {len(keep[t])} keep sets for {layout.depth} layers")
        for k, idx in enumerate(keep[t]):
            idx = np.asarray(list(idx), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= layout.widths[k]):
                raise MTPruneInputError(f"task {t!r}, {layout.layer_name(k)}: slot index outside "
                                        f"[0, {layout.widths[k]})")
            mats[k][idx, i] = True
    return mats


def patterns(matrix: np.ndarray) -> np.ndarray:
    """Per slot, its task set as a bitmask (bit t: task t uses the slot); 0 for a pruned slot."""
    m = np.asarray(matrix).astype(np.int64)
    return m @ (np.int64(1) << np.arange(m.shape[1], dtype=np.int64))


def pattern_names(pattern: int, tasks: Sequence[str]) -> list[str]:
    """The task names of a bitmask, in task order."""
    return [t for i, t in enumerate(tasks) if pattern >> i & 1]


def keep_counts(layout: Layout, rate: float | Sequence[float] | None) -> list[int] | None:
    """A pre-specified pruning rate per layer → how many filters each task keeps there (at least 1)."""
    if rate is None:
        return None
    rates = [float(rate)] * layout.depth if np.isscalar(rate) else [float(r) for r in rate]
    if len(rates) != layout.depth:
        raise MTPruneInputError(f"{len(rates)} pruning rates for {layout.depth} hidden layers")
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise MTPruneInputError(f"pruning rates must be in [0, 1), got {rates}")
    return [max(1, int(round((1.0 - r) * w))) for r, w in zip(rates, layout.widths, strict=True)]


def validity_problems(x: np.ndarray, layout: Layout, counts: Sequence[int] | None = None) -> list[str]:
    """Why a decision vector is not a valid genotype: a task with no filter at a layer, or (with ``counts``)
    a task keeping another number of filters than its pre-specified rate gives. Empty when valid."""
    x = np.asarray(x).astype(bool)
    out = []
    for k in range(layout.depth):
        for i, t in enumerate(layout.tasks):
            n = int(x[layout.block(k, i)].sum())
            if n == 0:
                out.append(f"task {t!r} keeps no filter at {layout.layer_name(k)}")
            elif counts is not None and n != counts[k]:
                out.append(f"task {t!r} keeps {n} filters at {layout.layer_name(k)}, the rate asks for {counts[k]}")
    return out


@dataclass
class Settled:
    """The slots that survive the wiring rule.

    ``patterns[l]``: task set of each slot (0: pruned or dropped). ``users[l]``: the tasks whose outputs
    depend on the slot (a subset of its pattern; 0 for dropped slots). ``dropped[l]``: slots dropped by
    :func:`settle`. ``starved``: (layer, task) pairs left without any slot: the network is not buildable.
    """

    patterns: list[np.ndarray]
    users: list[np.ndarray]
    dropped: list[int]
    starved: list[tuple[int, int]]

    @property
    def feasible(self) -> bool:
        return not self.starved

    def matrices(self, num_tasks: int) -> list[np.ndarray]:
        """The settled index matrices ``[F_l, T]``."""
        bits = np.int64(1) << np.arange(num_tasks, dtype=np.int64)
        return [(p[:, None] & bits[None, :]) > 0 for p in self.patterns]


def reads(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """``[F_cur, F_prev]``: slot f (pattern ``cur[f]``) reads slot g (``prev[g]``) when ``prev[g] ⊇ cur[f]``."""
    return ((prev[None, :] & cur[:, None]) == cur[:, None]) & (prev[None, :] > 0) & (cur[:, None] > 0)


def settle(matrices: Sequence[np.ndarray]) -> Settled:
    """Apply the wiring rule: forward, drop slots with nothing to read; backward, drop slots nothing reads.

    A task left without any slot at a layer is *starved* (reported, not repaired).
    """
    pats = [patterns(m).copy() for m in matrices]
    num_tasks = np.asarray(matrices[0]).shape[1]
    depth = len(pats)
    dropped = [0] * depth
    for k in range(1, depth):
        fed = reads(pats[k - 1], pats[k]).any(axis=1)
        gone = (pats[k] > 0) & ~fed
        dropped[k] += int(gone.sum())
        pats[k][gone] = 0
    users: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * depth
    users[-1] = pats[-1].copy()  # the last hidden layer is read by the heads of its tasks
    for k in range(depth - 2, -1, -1):
        r = reads(pats[k], pats[k + 1])  # [F_{k+1}, F_k]
        u = np.bitwise_or.reduce(np.where(r, users[k + 1][:, None], 0), axis=0)
        gone = (pats[k] > 0) & (u == 0)
        dropped[k] += int(gone.sum())
        pats[k][gone] = 0
        users[k] = np.where(pats[k] > 0, u, 0).astype(np.int64)
    starved = [(k, t) for k in range(depth) for t in range(num_tasks) if not (pats[k] >> t & 1).any()]
    return Settled(pats, users, dropped, starved)
