"""Pruning criteria and the statistics engine (mtprune.pruning.criteria, mtprune.pruning.stats).

Every registered criterion is run on a tiny zoo model; the data-free scores (L1, L2, BN-scale, random) and the
data-driven ones (Taylor-FO on gates, Molchanov et al. 2019; per-task Taylor; CosPrune, Garg et al. 2023;
structured DiSparse) are compared with independent hand computations on small hand-built networks, and the
engine's one-forward / T-backward contract is counted.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtprune
from helpers import nyu_batches as zoo_batches
from helpers import zoo_model
from mtprune.pruning.allocate import plan_removal
from mtprune.pruning.criteria import CRITERIA, get_criterion, mean_pairwise_cosine
from mtprune.pruning.criteria.cosprune import CosPrune
from mtprune.pruning.criteria.disparse_structured import DiSparseStructured
from mtprune.pruning.criteria.task_taylor import TaskTaylor
from mtprune.pruning.criteria.taylor import Taylor
from mtprune.pruning.graph import ChannelGroup, PruningGraph
from mtprune.pruning.prune import criterion_scores
from mtprune.pruning.stats import StatisticsEngine, static_stats
from mtprune.utils.errors import MTPruneInputError

# ---------------------------------------------------------------- tiny models and data




ZOO_TASKS = mtprune.tasks.preset("nyuv2", num_classes=5)


class Tiny(nn.Module):
    """conv-BN-ReLU-conv-ReLU trunk shared by three 1x1 heads (the heads are the protected predictors)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Conv2d(6, 2, 1), "b": nn.Conv2d(6, 1, 1), "c": nn.Conv2d(6, 3, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.backbone(x)
        return {k: h(f) for k, h in self.heads.items()}


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    bn = m.backbone[1]
    with torch.no_grad():  # a BN that is not the identity in eval mode
        bn.weight.copy_(torch.tensor([-2.0, 0.5, 3.0, -0.1]))
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return m


TINY_LOSSES = {t: F.mse_loss for t in ("a", "b", "c")}


def tiny_batch(seed: int = 3) -> tuple[Tensor, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 7, generator=gen)
    return x, {t: torch.randn(2, c, 6, 7, generator=gen) for t, c in (("a", 2), ("b", 1), ("c", 3))}


def by_root(graph: PruningGraph) -> dict[str, ChannelGroup]:
    return {g.root: g for g in graph.groups}


def hand_gate_taylor(model: nn.Module, x: Tensor, targets: dict[str, Tensor], tasks: list[str],
                     gates: list[str], losses: dict | None = None) -> dict[str, Tensor]:
    """Σ_{n,h,w} a · ∂L/∂a at each gate for L = Σ_{t in tasks} L_t: one forward, one backward, hooks."""
    model.eval()
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module, args, out):
            out.retain_grad()
            acts[name] = out
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in gates]
    try:
        out = model(x)
        sum((losses or TINY_LOSSES)[t](out[t], targets[t]) for t in tasks).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return {n: (acts[n] * acts[n].grad).sum(dim=(0, 2, 3)).detach() for n in gates}


def hand_weight_grad(model: nn.Module, x: Tensor, targets: dict[str, Tensor], task: str, layer: str) -> Tensor:
    """∂L_task/∂W of one layer, by an ordinary backward in eval mode."""
    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(x)
    TINY_LOSSES[task](out[task], targets[task]).backward()
    grad = model.get_submodule(layer).weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return grad


