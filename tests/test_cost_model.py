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


class _Layers(torch.nn.Module):
    """Every conv/linear variant the recorded count must cost as FlopCounterMode does: strided, dilated, grouped,
    depthwise, reflect-padded, 'same'-padded, transposed and 1-d convs, and Linear layers on pooled vectors and on
    tokens."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.refl = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(8, 8, 4, padding="same")
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.line = nn.Conv1d(6, 6, 3, padding=1)
        self.tok = nn.Linear(6, 12)
        self.heads = nn.ModuleDict({"seg": nn.Conv2d(8, 3, 1), "cls": nn.Linear(12, 4)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.stem(x)
        f = f + self.dil(f) + self.grouped(f) + self.dw(f) + self.refl(f) + self.same(f)
        u = self.up(f)  # [1, 6, 16, 16]
        t = self.line(u.flatten(2)).transpose(1, 2)  # tokens [1, 256, 6]
        return {"seg": self.heads.seg(f), "cls": self.heads.cls(self.tok(t).mean(1))}


def test_traced_count_equals_flop_counter_on_cnns() -> None:
    """The fast path: ``prune``'s graph counts the MACs in the forward it traces, so the cost model needs no
    forward of its own; per layer, MACs and shapes equal the FlopCounterMode count (``layer_macs``) exactly."""
    from mtprune.measure import layer_macs
    from mtprune.pruning.cost import layer_costs

    torch.manual_seed(0)
    cases = [(_Layers().eval(), torch.zeros(1, 3, 16, 16)), (zoo_model(), torch.zeros(1, 3, 32, 40))]
    for model, x in cases:
        graph = PruningGraph(model, x, record_layers=True)
        record = graph.layer_record
        assert record is not None and record.describes(model, x)
        assert record.macs == layer_macs(model, x)[0]
        assert layer_costs(model, x, graph) == layer_costs(model, x, None)  # MACs and shapes
        assert PruningGraph(model, x).layer_record is None  # recorded only when asked


def test_traced_count_is_used_only_when_it_describes_the_model(monkeypatch) -> None:
    """A record traced on more than one sample, or before the model changed, is not used: the cost model counts."""
    from mtprune.pruning import cost as cost_module

    counted = []
    real = cost_module.layer_macs
    monkeypatch.setattr(cost_module, "layer_macs", lambda *a: counted.append(1) or real(*a))
    torch.manual_seed(0)
    model = _Layers().eval()
    x = torch.zeros(1, 3, 16, 16)
    graph = PruningGraph(model, x, record_layers=True)
    CostModel(model, x, graph)
    assert counted == []  # the traced forward's count
    CostModel(model, torch.zeros(2, 3, 16, 16), graph)  # per-sample MACs, as traced on one sample
    assert counted == []
    x2 = torch.zeros(2, 3, 16, 16)
    CostModel(model, x2, PruningGraph(model, x2, record_layers=True))  # traced on a batch of 2: not per sample
    assert counted == [1]
    graph.prune({graph.groups[0].index: [0, 1]})
    assert graph.layer_record is None  # the re-trace after pruning records nothing
    stale = PruningGraph(model, x, record_layers=True).layer_record
    with torch.no_grad():
        model.heads.seg.weight = torch.nn.Parameter(model.heads.seg.weight[:2].clone())
    assert not stale.describes(model, x)  # a layer changed shape since


def test_attention_keeps_the_exact_count(monkeypatch) -> None:
    """Calls that use no weight (attention matmuls) make the record unusable: the cost model runs the exact
    FlopCounterMode count, so attention MACs are still counted and still scale with the head widths."""
    from mtprune.pruning import cost as cost_module

    counted = []
    real = cost_module.layer_macs
    monkeypatch.setattr(cost_module, "layer_macs", lambda *a: counted.append(1) or real(*a))

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Conv2d(3, 16, 4, stride=4)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(16, 3), "b": torch.nn.Linear(16, 2)})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = t + self.attn(t, t, t, need_weights=False)[0]
            return {k: h(t.mean(1)) for k, h in self.heads.items()}

    torch.manual_seed(0)
    model = Attn().eval()
    x = torch.zeros(1, 3, 16, 16)
    graph = PruningGraph(model, x, record_layers=True)
    assert graph.layer_record is not None and not graph.layer_record.weighted
    cost = CostModel(model, x, graph)
    assert counted == [1]
    assert (cost.params_total, cost.macs_total) == count(model, x)
    # in_proj (T x 16 x 48, its own weight) and QK^T, AV (2 x T x T x 16, no weight: the module's), T = 16 tokens
    assert cost.layers["attn"].macs == 16 * 16 * 48 + 2 * 16 * 16 * 16


def test_global_allocation_equals_the_greedy_ranking() -> None:
    """The bisection's per-trial allocation (``allocate._global_counts``, vectorised; ``_lowest``, numpy's sort)
    takes exactly the channels the greedy walk takes: lowest score first, a group skipped once it reaches its cap,
    ties in order."""
    from types import SimpleNamespace

    from mtprune.pruning.allocate import _cap, _global_counts, _lowest

    def greedy(pool, scores, fraction, min_channels):
        target = int(round(fraction * sum(g.channels for g in pool)))
        if target <= 0:
            return {}
        values = torch.cat([scores[g.index] for g in pool])
        owner = [i for i, g in enumerate(pool) for _ in range(g.channels)]
        counts, taken = [0] * len(pool), 0
        for pos in torch.argsort(values, stable=True).tolist():
            i = owner[pos]
            if counts[i] < _cap(pool[i], min_channels) and taken < target:
                counts[i] += 1
                taken += 1
        return {g.index: c for g, c in zip(pool, counts, strict=True)}

    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        pool = [SimpleNamespace(index=i, channels=int(torch.randint(1, 30, (1,), generator=gen)))
                for i in range(int(torch.randint(1, 7, (1,), generator=gen)))]
        scores = {g.index: torch.randint(0, 4, (g.channels,), generator=gen).float() for g in pool}  # many ties
        fraction, floor = float(torch.rand(1, generator=gen)), int(torch.randint(0, 6, (1,), generator=gen))
        assert _global_counts(pool, scores, fraction, "none", floor) == greedy(pool, scores, fraction, floor)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):  # each group's lowest channels: torch's order
        values = torch.tensor([1.0, float("nan"), -0.0, 0.0, -1.0, 1.0, float("-inf"), 0.0]).to(dtype)
        for k in range(len(values) + 1):
            assert _lowest(values, k) == sorted(torch.argsort(values, stable=True)[:k].tolist())
