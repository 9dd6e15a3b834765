"""The measured feedback loop of latency targets (pruning/latency.close_the_loop): a table that mispredicts the
whole model is corrected by timing the pruned configuration. Deterministic: the table is injected, and the
"timing" is a fake measurement (a known function of the pruned model's table cost), so nothing is timed."""

from __future__ import annotations

import pytest
import torch

import mtprune
import mtprune.pruning.latency as latency_module
import mtprune.pruning.prune as prune_module
from mtprune.pruning.cost import CostModel, LayerShape
from mtprune.pruning.latency import close_the_loop
from mtprune.utils.errors import MTPruneInputError

X = torch.zeros(1, 3, 32, 40)


def table(layer: LayerShape, cin: int, cout: int) -> float:
    return 1e-6 * layer.macs * cin * cout / max(layer.cin * layer.cout, 1)


def table_ms(model: torch.nn.Module) -> float:
    cost = CostModel(model, X, None)
    return sum(table(s, s.cin, s.cout) for s in cost.layers.values())


def fake_real_ms(model: torch.nn.Module, *_args) -> float:
    """What 'the hardware' does: thin models run faster than the table says (latency ∝ table^1.5, normalised so
    the dense model matches the table: the dense calibration cannot see the difference)."""
    return DENSE_TABLE_MS * (table_ms(model) / DENSE_TABLE_MS) ** 1.5


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return mtprune.build_model("deeplab_resnet18", {"seg": 5, "depth": 1}, width=0.25, head="conv")


def test_close_the_loop_converges_and_keeps_the_best_plan():
    """A 'real' latency of 2 × the asked goal: the loop halves its request and lands on the goal."""
    asked = []

    def replan(ms):
        asked.append(ms)
        return {"ask": ms}

    plan, trials = close_the_loop(10.0, {"ask": 10.0}, replan, lambda p: 2 * p["ask"], rounds=3)
    assert plan == {"ask": 5.0} and asked == [5.0]
    assert [t["measured_ms"] for t in trials] == [20.0, 10.0]
    plan, trials = close_the_loop(10.0, {"ask": 10.0}, replan, lambda p: 2 * p["ask"], rounds=1)
    assert plan == {"ask": 10.0} and len(trials) == 1  # no timing left to check a corrected plan: keep the timed one


DENSE_TABLE_MS = table_ms(model())


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_prune_reaches_the_measured_latency_within_5_percent(monkeypatch, tmp_path, target):
    monkeypatch.setattr(latency_module, "LatencyTable", lambda setting: table)  # lookups: the injected table
    monkeypatch.setattr(prune_module, "measure_model_ms", fake_real_ms)  # timings of pruned copies: the fake
    monkeypatch.setattr(latency_module, "measure_model_ms", fake_real_ms)  # the dense calibration timing
    dense = model()
    goal = target * fake_real_ms(dense)
    without = model()
    mtprune.prune(without, X, "l1", target_latency=target, latency={"feedback": 0}, min_channels=2)
    net = model()
    report = mtprune.prune(net, X, "l1", target_latency=target, latency={"feedback": 4}, min_channels=2)
    assert abs(fake_real_ms(without) - goal) > 0.05 * goal  # the calibrated table alone misses the real latency
    assert fake_real_ms(net) == pytest.approx(goal, rel=0.05)  # the loop corrects it
    trials = report.extra["latency"]["feedback"]
    assert 2 <= len(trials) <= 4
    chosen = [t for t in trials if t.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["measured_ms"] == pytest.approx(fake_real_ms(net))


def test_bad_feedback_is_refused():
    with pytest.raises(MTPruneInputError, match="feedback"):
        mtprune.prune(model(), X, "l1", target_latency=0.5, latency={"feedback": -1, "table": table})
