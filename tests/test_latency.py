"""Latency-aware pruning (pruning/latency.py, allocate.plan_for_cost; HALP, Shen et al., NeurIPS 2022).

Deterministic: the latency tables are injected functions of the layer and its widths (no timing), except the cache
test, which times a few tiny layers but asserts nothing about the times themselves.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import mtprune
from helpers import nyu_batches, zoo_model
from mtprune.pruning.cost import CostModel, LayerShape
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.latency import LatencySetting, LatencyTable, hardware_round_to, latency_model
from mtprune.tasks import preset
from mtprune.utils.errors import MTPruneInputError

X = torch.zeros(1, 3, 32, 40)


def mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return mtprune.build_model("mobilenetv2", {"seg": 5, "depth": 1}, width=0.5, head="deeplabv3_aspp",
                               head_kwargs={"channels": 16, "rates": [2]})


def work_table(expensive: str | None = None, factor: float = 1.0):
    """A table proportional to each layer's MACs at the given widths, ``factor`` times dearer for one layer kind."""
    def table(layer: LayerShape, cin: int, cout: int) -> float:
        spatial = math.prod(layer.out_shape) / layer.cout
        per_out = math.prod(layer.kernel or (1,)) * (1 if layer.kind == "depthwise" else cin / layer.groups)
        return 1e-6 * spatial * cout * per_out * (factor if layer.kind == expensive else 1.0)
    return table


def table_ms(model: torch.nn.Module, table) -> float:
    """The injected table's latency of ``model`` as it is now."""
    cost = CostModel(model, X, None)
    return sum(table(s, s.cin, s.cout) for s in cost.layers.values())


