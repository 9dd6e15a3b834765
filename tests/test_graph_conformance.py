"""Conformance of the Torch-Pruning adapter (mtprune.pruning.graph; Fang et al., DepGraph, CVPR 2023).

Each tiny multi-task model below exercises one wiring pattern: a shared backbone with dense and classification
heads, concatenated skips, residual adds with a downsample shortcut, ASPP heads with summed branches, and a
flatten into a Linear layer. For every one: output predictors are protected automatically, ~30% of every group is
pruned at random, and the pruned model must still run forward and backward with unchanged outputs, keep its
train/eval flags and frozen parameters, report its widths, and be rebuilt exactly from those widths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtprune.pruning.graph import ChannelGroup, PruningGraph, apply_widths
from mtprune.utils.errors import MTPruneInputError


# ---------------------------------------------------------------- tiny models
class MT(nn.Module):
    """MultiTaskModel-style: ``self.backbone`` and ``self.heads`` (ModuleDict); dense outputs optionally upsampled."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], upsample: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.upsample = upsample

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        feats = self.backbone(x)
        out = {}
        for name in tasks or list(self.heads):
            y = self.heads[name](feats)
            if self.upsample and y.dim() == 4:
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out[name] = y
        return out


def cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def shared_three_heads() -> MT:
    backbone = nn.Sequential(*cbr(3, 8), *cbr(8, 16, 2), *cbr(16, 16))
    backbone[2] = nn.ReLU(inplace=True)  # in-place activations must not confuse tracing
    heads = {
        "seg": nn.Sequential(*cbr(16, 12), nn.Conv2d(12, 5, 1)),
        "depth": nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1)),
        "cls": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 4)),
    }
    return MT(backbone, heads, upsample=True)


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(*cbr(3, 8))
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), *cbr(8, 16))
        self.dec = nn.Sequential(*cbr(24, 8))

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        up = F.interpolate(self.enc2(e1), scale_factor=2, mode="nearest")
        return self.dec(torch.cat([e1, up], dim=1))


def unet() -> MT:
    heads = {
        "seg": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)),
        "depth": nn.Conv2d(8, 1, 1),
    }
    return MT(UNet(), heads)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + identity)


def residual() -> MT:
    backbone = nn.Sequential(nn.Sequential(*cbr(3, 8)), BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16))
    heads = {
        "seg": nn.Sequential(*cbr(16, 8), nn.Conv2d(8, 3, 1)),
        "depth": nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1)),
    }
    return MT(backbone, heads, upsample=True)


class ASPP(nn.Module):
    """Four dilated branches (conv3x3 → 1x1 → 1x1 predictor), summed: MTLCosPrune's SmallASPP in miniature."""

    def __init__(self, cin: int, cout: int, hidden: int = 12) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cin, hidden, 3, padding=d, dilation=d),
                nn.ReLU(),
                nn.Dropout(0.1),
                nn.Conv2d(hidden, hidden, 1),
                nn.ReLU(),
                nn.Conv2d(hidden, cout, 1),
            )
            for d in (1, 2, 4, 6)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def aspp() -> MT:
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
    return MT(backbone, {"seg": ASPP(16, 5), "depth": ASPP(16, 1)}, upsample=True)


