"""The measured feedback loop of latency targets (pruning/latency.close_the_loop): a table that mispredicts the
whole model is corrected by timing the pruned configuration. Deterministic: the table is injected, and the
"timing" is a fake measurement (a known function of the pruned model's table cost), so nothing is timed."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mtprune
import mtprune.pruning.latency as latency_module
import mtprune.pruning.prune as prune_module
from mtprune.pruning.cost import CostModel, LayerShape
from mtprune.pruning.latency import _next_ask, close_the_loop
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


def test_close_the_loop_asks_in_the_replans_unit():
    """A replan that asks in MACs (the MACs-ranking candidate): real ms = 5 + 95 · (MACs / 1e9)^0.5, so the first
    cut (linear in MACs: 0.3e9 for 30 ms) runs at 57 ms. The loop must bracket in MACs, with the dense and floor
    pairs, and land on the goal; taking the goal's 30 (ms) for the first ask would stop it after one timing."""
    def real_ms(plan):
        return 5 + 95 * (plan["macs"] / 1e9) ** 0.5

    known = [(1e9, 100.0), (1e6, real_ms({"macs": 1e6}))]
    plan, trials = close_the_loop(30.0, {"macs": 0.3e9}, lambda m: {"macs": m}, real_ms, rounds=6,
                                  floor_ms=1e6, known=known, first_ask=0.3e9)
    assert trials[0]["asked_ms"] == 0.3e9 and len(trials) > 1
    assert real_ms(plan) == pytest.approx(30.0, rel=0.02)


DENSE_TABLE_MS = table_ms(model())


