"""The cost model (pruning/cost.py): MACs and parameters of a pruned configuration from widths alone equal what is
counted on the model after the channels are physically removed, on every wiring pattern of the conformance models
(concat, residual, ASPP sums, flatten into Linear, depthwise) and two zoo models."""

from __future__ import annotations

import pytest
import torch

import mtprune
from helpers import zoo_model
from mtprune.pruning.cost import CostModel
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.prune import count
from test_graph_conformance import CASES, make, random_plan


def _exact(model, x, seed: int = 0) -> None:
    graph = PruningGraph(model, x)
    cost = CostModel(model, x, graph)
    assert (cost.params_total, cost.macs_total) == count(model, x)
    plan = random_plan(graph, 0.3, seed)
    predicted = cost.params(plan), cost.macs(plan)
    tracker = cost.tracker(cost.layer_macs)
    for gi, idxs in plan.items():
        tracker.apply(gi, idxs)
    graph.prune(plan)
    assert predicted == count(model, x)  # exactly, not within a tolerance
    assert tracker.value == pytest.approx(predicted[1], rel=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_analytic_counts_equal_counted_after_pruning(case: str) -> None:
    model, x, _ = make(case)
    _exact(model, x)


@pytest.mark.parametrize("name, head", [("deeplab_resnet18", "conv"), ("mobilenetv2", "deeplabv3_aspp")])
def test_analytic_counts_on_zoo_models(name: str, head: str) -> None:
    if name == "deeplab_resnet18":
        model = zoo_model()
    else:
        torch.manual_seed(0)
        model = mtprune.build_model(name, {"seg": 5, "depth": 1}, width=0.25, head=head,
                                    head_kwargs={"channels": 16, "rates": [2]})
    _exact(model, torch.zeros(1, 3, 32, 40), seed=3)


def test_prune_reaches_macs_target_without_copies(monkeypatch) -> None:
    """``prune`` costs every bisection trial from widths: no deep copy and a single trace before the surgery."""
    import copy

    copies = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(type(obj)) or real(obj, *a))
    model = zoo_model()
    x = torch.zeros(1, 3, 32, 40)
    report = mtprune.prune(model, x, "l1", target_macs=0.5, tolerance=0.005)
    assert not [c for c in copies if isinstance(c, type) and issubclass(c, torch.nn.Module)]
    assert abs(report.macs_ratio - 0.5) <= 0.005 * 0.5 + 1e-9
    assert (report.params_after, report.macs_after) == count(model, x)