def lenet() -> MT:
    backbone = nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
    )
    return MT(backbone, {"a": nn.Linear(84, 10), "b": nn.Linear(84, 5)})


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1 → depthwise 3x3 → project 1x1, with an identity add."""

    def __init__(self, c: int, expand: int = 3) -> None:
        super().__init__()
        hidden = c * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


def depthwise() -> MT:
    backbone = nn.Sequential(*cbr(3, 8, 2), InvertedResidual(8), InvertedResidual(8))
    return MT(
        backbone, {"seg": nn.Conv2d(8, 4, 1), "normal": nn.Sequential(*cbr(8, 6), nn.Conv2d(6, 3, 1))}, upsample=True
    )


ASPP_PREDICTORS = {f"heads.{t}.branches.{i}.5" for t in ("seg", "depth") for i in range(4)}
CASES: dict[str, tuple[Callable[[], MT], tuple[int, ...], set[str]]] = {
    "shared": (shared_three_heads, (2, 3, 16, 16), {"heads.seg.3", "heads.depth.2", "heads.cls.4"}),
    "unet": (unet, (2, 3, 16, 16), {"heads.seg.2", "heads.depth"}),
    "residual": (residual, (2, 3, 16, 16), {"heads.seg.3", "heads.depth.2"}),
    "aspp": (aspp, (2, 3, 16, 16), ASPP_PREDICTORS),
    "lenet": (lenet, (2, 1, 32, 32), {"heads.a", "heads.b"}),
    "depthwise": (depthwise, (2, 3, 16, 16), {"heads.seg", "heads.normal.3"}),
}


# ---------------------------------------------------------------- helpers
def make(case: str) -> tuple[MT, Tensor, set[str]]:
    factory, shape, predictors = CASES[case]
    torch.manual_seed(0)
    model = factory()
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(1)), predictors


def random_plan(graph: PruningGraph, ratio: float = 0.3, seed: int = 0) -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for g in graph.groups:
        k = min(max(1, int(ratio * g.channels)), g.channels - 1)
        if k > 0:
            plan[g.index] = torch.randperm(g.channels, generator=gen)[:k].tolist()
    return plan


def modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def group_with(graph: PruningGraph, producer: str) -> ChannelGroup:
    found = [g for g in graph.groups if producer in g.producers]
    assert len(found) == 1, f"{producer} is a producer of {len(found)} groups"
    return found[0]


def first_layer(model: MT) -> nn.Module:
    return next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d | nn.Linear))


# ---------------------------------------------------------------- the conformance cycle, on every model
@pytest.mark.parametrize("case", list(CASES))
def test_prune_cycle(case: str) -> None:
    model, x, predictors = make(case)
    modules = dict(model.named_modules())
    stem = first_layer(model)
    stem_name = next(n for n, m in modules.items() if m is stem)
    for p in stem.parameters():  # a frozen layer must still be traced and pruned
        p.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        before = {k: v.shape for k, v in model(x).items()}
    out_channels = {n: modules[n].weight.shape[0] for n in predictors}
    model.train()
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}

    graph = PruningGraph(model, x)
    assert all(modes(model).values()), "tracing must restore train mode"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == frozen
    assert predictors <= set(graph.protected), "output predictors must be protected automatically"
    in_groups = {n for g in graph.groups for n in g.producers + g.norms}
    assert not predictors & in_groups
    assert graph.groups and [g.index for g in graph.groups] == list(range(len(graph.groups)))
    assert stem_name in {g.root for g in graph.groups}, "a frozen layer must still form its group"
    for g in graph.groups:
        assert g.consumers and g.producers[0] == g.root and g.channels == modules[g.root].weight.shape[0]
        assert set(g.gates) <= set(g.producers) | set(g.norms)

    plan = random_plan(graph)
    expected = {g.root: g.channels - len(plan.get(g.index, [])) for g in graph.groups}
    params_before = sum(p.numel() for p in model.parameters())
    graph.prune(plan)

    assert graph.widths() == expected
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert all(modes(model).values()), "pruning must restore train mode"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == frozen, "frozen parameters stay frozen"
    modules = dict(model.named_modules())
    assert modules[stem_name].weight.shape[0] == expected[stem_name]
    assert {n: modules[n].weight.shape[0] for n in predictors} == out_channels
    for g in graph.groups:
        assert g.channels == expected[g.root]

    out = model(x)
    assert {k: v.shape for k, v in out.items()} == before
    sum(v.float().square().mean() for v in out.values()).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n

    fresh, _, _ = make(case)
    apply_widths(fresh, x, graph.widths())
    assert shapes(fresh) == shapes(model)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    model.eval()
    with torch.no_grad():
        a, b = model(x), fresh(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- wiring patterns
def test_shared_backbone_groups_and_parts() -> None:
    model, x, _ = make("shared")
    graph = PruningGraph(model, x)
    assert graph.widths() == {
        "backbone.0": 8,
        "backbone.3": 16,
        "backbone.6": 16,
        "heads.seg.0": 12,
        "heads.depth.0": 8,
        "heads.cls.2": 10,
    }
    last = group_with(graph, "backbone.6")
    assert last.consumers == ["heads.seg.0", "heads.depth.0", "heads.cls.2"]  # pooled → flatten → Linear too
    assert last.norms == ["backbone.7"] and last.gates == ["backbone.7"] and last.part == "backbone"
    assert group_with(graph, "heads.seg.0").part == "seg"
    assert group_with(graph, "heads.depth.0").gates == ["heads.depth.0"]  # no norm: the producer itself
    assert group_with(graph, "heads.cls.2").part == "cls"
    assert {g.part for g in graph.groups} == {"backbone", "seg", "depth", "cls"}


def test_residual_adds_tie_channels_into_one_group() -> None:
    model, x, _ = make("residual")
    graph = PruningGraph(model, x)
    stage1 = group_with(graph, "backbone.0.0")
    assert stage1.producers == ["backbone.0.0", "backbone.1.conv2"]
    assert stage1.norms == ["backbone.0.1", "backbone.1.bn2"] and stage1.gates == stage1.norms
    assert set(stage1.consumers) == {"backbone.1.conv1", "backbone.2.conv1", "backbone.2.downsample.0"}
    stage2 = group_with(graph, "backbone.2.downsample.0")
    assert set(stage2.producers) == {"backbone.2.conv2", "backbone.2.downsample.0", "backbone.3.conv2"}
    assert set(stage2.consumers) == {"backbone.3.conv1", "heads.seg.0", "heads.depth.0"}
    assert len(graph.groups) == 2 + 3 + 2  # two tied stages, three block-internal convs, two head convs
    graph.prune({stage2.index: [0, 5, 7]})
    modules = dict(model.named_modules())
    for n in ("backbone.2.conv2", "backbone.2.downsample.0", "backbone.3.conv2"):
        assert modules[n].out_channels == 13
    assert modules["heads.seg.0"].in_channels == 13
    model(x)


def test_concat_skip_maps_offsets() -> None:
    model, x, _ = make("unet")
    graph = PruningGraph(model, x)
    enc1, enc2 = group_with(graph, "backbone.enc1.0"), group_with(graph, "backbone.enc2.1")
    assert "backbone.dec.0" in enc1.consumers and enc2.consumers == ["backbone.dec.0"]
    assert enc1.in_maps["backbone.dec.0"].local == list(range(8))
    assert enc2.in_maps["backbone.dec.0"].local == list(range(8, 24))
    assert enc2.in_maps["backbone.dec.0"].root == list(range(16))
    graph.prune({enc1.index: [1, 2], enc2.index: [0, 3, 15]})
    assert dict(model.named_modules())["backbone.dec.0"].in_channels == 6 + 13
    model(x)


def test_aspp_summed_predictors_protected_together() -> None:
    model, x, _ = make("aspp")
    graph = PruningGraph(model, x)
    assert set(graph.protected) == ASPP_PREDICTORS
    for task in ("seg", "depth"):
        for i in range(4):
            for layer in (0, 3):  # the hidden convs of every branch are prunable, attributed to the task
                g = group_with(graph, f"heads.{task}.branches.{i}.{layer}")
                assert g.part == task and g.producers == [f"heads.{task}.branches.{i}.{layer}"]
    backbone = group_with(graph, "backbone.2")
    assert len(backbone.consumers) == 8 and backbone.part == "backbone"


def test_flatten_into_linear() -> None:
    model, x, _ = make("lenet")
    graph = PruningGraph(model, x)
    conv = group_with(graph, "backbone.3")
    assert conv.consumers == ["backbone.7"]
    fc_map = conv.in_maps["backbone.7"]
    assert len(fc_map.local) == 400 and fc_map.root.count(3) == 25  # each channel feeds 5x5 flattened features
    assert sorted(fc_map.local[fc_map.root.index(3) :][:25]) == list(range(75, 100))
    graph.prune({conv.index: [0, 9, 15]})
    assert dict(model.named_modules())["backbone.7"].in_features == 13 * 25
    assert model(x)["a"].shape == (2, 10)


def test_depthwise_convs_are_producers() -> None:
    model, x, _ = make("depthwise")
    graph = PruningGraph(model, x)
    inner = group_with(graph, "backbone.3.conv.0")
    assert inner.producers == ["backbone.3.conv.0", "backbone.3.conv.3"]  # weight dim 0 indexes the channel
    assert inner.consumers == ["backbone.3.conv.6"] and inner.gates == ["backbone.3.conv.1", "backbone.3.conv.4"]
    trunk = group_with(graph, "backbone.0")  # tied by the two identity adds
    assert trunk.producers == ["backbone.0", "backbone.3.conv.6", "backbone.4.conv.6"]
    with pytest.raises(ValueError, match="depthwise"):
        graph.prune({inner.index: list(range(inner.channels - 1))})
    graph.prune({inner.index: list(range(inner.channels - 2))})
    dw = dict(model.named_modules())["backbone.3.conv.3"]
    assert dw.in_channels == dw.out_channels == dw.groups == 2
    model(x)


def test_groupnorm_width_must_divide() -> None:
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU())
    model, x = MT(backbone, {"seg": nn.Conv2d(8, 2, 1)}), torch.randn(1, 3, 8, 8)
    graph = PruningGraph(model, x)
    assert graph.groups[0].norms == ["backbone.1"]
    with pytest.raises(ValueError, match="GroupNorm"):
        graph.prune({0: [0, 1, 2]})
    graph.prune({0: [0, 1, 2, 3]})
    assert model(x)["seg"].shape == (1, 2, 8, 8)


def test_untraced_layers_warn() -> None:
    model, x, _ = make("unet")
    model.heads["unused"] = nn.Conv2d(8, 2, 1)
    with pytest.warns(UserWarning, match="heads.unused"):
        PruningGraph(_SkipHead(model, "unused"), x)


class _SkipHead(nn.Module):
    """Runs every head but one: that head's layer is never traced."""

    def __init__(self, model: MT, skip: str) -> None:
        super().__init__()
        self.model, self.skip = model, skip

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.model(x, tasks=[t for t in self.model.heads if t != self.skip])


