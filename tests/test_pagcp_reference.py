"""PAGCP as the authors' code does it (HankYe/PAGCP ``prune/sensitivity.py``; Ye et al., TPAMI 2023):

- the order of the layers and θ are paired so that the layers saving the most MACs get the largest θ (ascending
  order when λ > 1, descending when λ ≤ 1);
- θ advances only after a layer is actually pruned;
- the optional top-P ranking ``ranking="total_loss"``: total absolute loss increase ÷ MACs saved in sequence,
  keeping ``int(P × layers probed)``;

and the package layout: no import cycle among ``mtprune.pruning``'s modules.

The ratio searches run against a fake probe whose losses are a known function of the masked fractions, so the
expected decisions are computed by hand; one end-to-end round uses the real masked probe.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtprune.config import PAGCPSection
from mtprune.pruning.criteria import get_criterion
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.pagcp import (
    README_SETTINGS,
    LayerProbe,
    MacsModel,
    PAGCPSettings,
    pagcp,
    probe_order,
    probe_round,
    select_top,
    theta_schedule,
)
from mtprune.pruning.prune import criterion_scores


class Net(nn.Module):
    """Three shared convs of different widths and two heads with a hidden conv each: five prunable groups."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 12, 1)
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(12, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1)),
                                    "b": nn.Sequential(nn.Conv2d(12, 4, 1), nn.ReLU(), nn.Conv2d(4, 1, 1))})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return {t: h(x) for t, h in self.heads.items()}


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class FakeProbe:
    """Task losses from the masked fractions: ``a = 1 + Σ_g w_g · fraction_g``, ``b = 2``; no forward at all."""

    cache = None

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights, self.forwards = weights, 0

    def losses_under(self, groups, plan, stores=None) -> dict[str, float]:
        a = 1.0 + sum(self.weights.get(groups[gi].root, 0.0) * len(idx) / groups[gi].channels
                      for gi, idx in plan.items())
        return {"a": a, "b": 2.0}

    def reference(self, groups, plan, stop_at):
        return self.losses_under(groups, plan), None


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    graph = PruningGraph(model, X, min_channels=1)
    scores = criterion_scores(model, graph, get_criterion("l1"))
    return graph, scores, MacsModel(model, X)


def run(weights: dict[str, float], **settings) -> tuple[list[LayerProbe], float]:
    graph, scores, macs = setup()
    layers, _, lam = probe_round(graph, scores, FakeProbe(weights), macs, PAGCPSettings(**settings), min_channels=1)
    return layers, lam


# ---------------------------------------------------------------- order and θ
def test_probe_order_is_ascending_when_lambda_above_one_and_descending_otherwise():
    items = [("x", 5), ("y", 9), ("z", 1), ("w", 9)]
    assert [i for i, _ in probe_order(items, lambda it: it[1], 1.2)] == ["z", "x", "y", "w"]
    assert [i for i, _ in probe_order(items, lambda it: it[1], 0.8)] == ["y", "w", "x", "z"]  # ties keep order
    assert [i for i, _ in probe_order(items, lambda it: it[1], 1.0)] == ["y", "w", "x", "z"]


def test_layers_saving_the_most_macs_get_the_largest_theta():
    layers, lam = run({}, budget=1.5)  # θ0 = half the uniform allowance: λ > 1
    assert len(layers) == 5 and lam > 1 and all(layer.removed > 0 for layer in layers)
    saved = [layer.probe_macs_saved for layer in layers]
    assert saved == sorted(saved) and saved[0] < saved[-1]  # ascending: the old order was descending
    biggest = max(layers, key=lambda layer: layer.probe_macs_saved)
    assert biggest.theta == max(layer.theta for layer in layers) > min(layer.theta for layer in layers)

    uniform = 1.5 ** (1 / 5) - 1
    layers, lam = run({}, budget=1.5, theta0=2 * uniform)  # θ0 above the uniform allowance: λ < 1
    assert lam < 1
    saved = [layer.probe_macs_saved for layer in layers]
    assert saved == sorted(saved, reverse=True)
    assert layers[0].theta == 2 * uniform == max(layer.theta for layer in layers)


def test_theta_advances_only_after_a_layer_is_pruned():
    layers, _ = run({}, budget=1.5)
    second = layers[1].root
    layers, lam = run({second: 100.0}, budget=1.5)  # masking the second layer at all violates at once
    schedule, lam2 = theta_schedule(None, 5, 1.5)
    assert lam == lam2
    assert [layer.removed > 0 for layer in layers] == [True, False, True, True, True]
    assert layers[1].stopped == "violation" and layers[1].removed == 0
    assert [layer.theta for layer in layers] == [schedule[0], schedule[1], schedule[1], schedule[2], schedule[3]]
    assert math.prod(1 + layer.theta for layer in layers if layer.removed) <= 1.5


# ---------------------------------------------------------------- top-P ranking
def probe(order: int, *, delta_loss: float, delta_total_loss: float, macs: int, removed: int = 4) -> LayerProbe:
    return LayerProbe(root=f"g{order}", part="backbone", channels=8, order=order, probe_macs_saved=macs, theta=0.1,
                      ratio=0.5 if removed else 0.0, removed=removed, loss_ratio={"a": 1 + delta_loss},
                      delta_loss=delta_loss, delta_macs=macs, trials=3, stopped="violation",
                      delta_total_loss=delta_total_loss, sequence_macs=macs if removed else 0)