# ---------------------------------------------------------------- every criterion on a zoo model
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_scores_and_prunes(name: str) -> None:
    """One finite score per channel for each candidate group; pruning keeps output keys/shapes and backward."""
    model = zoo_model()
    x = zoo_batches(1)[0][0]
    data = zoo_batches(2)
    graph = PruningGraph(model, x[:1])
    crit = get_criterion(name, seed=0)
    scores = criterion_scores(model, graph, crit, data=data, losses=ZOO_TASKS, batches=2)
    expected = {g.index for g in graph.groups if crit.applies_to(g)}
    if name == "cosprune":
        expected = {g.index for g in graph.groups if g.part == "backbone"}
    assert expected and set(scores) == expected
    for k, s in scores.items():
        assert s.shape == (graph.groups[k].channels,)
        assert torch.isfinite(s).all()
    assert len({tuple(s.tolist()) for s in scores.values()}) > 1  # not one constant vector

    model.eval()
    with torch.no_grad():
        before = model(x)
    report = mtprune.prune(model, x, name, channel_ratio=0.3, data=data, losses=ZOO_TASKS, batches=2)
    assert report.removed > 0 and report.params_after < report.params_before
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert list(after) == list(before)
    assert all(after[k].shape == before[k].shape for k in before)
    model.train()
    out = model(x)
    targets = data[0][1]
    sum(ZOO_TASKS[t].loss(out[t], targets[t]) for t in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- weight-only criteria
def test_l1_l2_match_hand_computation_on_known_weight() -> None:
    """L1/L2 = the p-norm of each filter's weights; a residual group sums over all its producers' rows."""
    model = tiny()
    w = (torch.arange(4 * 3 * 9, dtype=torch.float32).reshape(4, 3, 3, 3) - 50.0) / 10.0
    with torch.no_grad():
        model.backbone[0].weight.copy_(w)
    graph = PruningGraph(model, tiny_batch()[0][:1])
    g0 = by_root(graph)["backbone.0"]
    stats = {s.group.root: s for s in static_stats(model, graph)}["backbone.0"]
    rows = w.reshape(4, -1).tolist()
    l1 = get_criterion("l1").score(stats)
    l2 = get_criterion("l2").score(stats)
    assert l1.shape == l2.shape == (g0.channels,)
    for i, row in enumerate(rows):
        assert l1[i].item() == pytest.approx(sum(abs(v) for v in row), rel=1e-6)
        assert l2[i].item() == pytest.approx(math.sqrt(sum(v * v for v in row)), rel=1e-6)

    zoo = zoo_model()
    zgraph = PruningGraph(zoo, torch.zeros(1, 3, 32, 40))
    group = by_root(zgraph)["backbone.conv1"]
    assert len(group.producers) >= 3  # stem + the residual blocks of layer1 share these channels
    zstats = {s.group.root: s for s in static_stats(zoo, zgraph)}["backbone.conv1"]
    hand = sum(zoo.get_submodule(n).weight.detach().abs().flatten(1).sum(1) for n in group.producers)
    torch.testing.assert_close(get_criterion("l1").score(zstats), hand)


def test_bn_scale_is_abs_gamma_and_needs_a_norm() -> None:
    """bn_scale = |γ|; a group without a normalisation layer is not a candidate."""
    model = tiny()
    graph = PruningGraph(model, tiny_batch()[0][:1])
    scores = criterion_scores(model, graph, get_criterion("bn_scale"))
    roots = by_root(graph)
    assert set(scores) == {roots["backbone.0"].index}  # backbone.3 has no BN
    assert scores[roots["backbone.0"].index].tolist() == pytest.approx([2.0, 0.5, 3.0, 0.1])


def test_random_scores_are_seeded() -> None:
    """Same seed, same scores; another seed, other scores."""
    model = zoo_model()
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 40))
    stats = static_stats(model, graph)

    def run(seed: int) -> list[Tensor]:
        crit = get_criterion("random", seed=seed)
        return [crit.score(s) for s in stats]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(x.shape == (s.group.channels,) for x, s in zip(a, stats, strict=True))


# ---------------------------------------------------------------- data-driven criteria, by hand
def test_taylor_matches_hand_hooks_and_linearity() -> None:
    """taylor = (Σ a·∂L/∂a)² of the summed loss (one hand backward), = (Σ_t s_t)² of the per-task terms."""
    model = tiny()
    x, targets = tiny_batch()
    graph = PruningGraph(model, x[:1])
    roots = by_root(graph)
    gates = {"backbone.0": "backbone.1", "backbone.3": "backbone.3"}  # each filter's gate: its BN, else its conv
    assert {r: roots[r].gates for r in gates} == {r: [g] for r, g in gates.items()}
    tasks = ["a", "b", "c"]

    summed = hand_gate_taylor(model, x, targets, tasks, list(gates.values()))
    per_task = {t: hand_gate_taylor(model, x, targets, [t], list(gates.values())) for t in tasks}

    engine = StatisticsEngine(model, graph, TINY_LOSSES, [Taylor(), TaskTaylor()])
    model.eval()
    engine.run([(x, targets)])
    taylor = Taylor().finalize(engine.averaged(Taylor()))
    raw_task = engine.averaged(TaskTaylor())
    for root, gate in gates.items():
        k = roots[root].index
        torch.testing.assert_close(taylor[k], summed[gate].pow(2), rtol=1e-4, atol=1e-10)
        linear = sum(per_task[t][gate] for t in tasks)
        torch.testing.assert_close(linear, summed[gate], rtol=1e-4, atol=1e-7)  # linearity, by hand
        torch.testing.assert_close(taylor[k], linear.pow(2), rtol=1e-4, atol=1e-10)
        for t in tasks:
            torch.testing.assert_close(raw_task[k][t], per_task[t][gate].pow(2), rtol=1e-4, atol=1e-10)
    assert any(taylor[k].max() > 0 for k in taylor)


