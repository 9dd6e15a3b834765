"""Attention heads through the latency allocator and the schedules' rebuild (pruning/attention.py with
allocate.plan_for_cost and schedule.rebuild_from_widths).

A tiny timm ViT, no pretrained weights; latency tables are injected functions of the widths (no timing).
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtprune
from mtprune.pruning.allocate import plan_for_cost
from mtprune.pruning.attention import head_layout, snap_to_heads
from mtprune.pruning.cost import CostModel, LayerShape
from mtprune.pruning.criteria import get_criterion
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.latency import LatencyModel
from mtprune.pruning.prune import criterion_scores
from mtprune.pruning.schedule import _record, rebuild_from_widths
from mtprune.tasks.classification import ClassificationTask

timm = pytest.importorskip("timm")

X = torch.zeros(1, 3, 32, 32)


class TwoTasks(nn.Module):
    def __init__(self, trunk: nn.Module, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict({"a": nn.Linear(dim, 3), "b": nn.Linear(dim, 2)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        return {k: h(f) for k, h in self.heads.items()}


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    trunk = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                             num_heads=4, num_classes=0)
    return TwoTasks(trunk, 64).eval()


def table(layer: LayerShape, cin: int, cout: int) -> float:
    """Proportional to the layer's MACs at these widths; attention products ("depthwise") 3× dearer."""
    keep = cout / layer.cout * (1.0 if layer.kind == "depthwise" else cin / layer.cin)
    return 1e-6 * layer.macs * keep * (3.0 if layer.kind == "depthwise" else 1.0)


def table_ms(model: nn.Module) -> float:
    """The table's latency of ``model`` as it is now, costed afresh from its own layers."""
    return LatencyModel(CostModel(model, X, None), table).dense_ms


def test_latency_plan_removes_whole_heads_or_equal_channels_and_predicts_the_pruned_cost() -> None:
    model = vit()
    graph = PruningGraph(model, X, min_channels=1)
    scores = criterion_scores(model, graph, get_criterion("l1"))
    cost = CostModel(model, X, graph)
    lat = LatencyModel(cost, table)
    tracker = cost.tracker(lat.layer_cost)
    plan = plan_for_cost(graph.groups, scores, tracker, 0.5 * lat.dense_ms, min_channels=2)
    attention = [g for g in graph.groups if g.heads is not None]
    assert attention and any(g.index in plan for g in attention)
    for g in attention:  # already head-consistent: PruningGraph.prune has nothing to snap
        assert snap_to_heads(g.heads, plan.get(g.index, []), 1) == plan.get(g.index, [])
    predicted = lat.predict(plan)
    assert tracker.value == pytest.approx(predicted, rel=1e-9)
    graph.prune(plan)
    assert table_ms(model) == pytest.approx(predicted, rel=1e-9)
    assert head_layout(model) != head_layout(vit())


def test_prune_to_a_latency_target_on_a_vit_predicts_the_pruned_latency() -> None:
    model = vit()
    dense = table_ms(model)
    report = mtprune.prune(model, X, "l1", target_latency=0.5, latency={"table": table}, min_channels=2)
    after = table_ms(model)
    assert report.extra["latency"]["predicted_ms"] == pytest.approx(after, rel=1e-9)
    assert 0.5 * (1 - 0.005) - 1e-9 <= after / dense <= 0.5 + 1e-9
    assert head_layout(model) != head_layout(vit())


def test_rebuild_from_a_schedule_record_keeps_the_head_layouts() -> None:
    model = vit()
    graph = PruningGraph(model, X)
    attn = [g for g in graph.groups if g.heads is not None and g.heads.kind == "qkv"]
    # block 0 keeps 3 heads of 16, block 1 keeps 4 heads of 12: both 48 wide, only the layouts tell them apart
    plan = {attn[0].index: list(range(48, 64)), attn[1].index: [h * 16 + d for h in range(4) for d in range(12, 16)]}
    graph.prune(plan)
    layout = head_layout(model)
    assert sorted(map(tuple, layout.values())) == [(3, 16), (4, 12)]
    val = [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), {"a": torch.tensor(i % 3)})
           for i in range(2)]
    record = _record(1, model, X, graph.widths(), val, {"a": ClassificationTask("a", 3)}, "cpu", 2)
    assert record.heads == layout and asdict(record)["heads"] == layout  # kept in the schedule's history
    fresh = rebuild_from_widths(vit, X, record.widths, seed=1, heads=record.heads)
    assert head_layout(fresh) == layout
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    blind = rebuild_from_widths(vit, X, record.widths, seed=1)  # widths alone: the last heads go in both blocks
    assert head_layout(blind) != layout
    fresh(torch.randn(2, 3, 32, 32))["a"].sum().backward()


def test_pagcp_to_a_latency_target_on_a_vit_predicts_the_pruned_latency() -> None:
    """PAGCP's trials and its fitted last round remove whole heads or as many channels from every head, so its
    predicted latency is the pruned model's."""
    model = vit()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 32, 32, generator=gen),
                {"a": torch.randint(0, 3, (2,), generator=gen), "b": torch.randn(2, 2, generator=gen)})
               for _ in range(2)]
    losses = {"a": lambda p, t: F.cross_entropy(p, t), "b": lambda p, t: F.mse_loss(p, t) + 1.0}
    dense = table_ms(model)
    report = mtprune.prune(model, X, "l1", allocator="pagcp", target_latency=0.7, latency={"table": table},
                           data=batches, losses=losses, min_channels=2,
                           pagcp={"budget": 2.0, "rounds": 3, "held_out_batches": 2, "top_p": 1.0})
    after = table_ms(model)
    assert report.extra["pagcp"]["reached"] is True and abs(after / dense - 0.7) <= 0.02 * 0.7
    assert report.extra["latency"]["predicted_ms"] == pytest.approx(after, rel=1e-9)
    removed: dict[str, int] = {}
    for r in report.extra["pagcp"]["rounds"]:
        for root, n in r["removed"].items():
            removed[root] = removed.get(root, 0) + n
    layout = head_layout(model)
    assert layout != head_layout(vit())
    for name, (heads, dim) in layout.items():  # the recorded removals are the ones applied
        assert removed.get(f"{name}.qkv", 0) == 64 - heads * dim
