"""PAGCP as a budget allocator (Ye et al., TPAMI 2023, arXiv 2303.11923; mtprune.pruning.pagcp).

The θ schedule is checked against its defining product, the stopping rule against constructed loss curves, a
round's per-task loss bound by recomputing the losses independently on the physically pruned model, the MACs
target through ``mtprune.prune(allocator="pagcp")``, and the masked trials for side effects and for the
equality of cached (replayed upstream activations) and uncached losses.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtprune
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.pagcp import (
    LossProbe,
    MacsModel,
    PAGCPSettings,
    pagcp,
    probe_round,
    search_ratio,
    solve_lambda,
    theta_schedule,
)
from mtprune.pruning.prune import count, criterion_scores
from mtprune.utils.errors import MTPruneInputError

LOSSES = {"seg": lambda p, t: F.cross_entropy(p, t), "depth": lambda p, t: (p - t).abs().mean()}


def zoo_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mtprune.build_model("deeplab_resnet18", {"seg": 5, "depth": 1}, width=0.125, head_kwargs={"hidden": 16})


def zoo_batches(n: int = 2, seed: int = 1) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """Inputs 2×3×32×40; targets at the output resolution (output stride 8)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 32, 40, generator=gen),
             {"seg": torch.randint(0, 5, (2, 4, 5), generator=gen),
              "depth": torch.rand(2, 1, 4, 5, generator=gen) + 0.1}) for _ in range(n)]


def held_out_losses(model: nn.Module, batches, losses=LOSSES) -> dict[str, float]:
    """Each task's mean loss, computed without any of pagcp's machinery."""
    was = model.training
    model.eval()
    sums, n = dict.fromkeys(losses, 0.0), 0
    with torch.no_grad():
        for images, targets in batches:
            out = model(images)
            for t, fn in losses.items():
                sums[t] += float(fn(out[t], targets[t])) * images.shape[0]
            n += images.shape[0]
    model.train(was)
    return {t: s / n for t, s in sums.items()}


# ---------------------------------------------------------------- θ schedule
@pytest.mark.parametrize(("theta0", "n", "budget"), [
    (0.001, 10, 1.1), (0.01, 3, 1.05), (0.05, 40, 1.2), (1e-4, 2, 1.5), (0.002, 100, 1.01), (0.3, 5, 2.0)])
def test_lambda_solves_the_product_equation(theta0, n, budget):
    lam = solve_lambda(theta0, n, budget)
    assert lam > 0
    assert math.prod(1 + theta0 * lam**i for i in range(n)) == pytest.approx(budget, rel=1e-9, abs=0)
    thetas, lam2 = theta_schedule(theta0, n, budget)
    assert lam2 == lam and thetas[0] == theta0
    for a, b in zip(thetas, thetas[1:], strict=False):
        assert b / a == pytest.approx(lam, rel=1e-12)  # geometric
    uniform = budget ** (1 / n) - 1
    assert (lam > 1) == (theta0 < uniform)  # grows iff θ0 is below the uniform per-layer allowance


def test_theta_schedule_defaults_and_invalid_inputs():
    thetas, lam = theta_schedule(None, 12, 1.1)
    assert lam > 1 and all(b > a for a, b in zip(thetas, thetas[1:], strict=False))
    assert math.prod(1 + t for t in thetas) == pytest.approx(1.1, rel=1e-9)
    assert theta_schedule(None, 1, 1.3) == ([pytest.approx(0.3)], 1.0)
    assert theta_schedule(0.01, 0, 1.3) == ([], 1.0)
    for bad in [(0.2, 5, 1.1), (0.0, 5, 1.1), (0.01, 5, 1.0), (0.01, 1, 1.1)]:
        with pytest.raises(ValueError):
            solve_lambda(*bad)
    with pytest.raises(MTPruneInputError, match="theta0"):
        PAGCPSettings(theta0=0.2, budget=1.1)
    with pytest.raises(MTPruneInputError, match="unknown settings"):
        PAGCPSettings.of({"budgett": 1.2})


# ---------------------------------------------------------------- the stopping rule
class Curve:
    """A fake evaluator: task losses as a function of the removed fraction; counts its calls."""

    def __init__(self, channels: int, **curves):
        self.channels, self.curves, self.calls = channels, curves, []

    def __call__(self, k: int) -> dict[str, float]:
        self.calls.append(k)
        return {t: f(k / self.channels) for t, f in self.curves.items()}


REF = {"a": 1.0, "b": 2.0}
RATIOS = PAGCPSettings().ratios


def test_stopping_rule_keeps_the_last_ratio_before_the_first_violation():
    # task b's loss ratio is 1 + 0.2 r: above the bound 1.105 first at r = 0.55
    curve = Curve(100, a=lambda r: 1.0 + 0.01 * r, b=lambda r: 2.0 * (1 + 0.2 * r))
    found = search_ratio(RATIOS, 100, 95, curve, REF, bound=1.105)
    assert (found.ratio, found.removed, found.stopped) == (0.5, 50, "violation")
    assert found.losses == curve(50)
    assert curve.calls[:-1] == list(range(5, 60, 5))  # evaluated up to the violating ratio, no further
    assert found.trials[-1]["ratio"] == 0.55 and found.trials[-1]["loss_ratio"]["b"] > 1.105


