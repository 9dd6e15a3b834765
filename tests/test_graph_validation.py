"""Safety of channel pruning (mtprune.pruning.graph): every group is validated before anything is removed.

Tiny stand-ins for the patterns that broke on public multi-task code: MTI-Net's concat + ``view`` that folds two
channels into one, SegNet's ``MaxPool2d(return_indices=True)`` feeding ``MaxUnpool2d``, weights tied between two
heads, a constant that fixes a width Torch-Pruning cannot see, a task output without a loss, and torchvision's
MNASNet, whose state-dict version must survive save/load.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtprune.io import load, save
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.prune import prune
from mtprune.utils.errors import MTPruneInputError


def cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def two_heads(c: int) -> nn.ModuleDict:
    return nn.ModuleDict({"seg": nn.Conv2d(c, 3, 1), "depth": nn.Conv2d(c, 1, 1)})


class FoldedChannels(nn.Module):
    """MTI-Net-like: concat two maps, ``view(B, C//2, 2, H, W)``, softmax over the pairs, weighted sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.heads = two_heads(8)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.stem(x)
        cat = torch.cat([self.a(f), self.b(f)], 1)
        n, c, h, w = cat.shape
        v = cat.view(n, c // 2, 2, h, w)
        out = (v.softmax(2) * v).sum(2)
        return {k: head(out) for k, head in self.heads.items()}


class TinySegNet(nn.Module):
    """SegNet-like (MTAN): the encoder's pooling indices feed the decoder's unpooling."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = nn.Sequential(cbr(3, 8), cbr(8, 8)), nn.Sequential(cbr(8, 16), cbr(16, 16))
        self.pool, self.unpool = nn.MaxPool2d(2, 2, return_indices=True), nn.MaxUnpool2d(2, 2)
        self.dec2, self.dec1 = nn.Sequential(cbr(16, 16), cbr(16, 8)), nn.Sequential(cbr(8, 8), cbr(8, 8))
        self.heads = two_heads(8)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x, i1 = self.pool(self.enc1(x))
        x, i2 = self.pool(self.enc2(x))
        x = self.dec1(self.unpool(self.dec2(self.unpool(x, i2)), i1))
        return {k: head(x) for k, head in self.heads.items()}


class TiedHeads(nn.Module):
    """Two heads whose first convs share one ``nn.Parameter``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 8), cbr(8, 16))
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 3, 1))
                                    for t in ("seg", "depth")})
        self.heads["depth"][0].weight = self.heads["seg"][0].weight

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.stem(x)
        return {k: head(f) for k, head in self.heads.items()}


