"""Budgets and allocation of ``mtprune.prune`` (mtprune.pruning.prune, mtprune.pruning.allocate).

MACs and parameter targets are checked against an independent count of the pruned model; channel ratios,
per-layer allocation, minimum widths, rounding, per-part ratios and predictor protection against the widths
the pruned model actually has.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtprune
from helpers import nyu_batches
from mtprune.measure import layer_macs
from mtprune.pruning.allocate import plan_removal
from mtprune.pruning.criteria import CRITERIA, get_criterion
from mtprune.pruning.graph import ChannelGroup, PruningGraph
from mtprune.utils.errors import MTPruneInputError

TASKS = {"seg": 5, "depth": 1, "normal": 3}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    """Deeplab-ResNet-18 at 1/8 width (8..64 channels) with conv heads of 16 hidden channels."""
    torch.manual_seed(0)
    return mtprune.build_model("deeplab_resnet18", TASKS, width=0.125, head="conv",
                               head_kwargs={"hidden": 16, "width": 1.0})


@pytest.fixture
def model(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base)


X = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))




def data(n: int = 2):
    return nyu_batches(n, seed=2)


LOSSES = mtprune.tasks.preset("nyuv2", num_classes=5)


def macs_of(model: nn.Module) -> int:
    model.eval()
    with torch.no_grad():
        macs, _ = layer_macs(model, X[:1])
    return sum(macs.values())


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widths_of(model: nn.Module) -> dict[str, int]:
    """Independent of the report: each conv's out channels, read off the module."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------- budgets
@pytest.mark.parametrize(("target", "value"), [("target_macs", 0.5), ("target_macs", 0.25), ("target_macs", 0.1),
                                               ("target_params", 0.5)])
def test_budget_targets_land_within_two_percent(model: nn.Module, target: str, value: float) -> None:
    """The pruned model's MACs / parameters, counted independently, are within 2% of the target."""
    macs0, params0 = macs_of(model), params_of(model)
    report = mtprune.prune(model, X, "l1", **{target: value})
    measured = macs_of(model) / macs0 if target == "target_macs" else params_of(model) / params0
    assert measured == pytest.approx(value, rel=0.02)
    assert (report.macs_before, report.macs_after) == (macs0, macs_of(model))
    assert (report.params_before, report.params_after) == (params0, params_of(model))
    assert report.target == {target: value}


def test_unreachable_target_warns(model: nn.Module) -> None:
    """A MACs target below what min_channels and the protected predictors allow is not met silently."""
    with pytest.warns(UserWarning, match="not reached"):
        report = mtprune.prune(model, X, "l1", target_macs=0.02)
    assert report.macs_ratio > 0.04


def test_channel_ratio_removes_the_expected_count(model: nn.Module) -> None:
    """channel_ratio r removes round(r · candidate channels), from the lowest scores."""
    graph = PruningGraph(model, X[:1])
    total = sum(g.channels for g in graph.groups)
    before = widths_of(model)
    report = mtprune.prune(model, X, "l1", channel_ratio=0.3, min_channels=1)
    assert report.removed == round(0.3 * total)
    assert sum(report.widths_before.values()) - sum(report.widths_after.values()) == round(0.3 * total)
    after = widths_of(model)
    assert all(after[r] == w for r, w in report.widths_after.items())
    assert sum(before[r] - after[r] for r in report.widths_before) == round(0.3 * total)


@pytest.mark.parametrize("given", [{}, {"target_macs": 0.5, "channel_ratio": 0.3},
                                   {"target_macs": 0.5, "target_params": 0.5}])
def test_exactly_one_target_required(model: nn.Module, given: dict) -> None:
    """No target, or two, is an input error; the model is left alone."""
    before = widths_of(model)
    with pytest.raises(MTPruneInputError, match="exactly one"):
        mtprune.prune(model, X, "l1", **given)
    assert widths_of(model) == before