class FakeTimer:
    """``PairedTimer`` on 'the hardware' of ``real_ms``, on a machine whose load grows at every timing: the
    reference and the candidate, timed alongside, slow down alike, so only their ratio is worth anything."""

    real_ms = staticmethod(fake_real_ms)
    calls = 0

    def __init__(self, reference, example_inputs, setting, rounds=None, clock=None) -> None:
        self.reference = reference

    def __call__(self, candidate) -> dict[str, float]:
        FakeTimer.calls += 1
        load = 1 + 0.3 * FakeTimer.calls
        ref, got = self.real_ms(self.reference) * load, self.real_ms(candidate) * load
        return {"ratio": got / ref, "reference_ms": ref, "candidate_ms": got}


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_prune_reaches_the_measured_latency_within_5_percent(monkeypatch, tmp_path, target):
    monkeypatch.setattr(latency_module, "LatencyTable", lambda setting: table)  # lookups: the injected table
    monkeypatch.setattr(prune_module, "PairedTimer", FakeTimer)  # timings of pruned copies beside the dense one
    monkeypatch.setattr(latency_module, "measure_model_ms", fake_real_ms)  # the dense calibration timing
    dense = model()
    goal = target * fake_real_ms(dense)
    without = model()
    mtprune.prune(without, X, "l1", target_latency=target, latency={"feedback": 0}, min_channels=2)
    net = model()
    report = mtprune.prune(net, X, "l1", target_latency=target, latency={"feedback": 4}, min_channels=2)
    assert abs(fake_real_ms(without) - goal) > 0.05 * goal  # the calibrated table alone misses the real latency
    assert fake_real_ms(net) == pytest.approx(goal, rel=0.05)  # the loop corrects it, under a drifting load
    trials = report.extra["latency"]["feedback"]
    assert 2 <= len(trials) <= 4
    chosen = [t for t in trials if t.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["measured_ms"] == pytest.approx(fake_real_ms(net))


def overhead_ms(net: torch.nn.Module, *_args) -> float:
    """'Hardware' with a fixed cost per forward that no layer shows (dispatch, norms, the unprunable ends): the
    calibration spreads it over the activations, so the table believes thin models lose it too."""
    return table_ms(net) + 0.5 * DENSE_TABLE_MS


def test_a_goal_below_the_floor_is_refused_and_the_model_left_alone(monkeypatch):
    monkeypatch.setattr(latency_module, "LatencyTable", lambda setting: table)
    monkeypatch.setattr(latency_module, "measure_model_ms", overhead_ms)
    net = model()
    widths = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    # the table alone: the floor it predicts (every prunable layer at 2 channels) is far below the real one
    report = mtprune.prune(model(), X, "l1", target_latency=0.4, latency={"feedback": 0}, min_channels=2)
    floor = report.extra["latency"]["floor"]
    assert "measured_ms" not in floor and floor["predicted_ratio"] < 0.4
    with pytest.raises(MTPruneInputError, match=r"target_latency=0.02 is below this model's latency floor.*"
                                                r"min_channels=2.*\(predicted\)"):
        mtprune.prune(net, X, "l1", target_latency=0.02, latency={"feedback": 0}, min_channels=2)
    # with feedback the floor is timed: the real one (> 1/3 of dense) refuses 0.3, which the table allowed
    FakeTimer.real_ms = staticmethod(overhead_ms)
    monkeypatch.setattr(prune_module, "PairedTimer", FakeTimer)
    try:
        with pytest.raises(MTPruneInputError, match=r"target_latency=0.3 is below .* floor.*\(measured\)"):
            mtprune.prune(net, X, "l1", target_latency=0.3, latency={"feedback": 3}, min_channels=2)
    finally:
        FakeTimer.real_ms = staticmethod(fake_real_ms)
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == widths  # unchanged


def test_the_loop_stops_when_the_latency_stops_falling():
    """Real latency flat below 12 ms of asked latency: the loop does not keep asking for less (which would only
    remove MACs) and keeps the least pruned of the plans that measured the same."""
    asked = []

    def replan(ms):
        asked.append(ms)
        return {"ask": ms}

    plan, trials = close_the_loop(8.0, {"ask": 8.0}, replan, lambda p: max(p["ask"], 12.0) + 1.0, rounds=5)
    assert trials[-1].get("flat") and len(trials) == 2
    assert plan == {"ask": 8.0} and trials[0]["chosen"]
    plan, trials = close_the_loop(8.0, {"ask": 8.0}, replan, lambda p: 2 * p["ask"], rounds=5, floor_ms=6.0)
    assert min(t["asked_ms"] for t in trials) >= 6.0  # asks never go below the predicted floor


def test_known_pairs_bracket_the_first_correction():
    """Real latency = asked² (in units of the dense one): scaling the first miss would ask for 1.0 (the dense model);
    with the dense pair (1, 1) known, the loop interpolates (log-log) and lands on the goal at the second timing."""
    asked = []

    def replan(ms):
        asked.append(ms)
        return {"ask": ms}

    close_the_loop(0.5, {"ask": 0.5}, replan, lambda p: p["ask"] ** 2, rounds=2)
    assert asked == [1.0]  # without it: the first miss (0.25) doubles the ask, to the dense model
    asked.clear()
    plan, trials = close_the_loop(0.5, {"ask": 0.5}, replan, lambda p: p["ask"] ** 2, rounds=4, known=[(1.0, 1.0)])
    assert len(trials) == 2 and trials[-1]["measured_ms"] == pytest.approx(0.5) and trials[-1]["chosen"]
    assert asked == [pytest.approx(0.5 ** 0.5)] and plan == {"ask": asked[0]}


def test_next_ask_interpolates_once_the_goal_is_bracketed():
    """Real latency is curved in the asked one (pairs measured on MobileNetV2): once bracketed, log-log
    interpolation between the nearest pairs below and above the goal, which stays inside the bracket even when
    the pairs on one side would extrapolate far (the floor's (0.1, 0.03) with (0.5, 0.28) would ask for 0.86);
    extrapolation before a bracket exists is bounded."""
    points = [(0.25, 0.14), (0.448, 0.193), (0.657, 0.351)]
    t = math.log(0.25 / 0.193) / math.log(0.351 / 0.193)
    assert _next_ask(points, 0.25) == pytest.approx(0.448 * (0.657 / 0.448) ** t)
    assert 0.448 < _next_ask(points, 0.25) < 0.657
    with_anchors = [(0.1, 0.03), (0.5, 0.28), (1.0, 1.0)]
    assert _next_ask(with_anchors, 0.5) == pytest.approx(0.5 * 2 ** (math.log(0.5 / 0.28) / math.log(1 / 0.28)))
    assert _next_ask([(1.0, 1.0), (0.5, 0.25)], 0.5) == pytest.approx(0.5 ** 0.5)  # exact on a power law
    assert _next_ask([(10.0, 40.0)], 10.0) == 5.0  # scaled by goal / measured, at most halved
    assert _next_ask([(10.0, 9.0), (9.0, 8.0)], 20.0) == 20.0  # secant (20.4) capped at twice the nearest ask
    assert _next_ask([(10.0, 12.0), (9.0, 12.5)], 10.0) == pytest.approx(10.0 * 10 / 12)  # slope <= 0: scaled


def test_bad_feedback_is_refused():
    with pytest.raises(MTPruneInputError, match="feedback"):
        mtprune.prune(model(), X, "l1", target_latency=0.5, latency={"feedback": -1, "table": table})


def test_pick_by_importance_keeps_the_most_importance_within_the_goal():
    from mtprune.pruning.latency import pick_by_importance

    assert pick_by_importance(10.0, {"latency": (10.2, 7.0), "macs": (9.9, 5.0)}) == "macs"
    assert pick_by_importance(10.0, {"latency": (10.2, 5.0), "macs": (9.9, 7.0)}) == "latency"
    assert pick_by_importance(10.0, {"latency": (10.4, 5.0), "macs": (11.0, 1.0)}) == "latency"  # 10 % over: out
    assert pick_by_importance(10.0, {"latency": (12.0, 5.0), "macs": (11.0, 9.0)}) == "macs"  # none within: fastest


def macs_ms(net: torch.nn.Module, *_args) -> float:
    """'Hardware' on which time is MACs."""
    return 1e-7 * sum(s.macs for s in CostModel(net, X, None).layers.values())


def stem_priced_table(price: float):
    """A table that believes the high-resolution layers cost ``price`` times what they do."""
    def lookup(layer: LayerShape, cin: int, cout: int) -> float:
        return table(layer, cin, cout) * (price if layer.in_shape[-1] >= 20 else 1.0) / 10
    return lookup


@pytest.mark.parametrize("price, candidate", [(3.0, True), (50.0, True), (50.0, False)])
def test_latency_target_keeps_the_candidate_with_the_most_importance_within_the_goal(monkeypatch, price, candidate):
    """Two allocations, each timed to the goal: the latency knapsack and the importance ranking cut at the MACs
    that meet it. With a table 3× off on the stem, both land within the goal and the knapsack (importance per
    millisecond) removes less importance, so it is kept. With a table 50× off, the knapsack strips the stem and
    still runs over the goal after its timings; the MACs ranking lands on it and is kept, where without
    ``macs_candidate`` the target is missed."""
    monkeypatch.setattr(latency_module, "LatencyTable", lambda setting: stem_priced_table(price))
    monkeypatch.setattr(latency_module, "measure_model_ms", macs_ms)
    monkeypatch.setattr(FakeTimer, "real_ms", staticmethod(macs_ms))
    monkeypatch.setattr(prune_module, "PairedTimer", FakeTimer)
    net = model()
    goal = 0.5 * macs_ms(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the knapsack alone misses the target (and says so)
        report = mtprune.prune(net, X, "l1", target_latency=0.5, min_channels=2,
                               latency={"feedback": 4, "macs_candidate": candidate})
    lat = report.extra["latency"]
    if not candidate:
        assert "candidates" not in lat and macs_ms(net) > 1.05 * goal
        return
    c = lat["candidates"]
    knapsack_within = c["latency"]["measured_ms"] <= 1.05 * goal
    assert c["macs"]["measured_ms"] == pytest.approx(goal, rel=0.05)
    if price == 3.0:
        assert knapsack_within and c["chosen"] == "latency"
        assert c["latency"]["removed_importance"] < c["macs"]["removed_importance"]
    else:
        assert not knapsack_within and c["chosen"] == "macs"
    assert report.macs_after == c[c["chosen"]]["macs"]  # the model kept is the chosen plan
    assert macs_ms(net) == pytest.approx(c[c["chosen"]]["measured_ms"])
