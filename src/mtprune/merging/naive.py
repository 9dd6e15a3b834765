"""Naive merging, the baseline of PAM's comparison (He et al., KDD 2021): the hand-built hard-sharing network.

The first ``split`` hidden layers form one shared trunk (the width of one network); every task then has its
own copy of the remaining layers. It is expressed with PAM's own wiring (C = the trunk, E_t = task t's
branch), so it serves task subsets and is profiled and pruned exactly like the PAM network.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from mtprune.models.layers import init_weights
from mtprune.utils.errors import MTPruneInputError

from .chain import Chain, check_same_architecture, read_chain
from .grouping import Partition
from .merged_net import MergedNet, build_merged

__all__ = ["naive_merge", "naive_partitions"]


def naive_partitions(chains: Mapping[str, Chain], split: int) -> list[Partition]:
    """Trunk = the first network's neurons of hidden layers ``< split``; beyond it, each network's own neurons."""
    tasks = list(chains)
    depth = len(chains[tasks[0]].hidden)
    if not 1 <= split <= depth:
        raise MTPruneInputError(f"naive merging shares 1..{depth} hidden layers, got split={split}")
    parts = []
    for k in range(depth):
        widths = [chains[t].stages[k].width for t in tasks]
        offsets = [sum(widths[:i]) for i in range(len(tasks))]
        if k < split:
            parts.append(Partition(list(range(widths[0], sum(widths))), {t: [] for t in tasks},
                                   list(range(widths[0]))))
        else:
            excl = {t: list(range(offsets[i], offsets[i] + widths[i])) for i, t in enumerate(tasks)}
            parts.append(Partition([], excl, []))
    return parts


def naive_merge(models: Mapping[str, nn.Module], example: Tensor, split: int, *, fresh: bool = True) -> MergedNet:
    """The naive multi-task network of ``models``' architecture, shared up to hidden layer ``split``.

    ``fresh`` (default) re-initialises every weight, as when the network is built by hand and trained jointly;
    otherwise the trunk keeps the first network's weights and branch t keeps network t's (its first branch layer
    then reads the trunk through zero weights for t ≠ first, and must be retrained).
    """
    chains = {t: read_chain(t, m, example) for t, m in models.items()}
    check_same_architecture(chains)
    net = build_merged(chains, naive_partitions(chains, split))
    if fresh:
        init_weights(net)
    return net
