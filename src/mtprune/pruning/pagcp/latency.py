"""PAGCP to a latency target: its rounds cost trials with a latency model instead of MACs.

Ye et al. (TPAMI 2023) order layers, fit the last round and stop by MACs (:class:`~.macs.MacsModel`). Any
cost with the same interface works: :class:`LatencyCost` predicts the latency (ms) of a pruned configuration
from the per-layer latency table of ``pruning/latency.py`` (HALP's lookup table, Shen et al., NeurIPS 2022),
so PAGCP's layer order, the MACs saved per loss increase of its ranking and ``fit_to_target`` become
milliseconds saved. One is built per round, on the model physically pruned so far.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..cost import CostModel
from ..graph import ChannelGroup, PruningGraph
from ..latency import LatencyModel, LatencySetting, latency_model


class LatencyCost:
    """Predicted latency (ms) of ``model`` once a plan on ``graph.groups`` is applied: ``after``, ``saved`` and
    ``total`` (the dense prediction), as :class:`~.macs.MacsModel` gives MACs."""

    def __init__(self, model: nn.Module, example_inputs: Any, graph: PruningGraph,
                 setting: LatencySetting | Mapping[str, Any] | None = None) -> None:
        self.cost = CostModel(model, example_inputs, graph)
        self.latency: LatencyModel = latency_model(model, example_inputs, self.cost, setting)
        self.total = self.latency.dense_ms

    def after(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> float:
        """Predicted latency (ms) once ``plan`` (group index → channels to remove) is applied. ``groups`` must be
        the groups of the graph this was built with (the interface of ``MacsModel.after``)."""
        return self.latency.predict({gi: list(idxs) for gi, idxs in plan.items()})

    def saved(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> float:
        return self.total - self.after(groups, plan)

    def macs(self, plan: Mapping[int, Iterable[int]]) -> int:
        """Per-sample MACs once ``plan`` is applied (``CostModel.macs``), for the round's record."""
        return self.cost.macs({gi: list(idxs) for gi, idxs in plan.items()})