@pytest.mark.parametrize("target", ["target_macs", "target_params", "channel_ratio"])
@pytest.mark.parametrize("value", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_out_of_range_target_refused(base: nn.Module, target: str, value: float) -> None:
    """Targets must lie in (0, 1)."""
    with pytest.raises(MTPruneInputError, match=target):
        mtprune.prune(base, X, "l1", **{target: value})


def test_min_channels_respected(model: nn.Module) -> None:
    """No group is pruned below min_channels, and the limit binds at a high ratio."""
    report = mtprune.prune(model, X, "l1", channel_ratio=0.9, min_channels=3)
    assert min(report.widths_after.values()) == 3
    assert all(w >= 3 for n, w in widths_of(model).items() if not n.endswith(".out"))  # all but the predictors

    free = copy.deepcopy(model)
    report = mtprune.prune(free, X, "l1", channel_ratio=0.9, min_channels=1)
    assert min(report.widths_after.values()) < 3  # the option is what held them


def test_round_to_gives_multiples(model: nn.Module) -> None:
    """With round_to=8 every pruned group keeps a multiple of 8 channels; others are unchanged."""
    report = mtprune.prune(model, X, "l1", channel_ratio=0.4, round_to=8, min_channels=1)
    changed = {r for r in report.widths_before if report.widths_after[r] != report.widths_before[r]}
    assert changed
    assert all(report.widths_after[r] % 8 == 0 for r in changed)


def test_layer_allocator_removes_same_fraction_everywhere(model: nn.Module) -> None:
    """allocator="layer" removes floor(f · C) channels (capped by min_channels) from every group."""
    report = mtprune.prune(model, X, "l2", channel_ratio=0.3, allocator="layer", min_channels=5)
    for root, c in report.widths_before.items():
        assert c - report.widths_after[root] == min(math.floor(0.3 * c), max(c - 5, 0)), root


def test_layer_allocator_exact_fractions() -> None:
    """The per-layer count is exact for fractions that are not exact in binary (0.29 · 100 = 29)."""
    groups = [ChannelGroup(index=i, root=f"g{i}", channels=100, producers=[f"g{i}"], consumers=[], norms=[],
                           gates=[], part="backbone") for i in range(2)]
    scores = {0: torch.arange(100.0), 1: torch.arange(100.0).flip(0)}
    for frac, k in ((0.29, 29), (0.57, 57), (0.58, 58)):
        plan = plan_removal(groups, scores, frac, mode="layer", min_channels=1)
        assert plan[0] == list(range(k))  # the lowest scores
        assert plan[1] == list(range(100 - k, 100))


def test_global_allocator_ranks_across_groups_and_caps() -> None:
    """The global ranking removes the lowest scores of all groups together, but never below min_channels."""
    groups = [ChannelGroup(index=0, root="a", channels=3, producers=["a"], consumers=[], norms=[], gates=[],
                           part="backbone"),
              ChannelGroup(index=1, root="b", channels=2, producers=["b"], consumers=[], norms=[], gates=[],
                           part="seg")]
    scores = {0: torch.tensor([1.0, 3.0, 2.0]), 1: torch.tensor([10.0, 0.5])}
    assert plan_removal(groups, scores, 0.4, min_channels=1) == {0: [0], 1: [1]}
    assert plan_removal(groups, scores, 0.4, min_channels=2) == {0: [0]}  # b may not lose a channel
    assert plan_removal(groups, scores, 0.8, min_channels=1, part_ratios={"seg": 0.0}) == {0: [0, 2]}


def test_part_ratios_protect_the_backbone(model: nn.Module) -> None:
    """part_ratios={"backbone": 0.0} prunes the heads only; unknown parts and bad ratios are refused."""
    graph = PruningGraph(model, X[:1])
    part = {g.root: g.part for g in graph.groups}
    with pytest.raises(MTPruneInputError, match="bakbone"):
        mtprune.prune(model, X, "l1", channel_ratio=0.3, part_ratios={"bakbone": 0.0})
    with pytest.raises(MTPruneInputError, match="part_ratios"):
        mtprune.prune(model, X, "l1", channel_ratio=0.3, part_ratios={"seg": 1.5})
    report = mtprune.prune(model, X, "l1", channel_ratio=0.3, part_ratios={"backbone": 0.0})
    for root, c in report.widths_before.items():
        if part[root] == "backbone":
            assert report.widths_after[root] == c, root
    assert any(report.widths_after[r] < c for r, c in report.widths_before.items() if part[r] != "backbone")


@pytest.mark.parametrize("name", sorted(n for n, c in CRITERIA.items() if c().needs_data))
def test_gradient_criteria_need_data_and_losses(model: nn.Module, name: str) -> None:
    """Without data= or losses=, a gradient criterion fails with a ValueError saying what to pass."""
    before = widths_of(model)
    for kwargs in ({}, {"data": data(1)}, {"losses": LOSSES}):
        with pytest.raises(ValueError, match="data= and losses="):
            mtprune.prune(model, X, name, channel_ratio=0.3, **kwargs)
    assert widths_of(model) == before


def test_output_predictors_never_change_width(model: nn.Module) -> None:
    """A deep cut leaves every head's final layer (and the output shapes) as it was."""
    model.eval()
    with torch.no_grad():
        before = {k: v.shape for k, v in model(X).items()}
    preds = {t: (h.out.in_channels, h.out.out_channels) for t, h in model.heads.items()}
    graph = PruningGraph(model, X[:1])
    assert {f"heads.{t}.out" for t in TASKS} <= set(graph.protected)
    mtprune.prune(model, X, "l1", target_macs=0.1)
    assert {t: h.out.out_channels for t, h in model.heads.items()} == {t: c for t, (_, c) in preds.items()}
    assert any(h.out.in_channels < preds[t][0] for t, h in model.heads.items())  # their inputs were pruned
    model.eval()
    with torch.no_grad():
        assert {k: v.shape for k, v in model(X).items()} == before


def test_pruning_removes_the_lowest_scores(model: nn.Module) -> None:
    """The surviving filters are exactly the highest-L1 ones, in their original order."""
    name = "heads.seg.conv"
    w = model.get_submodule(name).weight.detach().clone()
    mtprune.prune(model, X, "l1", channel_ratio=0.25, allocator="layer", min_channels=1,
                  part_ratios={"backbone": 0.0, "depth": 0.0, "normal": 0.0})  # the seg head's inputs stay
    keep = sorted(w.abs().flatten(1).sum(1).argsort(descending=True)[: w.shape[0] - 4].tolist())
    assert torch.equal(model.get_submodule(name).weight.detach(), w[keep])


def test_report_counts_the_batches_seen(model: nn.Module) -> None:
    """The report says how many batches the statistics really used (data shorter than batches=)."""
    report = mtprune.prune(model, X, "taylor", channel_ratio=0.2, data=data(2), losses=LOSSES, batches=8)
    assert report.batches == 2
    report = mtprune.prune(model, X, "l1", channel_ratio=0.2)
    assert report.batches == 0
    assert report.to_dict()["macs_ratio"] == pytest.approx(report.macs_after / report.macs_before)


def test_criterion_instance_and_unknown_names(model: nn.Module) -> None:
    """A Criterion instance is accepted; unknown criterion or allocator names are input errors."""
    report = mtprune.prune(model, X, get_criterion("l2"), channel_ratio=0.2)
    assert report.criterion == "l2" and report.removed > 0
    with pytest.raises(MTPruneInputError, match="criterion"):
        mtprune.prune(model, X, "l3", channel_ratio=0.2)
    with pytest.raises(MTPruneInputError, match="allocator"):
        mtprune.prune(model, X, "l1", channel_ratio=0.2, allocator="pagcp-ish")


class UserNet(nn.Module):
    """A user model (not the zoo) with a shared trunk and two heads under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.seg_head = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
        self.depth_head = nn.Conv2d(16, 1, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        return {"seg": self.seg_head(f), "depth": self.depth_head(f)}


def test_user_model_with_gradient_criterion() -> None:
    """A dict-returning user model is pruned by Taylor; its outputs keep their shapes."""
    torch.manual_seed(0)
    net = UserNet()
    losses = {"seg": lambda p, t: F.cross_entropy(p, t), "depth": F.l1_loss}
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(2, 3, 16, 16, generator=gen),
                {"seg": torch.randint(0, 5, (2, 8, 8), generator=gen), "depth": torch.rand(2, 1, 8, 8, generator=gen)})]
    x = batches[0][0]
    report = mtprune.prune(net, x, "taylor", target_params=0.5, data=batches, losses=losses, min_channels=2)
    assert report.params_ratio == pytest.approx(0.5, rel=0.05)
    out = net(x)
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)
    assert net.seg_head[2].out_channels == 5 and net.depth_head.out_channels == 1


def test_prune_leaves_modes_and_frozen_flags(model: nn.Module) -> None:
    """Train/eval flags (mixed) and frozen parameters are as before after a data-driven prune."""
    model.train()
    model.heads["depth"].eval()
    model.backbone.conv1.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    mtprune.prune(model, X, "task_taylor", channel_ratio=0.3, data=data(1), losses=LOSSES)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.backbone.conv1.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.conv1."))


def test_normalize_override_changes_global_ranking_and_is_validated():
    """Mean-normalised global ranking spreads removal differently from raw scores, and bad values are refused."""

    def fresh():
        torch.manual_seed(0)
        m = mtprune.build_model("deeplab_resnet18", {"seg": 4, "depth": 1}, width=0.125, head="conv")
        with torch.no_grad():  # one layer's weights 100x larger: raw L2 ranking spares it entirely
            m.backbone.layer4[0].conv1.weight.mul_(100)
        return m

    x = torch.zeros(1, 3, 32, 40)
    raw, normed = fresh(), fresh()
    mtprune.prune(raw, x, "l2", channel_ratio=0.3, normalize="none")
    mtprune.prune(normed, x, "l2", channel_ratio=0.3, normalize="mean")
    assert PruningGraph(raw, x).widths() != PruningGraph(normed, x).widths()
    with pytest.raises(MTPruneInputError, match="normalize"):
        mtprune.prune(fresh(), x, "l2", channel_ratio=0.3, normalize="max")