# ---------------------------------------------------------------- contract and errors
def test_tensor_output_refused_and_model_left_clean() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    model.train()
    with pytest.raises(MTPruneInputError, match="dict"):
        PruningGraph(model, torch.randn(1, 3, 8, 8))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules()), "no tracing hooks may be left behind"

    class Listy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: Tensor) -> dict[str, object]:
            return {"seg": [self.conv(x)]}

    with pytest.raises(MTPruneInputError):
        PruningGraph(Listy(), torch.randn(1, 3, 8, 8))


def test_exception_in_forward_leaves_no_hooks() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            self.conv(x)
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        PruningGraph(model, torch.randn(1, 3, 4, 4))
    assert not model.conv._forward_hooks and model.training


def test_mixed_modes_restored() -> None:
    model, x, _ = make("shared")
    model.train()
    model.backbone[1].eval()  # a frozen-statistics BatchNorm, as in fine-tuning
    model.heads["cls"].eval()
    expected = modes(model)
    graph = PruningGraph(model, x)
    assert modes(model) == expected
    graph.prune(random_plan(graph))
    assert modes(model) == expected


def test_fully_frozen_backbone_is_traced() -> None:
    model, x, _ = make("residual")
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    graph = PruningGraph(model, x)
    assert sum(g.part == "backbone" for g in graph.groups) == 5
    graph.prune(random_plan(graph))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    assert model(x)["seg"].shape == (2, 3, 16, 16)