def test_stopping_rule_first_ratio_violating_keeps_nothing():
    curve = Curve(100, a=lambda r: 1.0 + r, b=lambda r: 2.0)
    found = search_ratio(RATIOS, 100, 95, curve, REF, bound=1.01)
    assert (found.ratio, found.removed, found.stopped) == (0.0, 0, "violation")
    assert found.losses == REF and curve.calls == [5]


def test_stopping_rule_stops_at_the_first_violation_even_if_the_curve_recovers():
    bump = lambda r: 2.0 * (1.5 if abs(r - 0.3) < 1e-9 else 1.0)  # noqa: E731
    found = search_ratio(RATIOS, 100, 95, Curve(100, a=lambda r: 1.0, b=bump), REF, bound=1.1)
    assert (found.ratio, found.removed) == (0.25, 25)


def test_stopping_rule_respects_min_channels_and_skips_repeated_widths():
    found = search_ratio(RATIOS, 100, 30, Curve(100, a=lambda r: 1.0, b=lambda r: 2.0), REF, bound=1.1)
    assert (found.ratio, found.removed, found.stopped) == (0.3, 30, "min_channels")
    curve = Curve(4, a=lambda r: 1.0, b=lambda r: 2.0)
    found = search_ratio(RATIOS, 4, 3, curve, REF, bound=1.1)
    assert curve.calls == [1, 2, 3]  # 19 ratios, but floor(r·4) takes only three nonzero values
    assert (found.ratio, found.removed, found.stopped) == (0.95, 3, "end")


# ---------------------------------------------------------------- a round on a real model
def test_a_round_keeps_every_task_within_its_bound():
    model, batches = zoo_model(), zoo_batches()
    before = held_out_losses(model, batches)
    settings = {"budget": 1.02, "rounds": 1, "held_out_batches": 2, "top_p": 1.0}
    report, _ = pagcp(model, batches[0][0], "l1", data=batches, losses=LOSSES, settings=settings)
    (rnd,) = report.rounds
    assert sum(rnd.removed.values()) > 0 and report.macs_after < report.macs_before
    assert any(layer.stopped == "violation" for layer in rnd.layers)  # the bound was binding somewhere
    schedule, lam = theta_schedule(None, len(rnd.layers), 1.02)
    assert math.prod(1 + t for t in schedule) == pytest.approx(1.02, rel=1e-9) and lam == rnd.lam
    pruned_before = 0
    for layer in rnd.layers:  # θ advances only after a pruned layer (Ye et al.'s code)
        assert layer.theta == schedule[pruned_before]
        pruned_before += layer.removed > 0
    for layer in rnd.layers:  # each group's kept ratio respects its own θ_i
        assert max(layer.loss_ratio.values()) <= 1 + layer.theta + 1e-12
    after = held_out_losses(model, batches)  # independently, on the physically pruned model
    for t in LOSSES:
        assert after[t] / before[t] <= 1.02 * (1 + 1e-5), t
        assert after[t] / before[t] == pytest.approx(rnd.loss_ratio[t], rel=1e-4)  # masks == removal


def test_macs_target_is_reached_through_mtprune_prune():
    model, batches = zoo_model(), zoo_batches()
    x = batches[0][0]
    macs0 = count(model, x)[1]
    report = mtprune.prune(model, x, "l1", allocator="pagcp", target_macs=0.5, data=batches, losses=LOSSES,
                           pagcp={"budget": 1.5, "rounds": 4, "held_out_batches": 2})
    assert abs(report.macs_ratio - 0.5) <= 0.02 * 0.5
    assert count(model, x)[1] == report.macs_after and report.macs_before == macs0
    info = report.extra["pagcp"]
    assert report.extra["allocator"] == "pagcp" and info["reached"] is True
    last = info["rounds"][-1]
    assert last["macs_estimated"] == last["macs_after"]  # the analytic MACs are exact
    assert set(last["ratios"]) <= set(report.widths_before) and last["loss_ratio"].keys() == LOSSES.keys()
    assert all(set(layer["loss_ratio"]) == set(LOSSES) for layer in last["layers"])
    out = model(x)
    assert out["seg"].shape == (2, 5, 4, 5) and out["depth"].shape == (2, 1, 4, 5)


def test_pagcp_refuses_other_targets_and_missing_data():
    model, batches = zoo_model(), zoo_batches()
    with pytest.raises(MTPruneInputError, match="target_macs"):
        mtprune.prune(model, batches[0][0], allocator="pagcp", channel_ratio=0.3, data=batches, losses=LOSSES)
    with pytest.raises(ValueError, match="data"):
        mtprune.prune(model, batches[0][0], allocator="pagcp", target_macs=0.5)