def test_taylor_scores_average_over_batches() -> None:
    """Batch scores are averaged over the batches of the interval (squared per batch, then averaged)."""
    model = tiny()
    batches = [tiny_batch(3), tiny_batch(4)]
    graph = PruningGraph(model, batches[0][0][:1])
    k = by_root(graph)["backbone.0"].index
    hand = [hand_gate_taylor(model, x, t, ["a", "b", "c"], ["backbone.1"])["backbone.1"].pow(2) for x, t in batches]
    scores = criterion_scores(model, graph, Taylor(), data=batches, losses=TINY_LOSSES)
    torch.testing.assert_close(scores[k], (hand[0] + hand[1]) / 2, rtol=1e-4, atol=1e-10)


def test_disparse_batch_score_is_per_task_snip() -> None:
    """S_t(i) = Σ |∂L_t/∂W_i ⊙ W_i|, per task, from one forward and T backward passes."""
    model = tiny()
    x, targets = tiny_batch()
    graph = PruningGraph(model, x[:1])
    k = by_root(graph)["backbone.0"].index
    engine = StatisticsEngine(model, graph, TINY_LOSSES, [DiSparseStructured()])
    model.eval()
    engine.run([(x, targets)])
    raw = engine.averaged(DiSparseStructured())[k]
    w = model.backbone[0].weight.detach()
    for t in ("a", "b", "c"):
        hand = (hand_weight_grad(model, x, targets, t, "backbone.0") * w).abs().flatten(1).sum(1)
        torch.testing.assert_close(raw[t], hand, rtol=1e-4, atol=1e-10)


def test_cosprune_matches_hand_cosines() -> None:
    """CosPrune's c(i) = mean pairwise cosine of the per-task weight-gradient rows, by hand."""
    model = tiny()
    x, targets = tiny_batch()
    graph = PruningGraph(model, x[:1])
    scores = criterion_scores(model, graph, CosPrune(), data=[(x, targets)], losses=TINY_LOSSES)
    for root in ("backbone.0", "backbone.3"):
        grads = [hand_weight_grad(model, x, targets, t, root).flatten(1) for t in ("a", "b", "c")]
        hand = []
        for i in range(grads[0].shape[0]):
            cos = [float(F.cosine_similarity(grads[a][i], grads[b][i], dim=0))
                   for a, b in itertools.combinations(range(3), 2)]
            hand.append(sum(cos) / 3)
        assert scores[by_root(graph)[root].index].tolist() == pytest.approx(hand, abs=1e-5)