class HiddenWidth(nn.Module):
    """A plain tensor attribute (not a parameter or buffer) fixes the width of the stem: invisible to tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.scale = torch.ones(1, 8, 1, 1)
        self.heads = two_heads(8)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.stem(x) * self.scale
        return {k: head(f) for k, head in self.heads.items()}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def _x(size: int = 16) -> Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_folding_view_leaves_its_group_alone_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    model, x = FoldedChannels().eval(), _x()
    graph = PruningGraph(model, x)
    assert "a" in graph.skipped and "one input channel of heads.seg" in graph.skipped["a"]
    assert [g.root for g in graph.groups] == ["stem.0"]  # a/b (coupled by the view) are not offered
    prune(model, x, "l1", channel_ratio=0.5, min_channels=1)
    assert model.stem[0].out_channels == 4 and model.a.out_channels == model.b.out_channels == 8
    assert model(x)["seg"].shape == (1, 3, 16, 16)
    assert all(m.weight.shape[0] > 0 for m in model.modules() if isinstance(m, nn.Conv2d))


def test_segnet_unpooling_couples_encoder_and_decoder() -> None:
    torch.manual_seed(0)
    model, x = TinySegNet().eval(), _x()
    graph = PruningGraph(model, x)
    # every conv whose channels enter a pooling-with-indices or leave an unpooling is left alone
    assert set(graph.skipped) == {"enc1.1.0", "enc2.1.0", "dec2.1.0"}
    assert "MaxUnpool" in graph.skipped["enc2.1.0"]
    assert {g.root for g in graph.groups} == {"enc1.0.0", "enc2.0.0", "dec2.0.0", "dec1.0.0", "dec1.1.0"}
    prune(model, x, "l1", channel_ratio=0.5, min_channels=1)
    assert model.enc2[1][0].out_channels == 16 and model.dec2[1][0].out_channels == 8
    assert model.enc2[0][0].out_channels < 16
    assert model(x)["depth"].shape == (1, 1, 16, 16)


def test_pooling_indices_without_unpooling_prune_normally() -> None:
    model = nn.Module()
    model.stem, model.pool, model.heads = cbr(3, 8), nn.MaxPool2d(2, return_indices=True), two_heads(8)
    model.forward = lambda x: {k: h(model.pool(model.stem(x))[0]) for k, h in model.heads.items()}
    graph = PruningGraph(model, _x())
    assert [g.root for g in graph.groups] == ["stem.0"] and not graph.skipped


def test_tied_head_weights_stay_tied() -> None:
    torch.manual_seed(0)
    model, x = TiedHeads().eval(), _x(8)
    graph = PruningGraph(model, x)
    assert {"heads.seg.0", "heads.depth.0", "stem.1.0"} <= set(graph.skipped)  # stem.1 feeds the tied convs
    assert "tied" in graph.skipped["heads.seg.0"]
    prune(model, x, "l1", channel_ratio=0.5, min_channels=1)
    assert model.heads["seg"][0].weight is model.heads["depth"][0].weight
    assert model.heads["seg"][0].weight.shape == (12, 16, 3, 3)
    assert model.stem[0][0].out_channels == 4
    model(x)


def test_a_module_reused_under_two_names_is_not_a_tie() -> None:
    model, x = TiedHeads().eval(), _x(8)
    model.heads["depth"] = model.heads["seg"]  # one head module under two names: pruned once, nothing to untie
    graph = PruningGraph(model, x)
    assert not graph.skipped and "heads.seg.0" in {g.root for g in graph.groups}


def test_model_without_a_safe_group_is_refused_untouched() -> None:
    model, x = TinySegNet().eval(), _x()
    model.enc1, model.dec1 = nn.Sequential(cbr(3, 8)), nn.Identity()  # only convs tied by pooling indices remain
    model.enc2, model.dec2 = nn.Sequential(cbr(8, 16)), nn.Sequential(cbr(16, 8))
    before = snapshot(model)
    with pytest.raises(MTPruneInputError, match=r"no group can be pruned safely \(e\.g\. enc1\.0\.0: .*MaxUnpool"):
        prune(model, x, "l1", channel_ratio=0.5, min_channels=1)
    assert same_state(model, before)


def test_forward_broken_by_pruning_is_rolled_back() -> None:
    model, x = HiddenWidth().eval(), _x(8)
    graph = PruningGraph(model, x)
    before, params = snapshot(model), list(model.parameters())
    with pytest.raises(MTPruneInputError, match="pruning the groups of stem.0 breaks the model.*unchanged"):
        graph.prune({0: [1, 2]})
    assert same_state(model, before)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert model.stem[0].out_channels == 8 and graph.groups[0].channels == 8
    assert model(x)["seg"].shape == (1, 3, 8, 8)
    graph.prune({})  # the graph is still usable


def test_group_past_a_layer_width_is_refused_before_any_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Torch-Pruning group whose indices point past a layer (InvPT) is refused by name, before any removal."""
    model, x = TiedHeads().eval(), _x(8)
    model.heads["depth"][0].weight = nn.Parameter(model.heads["depth"][0].weight.detach().clone())  # untie
    graph = PruningGraph(model, x)
    dg = graph._dg
    real = dg.get_pruning_group

    def shifted(module, fn, idxs):  # the second group's indices are mapped 100 channels too far
        group = real(module, fn, idxs)
        if module is model.heads["seg"][0]:
            for i, item in enumerate(group):
                group[i] = type(item)(dep=item.dep, idxs=[j + 100 for j in item.idxs])
        return group

    monkeypatch.setattr(dg, "get_pruning_group", shifted)
    before = snapshot(model)
    index = {g.root: g.index for g in graph.groups}
    with pytest.raises(MTPruneInputError, match=r"cannot prune layer heads\.seg\.0: channel 10\d is past its 12"):
        graph.prune({index["stem.0.0"]: [0], index["heads.seg.0"]: [0, 1]})
    assert same_state(model, before) and model.stem[0][0].out_channels == 8


def test_missing_task_loss_is_refused_by_name() -> None:
    model, x = HiddenWidth().eval(), _x(8)
    model.scale = torch.ones(1, 1, 1, 1)
    data = [(x, {"seg": torch.zeros(1, 3, 8, 8), "depth": torch.zeros(1, 1, 8, 8)})]
    before = snapshot(model)
    with pytest.raises(MTPruneInputError, match=r"no loss is given for task\(s\) \['depth'\]"):
        prune(model, x, "task_taylor", channel_ratio=0.3, data=data, losses={"seg": F.mse_loss})
    assert same_state(model, before)
    prune(model, x, "task_taylor", channel_ratio=0.3, min_channels=1, data=data,
          losses={"seg": F.mse_loss, "depth": F.mse_loss})
    assert model.stem[0].out_channels < 8


def test_module_versions_survive_save_load(tmp_path) -> None:
    """torchvision's MNASNet (state-dict version 2) refuses weights saved without their version."""
    torchvision = pytest.importorskip("torchvision")

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torchvision.models.mnasnet0_5(num_classes=8)
            self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 2)})

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            f = self.backbone(x)
            return {k: h(f) for k, h in self.heads.items()}

    torch.manual_seed(0)
    model, x = Wrapped().eval(), torch.randn(1, 3, 32, 32)
    save(model, tmp_path / "m.mtp", example_inputs=x)
    loaded = load(tmp_path / "m.mtp", base=Wrapped()).eval()
    assert torch.equal(loaded(x)["a"], model(x)["a"])