def test_total_loss_ranking_differs_from_the_worst_task_ranking():
    # g0: small worst-task increase but large total increase; g1 the reverse; g2 not pruned
    records = [probe(0, delta_loss=0.01, delta_total_loss=5.0, macs=100),
               probe(1, delta_loss=0.02, delta_total_loss=1.0, macs=100),
               probe(2, delta_loss=0.0, delta_total_loss=0.0, macs=0, removed=0)]
    assert [r.root for r in select_top(records, 0.6)] == ["g0", "g1"]  # ceil(0.6 × 2 pruned)
    assert [r.root for r in select_top(records, 0.6, "total_loss")] == ["g1"]  # int(0.6 × 3 probed)
    assert [r.root for r in select_top(records, 1.0, "total_loss")] == ["g1", "g0"]
    assert select_top(records, 0.3, "total_loss") == []  # int(0.3 × 3) = 0, as the authors' get_ratio


def test_total_loss_and_sequence_macs_are_measured_in_sequence():
    weights = {"c1": 0.003, "c2": 0.001, "c3": 0.002, "heads.a.0": 0.004, "heads.b.0": 0.0005}
    graph, scores, macs = setup()
    layers, start, _ = probe_round(graph, scores, FakeProbe(weights), macs, PAGCPSettings(budget=1.5),
                                   min_channels=1)
    assert all(layer.removed for layer in layers)
    for layer in layers:  # the summed losses' absolute increase at the kept ratio
        assert layer.delta_total_loss == pytest.approx(weights[layer.root] * layer.removed / layer.channels)
    plan = {layer.index: layer.order_of_removal[:layer.removed] for layer in layers}
    assert sum(layer.sequence_macs for layer in layers) == macs.total - macs.after(graph.groups, plan)
    assert any(layer.sequence_macs != layer.delta_macs for layer in layers)  # in sequence ≠ alone
    by_hand = sorted(layers, key=lambda r: (r.delta_total_loss / r.sequence_macs, r.order))[:int(0.6 * 5)]
    assert select_top(layers, 0.6, "total_loss") == by_hand


def test_total_loss_ranking_end_to_end_and_in_the_config():
    torch.manual_seed(1)
    model = Net()
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 8, 8, generator=gen), {"a": torch.randint(0, 3, (2, 8, 8), generator=gen),
                                                          "b": torch.rand(2, 1, 8, 8, generator=gen)})
               for _ in range(2)]
    losses = {"a": lambda p, t: F.cross_entropy(p, t), "b": lambda p, t: (p - t).abs().mean()}
    settings = {"budget": 1.3, "rounds": 1, "top_p": 0.6, "ranking": "total_loss", "held_out_batches": 2}
    report, _ = pagcp(model, X, "l1", data=batches, losses=losses, settings=settings, min_channels=1)
    (rnd,) = report.rounds
    assert report.settings["ranking"] == "total_loss"
    pruned = [layer for layer in rnd.layers if layer.removed]
    expected = sorted(pruned, key=lambda r: (r.total_loss_per_mac, r.order))[:int(0.6 * len(rnd.layers))]
    assert {layer.root for layer in rnd.layers if layer.selected} == {r.root for r in expected} - set(rnd.dropped)
    assert PAGCPSection(ranking="total_loss").ranking == "total_loss"
    with pytest.raises(ValueError, match="ranking"):
        PAGCPSection(ranking="best")
    cfg = PAGCPSettings(**README_SETTINGS)  # the authors' README command
    assert (cfg.theta0, cfg.budget, cfg.top_p, cfg.ranking, len(cfg.ratios)) == (0.06, 6.0, 0.8, "total_loss", 19)


# ---------------------------------------------------------------- package layout
def _imports(path: Path, module: str, package: bool) -> set[str]:
    """Modules of ``mtprune`` that ``path`` imports anywhere (module level or inside functions)."""
    base = module.split(".") if package else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (base[:len(base) - node.level + 1] if node.level else []) + (node.module or "").split(".")
            parts = [p for p in parts if p]
            target = ".".join(parts)
            for alias in node.names:
                out.add(f"{target}.{alias.name}")
            out.add(target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m.startswith("mtprune")}


def test_no_import_cycle_among_the_pruning_modules():
    root = Path(__file__).resolve().parents[1] / "src"
    files = {}
    for path in (root / "mtprune" / "pruning").rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        package = rel.name == "__init__"
        name = ".".join(rel.parts[:-1] if package else rel.parts)
        files[name] = (path, package)
    graph = {m: {t for t in _imports(p, m, pkg) if t in files and t != m} for m, (p, pkg) in files.items()}
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}  # a package's own parent
    assert "mtprune.pruning.prune" in graph["mtprune.pruning.pagcp.rounds"]  # the walk sees function-level imports

    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*path[path.index(t):], t])
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert "mtprune.pruning.pagcp" not in graph["mtprune.pruning.prune"]