class Conflict(nn.Module):
    """A shared 2-filter conv read by two linear 1x1 heads: head a weighs the filters (1, 1), head b (1, -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.heads = nn.ModuleDict({"a": nn.Conv2d(2, 1, 1, bias=False), "b": nn.Conv2d(2, 1, 1, bias=False)})
        with torch.no_grad():
            self.heads["a"].weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
            self.heads["b"].weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.shared(x)
        return {k: h(f) for k, h in self.heads.items()}


def test_cosprune_prunes_the_conflicting_filter() -> None:
    """Filter 0's task gradients agree, filter 1's are opposite: filter 1 scores lower and is removed."""
    torch.manual_seed(0)
    model = Conflict()
    gen = torch.Generator().manual_seed(5)
    data = [(torch.rand(2, 3, 5, 5, generator=gen), {"a": torch.zeros(1), "b": torch.zeros(1)}) for _ in range(2)]
    losses = {"a": lambda p, t: p.mean(), "b": lambda p, t: p.mean()}  # ∂L/∂W_shared[i] ∝ head weight i
    x = data[0][0]
    graph = PruningGraph(model, x[:1], min_channels=1)
    assert [g.root for g in graph.groups] == ["shared"]
    scores = criterion_scores(model, graph, CosPrune(), data=data, losses=losses)[0]
    assert scores[1] < scores[0]
    assert scores.tolist() == pytest.approx([1.0, -1.0], abs=1e-5)
    kept_row = model.shared.weight.detach()[0].clone()
    mtprune.prune(model, x, "cosprune", channel_ratio=0.5, data=data, losses=losses, min_channels=1)
    assert model.shared.out_channels == 1
    assert torch.equal(model.shared.weight.detach()[0], kept_row)


def test_mean_pairwise_cosine_three_tasks() -> None:
    """mean_pairwise_cosine for T=3 equals the mean of the three row-wise cosines computed by hand."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    grads[2][1] = -grads[0][1]  # one row with an exact conflict between tasks 0 and 2
    got = mean_pairwise_cosine(grads)
    for i in range(5):
        rows = [g[i].tolist() for g in grads]
        cos = []
        for a, b in ((0, 1), (0, 2), (1, 2)):
            dot = sum(u * v for u, v in zip(rows[a], rows[b], strict=True))
            cos.append(dot / math.sqrt(sum(u * u for u in rows[a]) * sum(v * v for v in rows[b])))
        assert got[i].item() == pytest.approx(sum(cos) / 3, abs=1e-6)


def test_cosprune_only_scores_backbone_groups() -> None:
    """Head groups (one task's gradient only) are never cosprune candidates, and keep their width."""
    model = zoo_model()
    x = zoo_batches(1)[0][0]
    graph = PruningGraph(model, x[:1])
    heads = {g.root: g.channels for g in graph.groups if g.part != "backbone"}
    assert heads  # the conv heads' hidden layers are prunable groups
    report = mtprune.prune(model, x, "cosprune", channel_ratio=0.3, data=zoo_batches(1), losses=ZOO_TASKS,
                           batches=1)
    assert {r: report.widths_after[r] for r in heads} == heads
    backbone = [r for r in report.widths_before if r not in heads]
    assert sum(report.widths_before[r] - report.widths_after[r] for r in backbone) == report.removed > 0


# ---------------------------------------------------------------- aggregation rules
def _group(index: int, channels: int, part: str = "backbone") -> ChannelGroup:
    return ChannelGroup(index=index, root=f"g{index}", channels=channels, producers=[f"g{index}"], consumers=[],
                        norms=[], gates=[f"g{index}"], part=part)


def test_task_taylor_aggregates() -> None:
    """max keeps a filter vital to one task over one mildly useful to all; min the reverse; mean in between."""
    tasks = ("A", "B", "C")
    # group 0 (shared): ch0 vital to A only, ch1 mildly useful to all, ch2/ch3 vital to B/C only
    shared = {"A": [10.0, 1.0, 0.01, 0.01], "B": [0.01, 1.0, 10.0, 0.01], "C": [0.01, 1.0, 0.01, 10.0]}
    head = {"A": [2.0, 4.0], "B": [0.0, 0.0], "C": [0.0, 0.0]}  # group 1: task A's head, untouched by B, C
    averaged = {0: {t: torch.tensor(v) for t, v in shared.items()}, 1: {t: torch.tensor(v) for t, v in head.items()}}
    scale = {t: (sum(shared[t]) + sum(head[t])) / (4 + (2 if t == "A" else 0)) for t in tasks}
    norm = [[shared[t][i] / scale[t] for t in tasks] for i in range(4)]

    out = {agg: TaskTaylor(aggregate=agg).finalize(copy.deepcopy(averaged)) for agg in ("max", "min", "mean")}
    assert out["max"][0].tolist() == pytest.approx([max(r) for r in norm], rel=1e-5)
    assert out["min"][0].tolist() == pytest.approx([min(r) for r in norm], rel=1e-5)
    assert out["mean"][0].tolist() == pytest.approx([sum(r) / 3 for r in norm], rel=1e-5)
    for agg in out:  # a head group is scored by its own task only, whatever the aggregate
        assert out[agg][1].tolist() == pytest.approx([2.0 / scale["A"], 4.0 / scale["A"]], rel=1e-5)

    groups = [_group(0, 4)]
    only = {0: out["max"][0]}
    assert plan_removal(groups, only, 0.25, min_channels=1) == {0: [1]}  # max: the all-round filter goes
    only = {0: out["min"][0]}
    assert 1 not in plan_removal(groups, only, 0.75, min_channels=1)[0]  # min: the all-round filter stays
    assert out["min"][0][0] < out["mean"][0][0] < out["max"][0][0]
    with pytest.raises(ValueError, match="aggregate"):
        TaskTaylor(aggregate="median")


