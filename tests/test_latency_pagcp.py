"""PAGCP to a latency target (pruning/pagcp/latency.py; Ye et al., TPAMI 2023, with HALP's latency table, Shen et
al., NeurIPS 2022). The latency table is an injected function of the widths: no timing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtprune
from mtprune.pruning.cost import CostModel, LayerShape
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.latency import LatencyModel
from mtprune.pruning.pagcp.latency import LatencyCost
from mtprune.pruning.prune import count

LOSSES = {"seg": lambda p, t: F.cross_entropy(p, t), "depth": lambda p, t: (p - t).abs().mean()}


def zoo_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mtprune.build_model("deeplab_resnet18", {"seg": 5, "depth": 1}, width=0.125, head_kwargs={"hidden": 16})


def zoo_batches(n: int = 2, seed: int = 1) -> list[tuple[Tensor, dict[str, Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 32, 40, generator=gen),
             {"seg": torch.randint(0, 5, (2, 4, 5), generator=gen),
              "depth": torch.rand(2, 1, 4, 5, generator=gen) + 0.1}) for _ in range(n)]


def table(layer: LayerShape, cin: int, cout: int) -> float:
    """A memory-bound device: a layer costs its output activations (times its kernel), whatever its input width,
    so a latency target is not a MACs target."""
    return 1e-6 * math.prod(layer.out_shape) / layer.cout * cout * math.prod(layer.kernel or (1,))


def table_ms(model: nn.Module, x: Tensor) -> float:
    """The table's latency of ``model`` as it is now, costed afresh from its own layers."""
    return LatencyModel(CostModel(model, x, None), table).dense_ms


def test_latency_cost_predicts_the_pruned_models_table_latency() -> None:
    model, x = zoo_model(), zoo_batches(1)[0][0][:1]
    graph = PruningGraph(model, x, min_channels=1)
    cost = LatencyCost(model, x, graph, {"table": table})
    assert cost.total == pytest.approx(table_ms(model, x), rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    plan = {g.index: torch.randperm(g.channels, generator=gen)[:g.channels // 2].tolist()
            for g in graph.groups if g.index % 3 == 1}
    predicted = cost.after(graph.groups, plan)
    assert cost.saved(graph.groups, plan) == pytest.approx(cost.total - predicted)
    macs = cost.macs(plan)
    graph.prune(plan)
    assert table_ms(model, x) == pytest.approx(predicted, rel=1e-9)
    assert count(model, x)[1] == macs


def test_pagcp_reaches_a_latency_target_through_mtprune_prune() -> None:
    model, batches = zoo_model(), zoo_batches()
    x = batches[0][0]
    dense = table_ms(model, x[:1])
    settings = {"budget": 1.5, "rounds": 4, "held_out_batches": 2}
    report = mtprune.prune(model, x, "l1", allocator="pagcp", target_latency=0.5, latency={"table": table},
                           data=batches, losses=LOSSES, pagcp=settings)
    after = table_ms(model, x[:1])
    info, lat = report.extra["pagcp"], report.extra["latency"]
    assert info["reached"] is True and lat == info["latency"]
    assert lat["dense_ms"] == pytest.approx(dense, rel=1e-12) and lat["goal_ms"] == pytest.approx(0.5 * dense)
    assert lat["predicted_ms"] == pytest.approx(after, rel=1e-9)  # the prediction is the pruned model's latency
    # within the round's tolerance (2 %) of the target: the last round is fitted channel by channel
    assert abs(after / dense - 0.5) <= 0.02 * 0.5
    last = info["rounds"][-1]
    assert last["latency_after_ms"] == pytest.approx(after, rel=1e-9) and last["macs_estimated"] == last["macs_after"]
    assert report.macs_ratio < 0.4  # allocated by the table, not by MACs
    out = model(x)
    assert out["seg"].shape == (2, 5, 4, 5) and out["depth"].shape == (2, 1, 4, 5)
    assert "predicted latency" in mtprune.pruning.pagcp.pagcp_markdown(info)
