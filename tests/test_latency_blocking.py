"""Hardware widths at MACs targets: channel blocks detected in latency sweeps (``round_to="measured"``,
pruning/blocking.py) and HALP's ranking stopped at equal MACs (``rank_by="latency"``).

Deterministic: every latency here comes from an injected table (a function of the layer and its widths), no timing.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import mtprune
from helpers import nyu_batches, zoo_model
from mtprune.config import PruneSection
from mtprune.pruning.allocate import plan_near_ties, plan_removal
from mtprune.pruning.blocking import detect_block, measured_round_to, sweep_widths, table_sweep
from mtprune.pruning.cost import CostModel, LayerShape
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.latency import LatencyModel
from mtprune.tasks import preset
from mtprune.utils.errors import MTPruneInputError
from test_latency import X, depthwise_kept, mobilenet, table_ms, work_table

BLOCK = {"conv": 16, "depthwise": 8}  # the fake device: dense convs in blocks of 16, depthwise in 8, 1×1 unblocked


def _up(c: int, b: int) -> int:
    return -(-c // b) * b


def stair_table(layer: LayerShape, cin: int, cout: int) -> float:
    """MACs-proportional work at widths padded to the fake device's block of the layer's kind."""
    b = BLOCK.get(layer.kind, 1)
    spatial = math.prod(layer.out_shape) / layer.cout
    per_out = math.prod(layer.kernel or (1,)) * (1 if layer.kind == "depthwise" else _up(cin, b) / layer.groups)
    return 1e-6 * spatial * _up(cout, b) * per_out + 1e-4


@pytest.mark.parametrize("block", [4, 8, 16, 32])
def test_detect_block_finds_the_staircase_period_despite_noise(block: int) -> None:
    rng = random.Random(block)
    widths = sweep_widths(256, 32)
    assert widths == list(range(33, 129))
    ms = [(1 + 0.02 * _up(w, block)) * (1 + 0.03 * abs(rng.gauss(0, 1))) for w in widths]
    assert detect_block(widths, ms) == block


def test_detect_block_finds_nothing_in_a_smooth_or_flat_sweep() -> None:
    rng = random.Random(0)
    widths = list(range(33, 129))
    assert detect_block(widths, [(1 + 0.02 * w) * (1 + 0.03 * abs(rng.gauss(0, 1))) for w in widths]) == 1
    assert detect_block(widths, [1.0] * len(widths)) == 1  # no steps at all
    assert detect_block(range(1, 17), [_up(w, 16) for w in range(1, 17)]) == 1  # too short to see a 16
    with pytest.raises(MTPruneInputError, match="contiguous"):
        detect_block([1, 2, 4], [1.0, 1.0, 1.0])


def test_measured_round_to_reads_each_kinds_block_off_the_table() -> None:
    model = mobilenet()
    cost = CostModel(model, X, PruningGraph(model, X, record_layers=True))
    assert measured_round_to(cost, table_sweep(stair_table)) == {"default": 1, "conv": 16, "depthwise": 8,
                                                                "pointwise": 1}
    assert measured_round_to(cost, table_sweep(work_table())) == {"default": 1, "conv": 1, "depthwise": 1,
                                                                 "pointwise": 1}


def test_prune_with_measured_round_to_keeps_widths_on_the_blocks() -> None:
    model = mobilenet()
    before = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    report = mtprune.prune(model, X, "l1", target_macs=0.4, round_to="measured", latency={"table": stair_table},
                           min_channels=2)
    assert report.extra["round_to"] == {"default": 1, "conv": 16, "depthwise": 8, "pointwise": 1}
    dw = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert any(a < b for a, b in zip(dw, before, strict=True))
    assert all(a % 8 == 0 or a == b for a, b in zip(dw, before, strict=True))
    assert report.macs_ratio == pytest.approx(0.4, abs=0.02)


def test_rank_by_latency_runs_faster_at_equal_macs() -> None:
    """At the same MACs target, on a table where depthwise convolutions cost 40× their MACs, reordering the
    ranking's near-ties by latency per MAC takes more depthwise channels and runs faster on the table."""
    table = work_table("depthwise", 40.0)
    by_importance, by_latency = mobilenet(), mobilenet()
    plain = mtprune.prune(by_importance, X, "l1", target_macs=0.5, min_channels=2)
    fast = mtprune.prune(by_latency, X, "l1", target_macs=0.5, min_channels=2, rank_by="latency",
                         latency={"table": table})
    assert plain.macs_ratio == pytest.approx(0.5, abs=0.005)
    assert fast.macs_ratio == pytest.approx(0.5, abs=0.005)  # equal MACs ...
    dense = table_ms(mobilenet(), table)
    assert table_ms(by_latency, table) < 0.95 * table_ms(by_importance, table)  # ... and faster on the table
    assert fast.extra["latency"]["predicted_ms"] == pytest.approx(table_ms(by_latency, table), rel=1e-6)
    assert fast.extra["latency"]["predicted_ratio"] == pytest.approx(table_ms(by_latency, table) / dense, rel=1e-6)
    assert depthwise_kept(by_latency) < depthwise_kept(by_importance)
    lat = fast.extra["latency"]
    assert lat["predicted_ratio"] < lat["predicted_ratio_by_importance"]
    assert lat["predicted_ratio_by_importance"] == pytest.approx(table_ms(by_importance, table) / dense, rel=1e-6)