def test_disparse_union_of_per_task_top_k() -> None:
    """Kept set == union over tasks of each task's top-k (k = q · channels the task reaches)."""
    gen = torch.Generator().manual_seed(7)
    groups = [_group(0, 4), _group(1, 6), _group(2, 2, "A"), _group(3, 2, "B")]
    averaged: dict[int, dict[str, Tensor]] = {}
    for g in groups:
        averaged[g.index] = {}
        for t in ("A", "B"):
            reached = g.part in ("backbone", t)
            averaged[g.index][t] = torch.rand(g.channels, generator=gen) + 0.1 if reached else torch.zeros(g.channels)
    best = DiSparseStructured().finalize(copy.deepcopy(averaged))

    q = 0.5
    union: set[tuple[int, int]] = set()
    tops = {}
    for t in ("A", "B"):
        flat = [(averaged[g.index][t][i].item(), (g.index, i)) for g in groups for i in range(g.channels)
                if averaged[g.index][t].sum() > 0]
        assert len(flat) == 12
        tops[t] = {key for _, key in sorted(flat, reverse=True)[: int(q * len(flat))]}
        union |= tops[t]
    assert len(tops["A"]) < len(union) < len(tops["A"]) + len(tops["B"])  # the tasks overlap, partly

    total = sum(g.channels for g in groups)
    plan = plan_removal(groups, best, 1 - len(union) / total, min_channels=1)
    removed = {(k, i) for k, idxs in plan.items() for i in idxs}
    kept = {(g.index, i) for g in groups for i in range(g.channels)} - removed
    assert kept == union


# ---------------------------------------------------------------- the statistics engine
def test_engine_one_forward_and_t_backward_per_batch() -> None:
    """Per batch: exactly one forward of the model (and backbone) and one backward per task, for T=3."""
    model = tiny()
    graph = PruningGraph(model, tiny_batch()[0][:1])
    forwards = {"model": 0, "backbone": 0}
    model.register_forward_hook(lambda *a: forwards.__setitem__("model", forwards["model"] + 1))
    model.backbone.register_forward_hook(lambda *a: forwards.__setitem__("backbone", forwards["backbone"] + 1))
    backwards = {t: 0 for t in TINY_LOSSES}

    def counted(task: str):
        def loss(pred: Tensor, target: Tensor) -> Tensor:
            value = F.mse_loss(pred, target)
            value.register_hook(lambda g: backwards.__setitem__(task, backwards[task] + 1))
            return value
        return loss

    engine = StatisticsEngine(model, graph, {t: counted(t) for t in TINY_LOSSES},
                              [Taylor(), CosPrune(), DiSparseStructured(), TaskTaylor()])
    model.eval()
    engine.run([tiny_batch(3), tiny_batch(4)])
    assert engine.batches == 2
    assert forwards == {"model": 2, "backbone": 2}
    assert backwards == {"a": 2, "b": 2, "c": 2}


def test_nan_loss_is_refused_naming_the_task() -> None:
    """A non-finite loss stops pruning with an input error that names its task."""
    model = tiny()
    x, targets = tiny_batch()
    losses = {**TINY_LOSSES, "b": lambda p, t: p.mean() * float("nan")}
    with pytest.raises(MTPruneInputError, match="'b'"):
        mtprune.prune(model, x, "taylor", channel_ratio=0.3, data=[(x, targets)], losses=losses, min_channels=1)


@pytest.mark.parametrize("name", ["taylor", "cosprune"])
def test_nan_statistics_are_refused_naming_the_task(name: str) -> None:
    """A finite loss with NaN gradients (√ at 0) must not decide a pruning step; the error names the task."""
    model = tiny()
    x, targets = tiny_batch()
    losses = {**TINY_LOSSES, "c": lambda p, t: torch.sqrt(((p - p.detach()) ** 2).sum())}
    widths = [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)]
    with pytest.raises(MTPruneInputError, match="'c'"):
        mtprune.prune(model, x, name, channel_ratio=0.3, data=[(x, targets)], losses=losses, min_channels=1)
    assert [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)] == widths  # nothing was pruned