def test_min_channels_refused_before_any_change() -> None:
    model, x, _ = make("shared")
    graph = PruningGraph(model, x, min_channels=4)
    before = shapes(model)
    g0, g1 = graph.groups[0], graph.groups[1]
    with pytest.raises(ValueError, match="min_channels"):
        graph.prune({g0.index: [0], g1.index: list(range(g1.channels - 3))})
    assert shapes(model) == before, "a refused plan must not prune anything"
    with pytest.raises(ValueError):
        graph.prune({g0.index: [g0.channels]})
    with pytest.raises(ValueError):
        graph.prune({len(graph.groups): [0]})
    graph.prune({g1.index: list(range(g1.channels - 4))})  # exactly min_channels left is fine
    assert graph.widths()[g1.root] == 4


def test_explicit_protection_and_returned_features() -> None:
    model, x, _ = make("shared")
    graph = PruningGraph(model, x, protected=["backbone.3", "heads.depth"])
    roots = set(graph.widths())
    assert "backbone.3" not in roots and "heads.depth.0" not in roots
    assert {"backbone.3", "heads.depth.0", "heads.depth.2"} <= set(graph.protected)
    with pytest.raises(MTPruneInputError):
        PruningGraph(model, x, protected=["no.such.layer"])

    class WithFeatures(MT):
        def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
            out = super().forward(x, tasks)
            out["feat"] = self.backbone(x)  # a returned tensor: its channels must never change
            return out

    torch.manual_seed(0)
    ref = shared_three_heads()
    feats = WithFeatures(ref.backbone, dict(ref.heads), upsample=True)
    graph = PruningGraph(feats, x)
    assert "backbone.6" in graph.protected and "backbone.6" not in graph.widths()


def test_user_parts_mapping() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.seg_head = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
            self.depth_head = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 1, 1))

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            f = self.trunk(x)
            return {"seg": self.seg_head(f), "depth": self.depth_head(f)}

    model, x = Plain(), torch.randn(1, 3, 8, 8)
    parts = {g.root: g.part for g in PruningGraph(model, x, parts={"seg_head": "seg", "depth_head": "depth"}).groups}
    assert parts == {"trunk.0": "backbone", "seg_head.0": "seg", "depth_head.0": "depth"}
    assert {g.part for g in PruningGraph(model, x).groups} == {"backbone"}  # no heads ModuleDict, no mapping
    with pytest.raises(MTPruneInputError):
        PruningGraph(model, x, parts={"nope": "seg"})


def test_apply_widths_errors() -> None:
    model, x, _ = make("lenet")
    with pytest.raises(MTPruneInputError, match="unknown"):
        apply_widths(copy.deepcopy(model), x, {"backbone.99": 3})
    with pytest.raises(MTPruneInputError):
        apply_widths(copy.deepcopy(model), x, {"backbone.0": 7})  # wider than the layer
    with pytest.raises(MTPruneInputError):
        apply_widths(copy.deepcopy(model), x, {"heads.a": 5})  # a protected predictor is not a group root
    conv = dict(model.named_modules())["backbone.3"]
    weight = conv.weight.detach().clone()
    apply_widths(model, x, {"backbone.0": 6, "backbone.3": 10})  # same width is a no-op; the last channels go
    conv = dict(model.named_modules())["backbone.3"]
    assert conv.out_channels == 10 and torch.equal(conv.weight, weight[:10])