def test_near_ties_keep_the_ranking_outside_the_band() -> None:
    """``plan_near_ties`` removes every channel ranked below n(1 - band), keeps every one ranked at or above
    n(1 + band), and lands on the MACs of the ranking's plan."""
    model = mobilenet()
    graph = PruningGraph(model, X, min_channels=1, record_layers=True)
    cost = CostModel(model, X, graph)
    scores = {g.index: torch.rand(g.channels, generator=torch.Generator().manual_seed(g.index))
              for g in graph.groups}
    ranked = plan_removal(graph.groups, scores, 0.4, min_channels=2)
    goal = cost.macs(ranked) - cost.other_macs
    lat = CostModel(model, X, graph).tracker(LatencyModel(cost, work_table("depthwise", 40.0)).layer_cost)
    plan = plan_near_ties(graph.groups, scores, ranked, lat, cost.tracker(cost.layer_macs), goal, band=0.25,
                          min_channels=2)
    flat = torch.cat([scores[g.index] for g in graph.groups])
    rank = torch.empty(len(flat), dtype=torch.long)
    rank[torch.argsort(flat, stable=True)] = torch.arange(len(flat))
    offsets = dict(zip([g.index for g in graph.groups],
                       torch.cumsum(torch.tensor([0] + [g.channels for g in graph.groups]), 0).tolist(), strict=False))
    n = sum(len(v) for v in ranked.values())
    gone = {(gi, c) for gi, idxs in plan.items() for c in idxs}
    for g in graph.groups:
        for c in range(g.channels):
            r = int(rank[offsets[g.index] + c])
            if r < math.floor(0.75 * n) and g.channels - 2 >= sum(1 for c2 in range(g.channels)
                                                                  if rank[offsets[g.index] + c2] < r):
                assert (g.index, c) in gone
            if r >= math.ceil(1.25 * n):
                assert (g.index, c) not in gone
    assert cost.macs(plan) == pytest.approx(cost.macs(ranked), rel=0.006)
    assert lat.value < LatencyModel(cost, work_table("depthwise", 40.0)).predict(ranked)


def test_gradient_criterion_with_measured_blocks_and_rank_by_latency() -> None:
    model = zoo_model()
    report = mtprune.prune(model, X, "taylor", target_macs=0.5, round_to="measured", rank_by="latency",
                           latency={"table": stair_table}, data=nyu_batches(1), losses=preset("nyuv2", num_classes=5),
                           batches=1, min_channels=2)
    assert report.macs_ratio == pytest.approx(0.5, abs=0.03)  # blocks of 16 on 8-32 channel layers: coarse steps
    assert report.extra["round_to"]["conv"] == 16
    lat = report.extra["latency"]
    assert lat["predicted_ratio"] <= lat["predicted_ratio_by_importance"]
    dense = dict(zoo_model().named_modules())
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert any(m.out_channels < dense[n].out_channels for n, m in convs.items())
    assert all(m.out_channels % 16 == 0 or m.out_channels == dense[n].out_channels for n, m in convs.items())


@pytest.mark.parametrize("kw, message", [
    ({"target_macs": 0.5, "rank_by": "speed"}, "rank_by must be"),
    ({"target_params": 0.5, "rank_by": "latency"}, "needs target_macs"),
    ({"target_macs": 0.5, "rank_by": "latency", "allocator": "layer"}, "allocator='global'"),
    ({"target_macs": 0.5, "round_to": "fast"}, "round_to must be"),
])
def test_bad_hardware_options_are_refused_and_model_untouched(kw, message) -> None:
    model = mobilenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MTPruneInputError, match=message):
        mtprune.prune(model, X, "l1", latency={"table": work_table()}, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_config_takes_measured_round_to_and_rank_by() -> None:
    p = PruneSection(target_macs=0.5, round_to="measured", rank_by="latency", latency={"threads": 2})
    assert p.round_to == "measured" and p.rank_by == "latency"
    assert PruneSection(target_macs=0.5).rank_by == "importance"
    # left out of dumps at its default: suites fingerprint whole dumped configs made before the option existed
    assert "rank_by" not in PruneSection(target_macs=0.5).model_dump(mode="json")
    assert p.model_dump(mode="json")["rank_by"] == "latency"
    with pytest.raises(ValueError, match="rank_by 'latency' needs target_macs"):
        PruneSection(target_latency=0.5, rank_by="latency")