def test_part_ratio_zero_leaves_the_heads_out_and_other_ratios_are_refused():
    """Garg et al.'s candidate pool (the backbone only) for PAGCP: part_ratios of 0 exclude those parts."""
    model, batches = zoo_model(), zoo_batches()
    x = batches[0][0]
    before = PruningGraph(model, x)
    heads = {g.root for g in before.groups if g.part in LOSSES}
    widths0 = before.widths()
    report = mtprune.prune(model, x, "l1", allocator="pagcp", target_macs=0.6, data=batches, losses=LOSSES,
                           part_ratios={"seg": 0.0, "depth": 0.0}, pagcp={"budget": 1.5, "rounds": 3,
                                                                            "held_out_batches": 2})
    changed = {k for k, v in report.widths_after.items() if v != widths0[k]}
    assert changed and heads and not changed & heads  # the backbone lost filters, no head filter went
    with pytest.raises(MTPruneInputError, match="part_ratios"):
        mtprune.prune(zoo_model(), x, "l1", allocator="pagcp", target_macs=0.6, data=batches, losses=LOSSES,
                      part_ratios={"seg": 0.5})


def test_macs_model_matches_physical_pruning():
    model, x = zoo_model(), zoo_batches(1)[0][0]
    graph = PruningGraph(model, x[:1])
    gen = torch.Generator().manual_seed(3)
    plan = {g.index: torch.randperm(g.channels, generator=gen)[:g.channels // 2].tolist()
            for g in graph.groups if g.index % 3 == 1 or g.index == 10}  # incl. the group feeding both heads
    estimate = MacsModel(model, x).after(graph.groups, plan)
    graph.prune(plan)
    assert estimate == count(model, x)[1]


# ---------------------------------------------------------------- masked trials
def test_probing_does_not_modify_the_model():
    model, batches = zoo_model(), zoo_batches()
    model.train()
    state = copy.deepcopy(model.state_dict())
    graph = PruningGraph(model, batches[0][0][:1])
    scores = criterion_scores(model, graph, mtprune.pruning.criteria.get_criterion("l1"))
    probe = LossProbe(model, batches, LOSSES, batches=2)
    layers, start, _ = probe_round(graph, scores, probe, MacsModel(model, batches[0][0]),
                                   PAGCPSettings(budget=1.2), min_channels=5)
    assert any(layer.removed for layer in layers) and probe.forwards > len(layers)
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)  # weights and BatchNorm statistics
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())
    assert held_out_losses(model, batches) == pytest.approx(start, rel=1e-6)


class CountingConv(nn.Conv2d):
    calls = 0

    def forward(self, x: Tensor) -> Tensor:
        CountingConv.calls += 1
        return super().forward(x)


class InplaceNet(nn.Module):
    """A shared ReLU module called twice, and in-place ``+=`` and ReLU applied (outside any module call) to the
    outputs of module calls that the cache replays: a cache that hands out its own tensors gets corrupted."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(CountingConv(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.heads = nn.ModuleDict({
            "a": nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 3, 1)),
            "b": nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 1, 1))})
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.relu(self.stem(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = F.relu(out, inplace=True)
        return {t: h(out) for t, h in self.heads.items()}


def test_cached_trials_equal_uncached_ones():
    torch.manual_seed(0)
    model = InplaceNet()
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 8, 8, generator=gen), {"a": torch.randint(0, 3, (2, 8, 8), generator=gen),
                                                          "b": torch.rand(2, 1, 8, 8, generator=gen)})
               for _ in range(2)]
    losses = {"a": lambda p, t: F.cross_entropy(p, t), "b": lambda p, t: (p - t).abs().mean()}
    graph = PruningGraph(model, batches[0][0][:1], min_channels=1)
    assert len(graph.groups) >= 3
    cached = LossProbe(model, batches, losses, batches=2, cache=True)
    plain = LossProbe(model, batches, losses, batches=2, cache=False)
    replayed = 0
    # without earlier masks too: a mask hook hands out a fresh tensor, which would hide a shared cached one
    cases = [(g, e) for g in graph.groups for e in ({}, {h.index: [0, 3] for h in graph.groups[:g.index]})]
    for g, earlier in cases:
        ref, stores = cached.reference(graph.groups, earlier, set(g.gates))
        assert ref == plain.losses_under(graph.groups, earlier)
        for k in (1, 3, 1):  # repeated: a corrupted cache would show on the second use
            plan = {**earlier, g.index: list(range(k))}
            calls = CountingConv.calls
            assert cached.losses_under(graph.groups, plan, stores) == plain.losses_under(graph.groups, plan)
            if g.root.startswith("heads"):
                replayed += 1
                assert CountingConv.calls == calls + len(batches)  # only the uncached probe ran the stem
    assert replayed > 0
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in model.modules())
