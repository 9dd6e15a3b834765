"""PAM's neuron grouping (He et al., KDD 2021, §3.3–3.4): irrelevant sets, then partitions D, E_t and C.

For one layer, the neurons of all T networks are pooled as candidates. For each task t the set R_t of neurons
irrelevant to t grows greedily: add the neuron j that minimises ``I(Y_t; X_{R_t ∪ {j}})`` while that minimum
stays at or below α. Then

- ``D = ∩_t R_t``: irrelevant to every task, dropped;
- ``E_t = (∩_{s≠t} R_s) − D``: relevant to task t only, exclusive to it;
- ``C`` = the rest: shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtprune.utils.errors import MTPruneInputError

from .mutual_info import LabelMasks, mi_from_distances, pairwise_sq_dists

__all__ = ["Partition", "irrelevant_set", "partition"]

_CHUNK_ELEMENTS = 1 << 24  # candidate distance matrices [B, N, N] built at once


@dataclass
class Partition:
    """The neurons of one layer (indices into the concatenation of the T networks' neurons)."""

    dropped: list[int]  # D
    exclusive: dict[str, list[int]]  # E_t
    shared: list[int]  # C
    irrelevant: dict[str, list[int]] = field(default_factory=dict)  # R_t, in the order the greedy added them

    def to_dict(self) -> dict[str, object]:
        return {"D": self.dropped, "E": self.exclusive, "C": self.shared, "R": self.irrelevant}


def irrelevant_set(acts: Tensor | None, labels: LabelMasks, alpha: float, noise_var: float = 0.1, *,
                   dists: Tensor | None = None) -> list[int]:
    """Greedy R_t of PAM: neuron indices of ``acts`` ``[N, n]`` that together say at most ``alpha`` nats about
    the labels, in the order they were added. ``dists`` (``[n, N, N]``, e.g. of unpooled maps, see
    ``relevance.neuron_distances``) replaces the distances computed from ``acts``."""
    if dists is None:
        if acts is None or acts.dim() != 2:
            shape = None if acts is None else tuple(acts.shape)
            raise MTPruneInputError(f"activations must be [N, n], got shape {shape}")
        x = acts.detach()
        per_neuron = pairwise_sq_dists(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    else:
        per_neuron = dists.detach()
    base = per_neuron.new_zeros(per_neuron.shape[1:])
    # a neuron constant on the batch (e.g. dead after ReLU) adds no distance, so I(Y; X_R) does not change:
    # with α >= 0 the greedy would take every one of them first (I(Y; ∅) = 0); take them in one step
    constant = (per_neuron == 0).flatten(1).all(1)
    chosen = constant.nonzero().flatten().tolist() if alpha >= 0 else []
    remaining = [j for j in range(per_neuron.shape[0]) if alpha < 0 or not bool(constant[j])]
    n = per_neuron.shape[1]
    step = max(1, _CHUNK_ELEMENTS // (n * n))
    while remaining:
        mi = torch.cat([
            mi_from_distances(base[None] + per_neuron[torch.tensor(remaining[i:i + step], device=base.device)],
                              labels, noise_var)
            for i in range(0, len(remaining), step)
        ])
        k = int(torch.argmin(mi))
        if float(mi[k]) > alpha:
            break
        j = remaining.pop(k)
        chosen.append(j)
        base = base + per_neuron[j]
    return chosen


def partition(irrelevant: Mapping[str, Sequence[int]], num_neurons: int) -> Partition:
    """D, E_t and C from the irrelevant sets R_t (needs at least two tasks)."""
    if len(irrelevant) < 2:
        raise MTPruneInputError(f"PAM needs at least two tasks, got {list(irrelevant)}")
    r = {t: set(v) for t, v in irrelevant.items()}
    for t, s in r.items():
        bad = [i for i in s if not 0 <= i < num_neurons]
        if bad:
            raise MTPruneInputError(f"irrelevant set of {t!r} names neurons {bad[:5]} outside [0, {num_neurons})")
    dropped = set.intersection(*r.values())
    exclusive = {t: sorted(set.intersection(*(r[s] for s in r if s != t)) - dropped) for t in r}
    taken = dropped.union(*map(set, exclusive.values()))
    shared = [i for i in range(num_neurons) if i not in taken]
    return Partition(sorted(dropped), exclusive, shared, {t: list(v) for t, v in irrelevant.items()})