def depthwise_kept(model: torch.nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_allocator_hits_the_table_latency_target(target: float) -> None:
    table = work_table("depthwise", 10.0)
    model = mobilenet()
    dense = table_ms(model, table)
    report = mtprune.prune(model, X, "l1", target_latency=target, latency={"table": table}, min_channels=2)
    after = table_ms(model, table)  # the pruned model, costed afresh from its own layers
    lat = report.extra["latency"]
    assert lat["dense_predicted_ms"] == pytest.approx(dense, rel=1e-9)
    assert lat["predicted_ms"] == pytest.approx(after, rel=1e-6)  # prediction = the pruned model's table latency
    # reached from above, within prune's tolerance (0.5 %): blocks that would overshoot more wait for smaller ones
    assert target * (1 - 0.005) - 1e-9 <= after / dense <= target + 1e-9


def test_expensive_layer_kind_is_pruned_more_than_by_macs_allocation() -> None:
    """The same knapsack against MACs (a table proportional to MACs) and against a table where depthwise
    convolutions cost 40× their MACs: the latter takes depthwise channels, the former hardly any."""
    by_macs, by_latency = mobilenet(), mobilenet()
    macs = mtprune.prune(by_macs, X, "l1", target_latency=0.5, latency={"table": work_table()}, min_channels=2)
    mtprune.prune(by_latency, X, "l1", target_latency=0.5, latency={"table": work_table("depthwise", 40.0)},
                  min_channels=2)
    assert macs.macs_ratio == pytest.approx(0.5, abs=0.01)  # a table proportional to MACs: a MACs target
    dense = depthwise_kept(mobilenet())
    assert depthwise_kept(by_latency) < 0.8 * dense
    assert depthwise_kept(by_latency) < 0.8 * depthwise_kept(by_macs)


def test_neutral_table_and_layer_allocator_and_milliseconds() -> None:
    table = work_table()
    model = mobilenet()
    dense = table_ms(model, table)
    report = mtprune.prune(model, X, "l1", target_latency_ms=0.4 * dense, allocator="layer",
                           latency={"table": table}, min_channels=2, tolerance=0.01)
    assert table_ms(model, table) == pytest.approx(0.4 * dense, rel=0.03)
    assert report.extra["latency"]["goal_ms"] == pytest.approx(0.4 * dense)


def test_part_ratios_are_fixed_and_the_rest_is_allocated_by_latency() -> None:
    table = work_table("depthwise", 10.0)
    model = mobilenet()
    graph = PruningGraph(model, X)
    seg = {g.root: g.channels for g in graph.groups if g.part == "seg"}
    dense = table_ms(model, table)
    report = mtprune.prune(model, X, "l1", target_latency=0.5, latency={"table": table}, min_channels=2,
                           part_ratios={"seg": 0.5}, graph=graph)
    after = report.widths_after
    removed = sum(w - after[r] for r, w in seg.items())
    assert seg and removed == round(0.5 * sum(seg.values()))  # exactly the part's ratio, whatever the latency
    assert 0.49 <= table_ms(model, table) / dense <= 0.5 + 1e-9


def test_round_to_per_layer_kind() -> None:
    model = mobilenet()
    report = mtprune.prune(model, X, "l1", target_latency=0.5, latency={"table": work_table("depthwise", 40.0)},
                           round_to={"depthwise": 8}, min_channels=2)
    dw = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    before = [m.out_channels for m in mobilenet().modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert any(a < b for a, b in zip(dw, before, strict=True))
    assert all(a % 8 == 0 or a == b for a, b in zip(dw, before, strict=True))
    assert report.extra["latency"]["predicted_ratio"] <= 0.5 + 1e-9
    assert set(hardware_round_to(LatencySetting())) == {"depthwise", "pointwise"}


def test_gradient_criterion_with_latency_target() -> None:
    model = zoo_model()
    tasks = preset("nyuv2", num_classes=5)
    table = work_table("pointwise", 5.0)
    dense = table_ms(model, table)
    mtprune.prune(model, X, "taylor", target_latency=0.6, latency={"table": table}, data=nyu_batches(1),
                  losses=tasks, batches=1)
    assert 0.59 <= table_ms(model, table) / dense <= 0.6 + 1e-9


@pytest.mark.parametrize("kw, message", [
    ({"target_latency": 1.5}, "target_latency must be in"),
    ({"target_latency_ms": -2.0}, "target_latency_ms must be a positive"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "give exactly one of"),
    ({"target_latency": 0.5, "latency": {"device": "tpu"}}, "latency device"),
    ({"target_latency": 0.5, "latency": {"devise": "cpu"}}, "unknown keys"),
    ({"target_latency": 0.5, "latency": {"dtype": "int8"}}, "latency dtype"),
    ({"target_latency": 0.5, "round_to": {"depthwise": 0}}, "round_to"),
    ({"target_latency": 0.5, "round_to": "fast"}, "round_to"),
])
def test_bad_latency_input_is_refused_and_model_untouched(kw, message) -> None:
    model = mobilenet()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    kw.setdefault("latency", {"table": work_table()})
    with pytest.raises(MTPruneInputError, match=message):
        mtprune.prune(model, X, "l1", **kw)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_measured_table_is_cached_per_setting(tmp_path) -> None:
    """A real (timed) table on tiny layers: written atomically once, then read back without timing."""
    torch.manual_seed(0)
    model = zoo_model()
    graph = PruningGraph(model, X)
    cost = CostModel(model, X, graph)
    setting = {"threads": 1, "grid": 2, "warmup": 0, "repeats": 1, "cache_dir": str(tmp_path)}
    lat = latency_model(model, X, cost, setting)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("cpu-1t-b1-float32-")
    cached = json.loads(files[0].read_text())
    assert cached["setting"]["threads"] == 1 and cached["entries"]
    signatures = {k for k in cached["entries"]}
    assert len(signatures) <= len(cost.layers)  # repeated layers share one entry
    for entry in cached["entries"].values():
        ms = entry["ms"]
        assert all(v > 0 for row in ms for v in row)
        assert all(a <= b for row in ms for a, b in zip(row, row[1:], strict=False))  # non-decreasing in width
    again = LatencyTable(LatencySetting.parse(setting))
    again.prepare(cost.layers.values())
    assert again.measured == 0  # everything came from the cache
    assert lat.dense_ms == pytest.approx(lat.measured_ms, rel=1e-6)  # calibrated to the measured dense model
    other = LatencyTable(LatencySetting.parse({**setting, "batch": 2}))
    assert other.path != again.path  # another setting, another file