def test_frozen_layers_get_statistics_and_stay_frozen() -> None:
    """A frozen backbone is scored like a trainable one, and its requires_grad flags are restored."""
    model = tiny()
    x, targets = tiny_batch()
    frozen = copy.deepcopy(model)
    frozen.backbone.requires_grad_(False)
    for crit in (Taylor(), CosPrune()):
        graph, fgraph = PruningGraph(model, x[:1]), PruningGraph(frozen, x[:1])
        want = criterion_scores(model, graph, crit, data=[(x, targets)], losses=TINY_LOSSES)
        got = criterion_scores(frozen, fgraph, crit, data=[(x, targets)], losses=TINY_LOSSES)
        assert set(got) == set(want) and all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-12) for k in want)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.heads.parameters())


class CatAdd(nn.Module):
    """cat([a(x), b(x)]) + c(x): channels 4..7 of c belong to b's channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 3, padding=1)
        self.heads = nn.ModuleDict({"u": nn.Conv2d(6, 2, 1), "v": nn.Conv2d(6, 1, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = F.relu(self.mid(F.relu(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))))
        return {k: h(f) for k, h in self.heads.items()}


def test_statistics_follow_channel_maps_through_concat() -> None:
    """A producer that reaches a group through a concat contributes its mapped rows (l1, SNIP and Taylor)."""
    torch.manual_seed(0)
    model = CatAdd()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    targets = {"u": torch.randn(2, 2, 6, 6, generator=gen), "v": torch.randn(2, 1, 6, 6, generator=gen)}
    losses = {"u": F.mse_loss, "v": F.mse_loss}
    graph = PruningGraph(model, x[:1], min_channels=1)
    gb = by_root(graph)["b"]
    assert gb.producers == ["b", "c"]
    rows = lambda w: w.detach().flatten(1)  # noqa: E731
    l1 = criterion_scores(model, graph, get_criterion("l1"))[gb.index]
    torch.testing.assert_close(l1, rows(model.b.weight).abs().sum(1) + rows(model.c.weight)[4:].abs().sum(1))

    engine = StatisticsEngine(model, graph, losses, [DiSparseStructured()])
    model.eval()
    engine.run([(x, targets)])
    raw = engine.averaged(DiSparseStructured())[gb.index]
    for t in ("u", "v"):
        model.zero_grad(set_to_none=True)
        out = model(x)
        losses[t](out[t], targets[t]).backward()
        hand = ((model.b.weight.grad * model.b.weight).abs().flatten(1).sum(1)
                + (model.c.weight.grad * model.c.weight).abs().flatten(1)[4:].sum(1))
        torch.testing.assert_close(raw[t], hand.detach(), rtol=1e-4, atol=1e-10)
    acts = hand_gate_taylor(model, x, targets, ["u", "v"], ["b", "c"], losses)
    taylor = criterion_scores(model, graph, Taylor(), data=[(x, targets)], losses=losses)[gb.index]
    torch.testing.assert_close(taylor, (acts["b"] + acts["c"][4:]).pow(2), rtol=1e-4, atol=1e-10)
    for name in sorted(set(CRITERIA) - {"bn_scale"}):  # no BatchNorm here
        trial = copy.deepcopy(model)
        mtprune.prune(trial, x, name, channel_ratio=0.3, data=[(x, targets)], losses=losses, min_channels=1)
        trial(x)["u"].sum().backward()


def test_a_criterion_that_applies_to_no_group_says_why_and_changes_nothing():
    from torch import nn

    import mtprune

    class NoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
            self.a, self.b = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = self.c2(self.c1(x).relu()).relu()
            return {"a": self.a(h), "b": self.b(h)}

    torch.manual_seed(0)
    model, x = NoNorm(), torch.randn(1, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MTPruneInputError, match="'bn_scale' applies to none of this model's 2 channel groups "
                                                r"\(it scores a group by its normalisation layer's scale"):
        mtprune.prune(model, x, "bn_scale", target_macs=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
