"""``mtprune.profile`` (mtprune.measure): parameters, MACs overall / per part / per task subset, and latency.

MACs are checked against counts done by hand on small models; per-subset MACs against the backbone plus the
heads of the subset; latency only for being measured and for recording its setting.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import mtprune
from mtprune.measure import layer_macs
from mtprune.models import MultiTaskModel

X = torch.randn(2, 3, 8, 10, generator=torch.Generator().manual_seed(0))


class HandNet(nn.Module):
    """One strided conv, then a linear classifier and a transposed-conv decoder: MACs countable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 3x8x10 -> 4x4x5
        self.fc = nn.Linear(4, 5)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)  # 4x4x5 -> 2x8x10

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = torch.relu(self.conv(x))
        return {"cls": self.fc(f.mean(dim=(2, 3))), "up": self.up(f)}


CONV = (4 * 4 * 5) * (3 * 3 * 3)  # output elements x (in/groups * kh * kw) = 2160
FC = 4 * 5  # in x out = 20
UP = (4 * 4 * 5) * (2 * 2 * 2)  # input elements x (out/groups * kh * kw) = 640


def test_macs_and_params_by_hand() -> None:
    """Conv, linear and transposed-conv MACs and the parameter count equal the hand count, per sample."""
    torch.manual_seed(0)
    net = HandNet()
    info = mtprune.profile(net, X, latency=False)
    assert info.macs == CONV + FC + UP
    assert info.params == (4 * 27 + 4) + (4 * 5 + 5) + (4 * 2 * 4 + 2)
    assert info.macs_per_subset == {"cls": CONV + FC, "up": CONV + UP, "cls+up": CONV + FC + UP}
    macs, _ = layer_macs(net, X)  # per sample: the batch of 2 does not double it
    assert macs == {"conv": CONV, "fc": FC, "up": UP}


def hand_mt() -> MultiTaskModel:
    """A 3-head MultiTaskModel with hand-countable MACs on 3x8x10 inputs."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                             nn.ReLU())
    heads = {
        "a": nn.Conv2d(8, 2, 1),
        "b": nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1)),
        "c": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)),
    }
    return MultiTaskModel(backbone, heads)


BACKBONE = 8 * 8 * 10 * 27 + 8 * 4 * 5 * 72  # 17280 + 11520
HEADS = {"a": 2 * 4 * 5 * 8, "b": 4 * 4 * 5 * 72 + 1 * 4 * 5 * 4, "c": 8 * 5}


def test_subset_macs_of_a_three_head_model() -> None:
    """MACs(subset) == backbone + Σ heads of the subset (by hand); the full set is the total."""
    info = mtprune.profile(hand_mt(), X, latency=False)
    assert info.macs_per_part == {"backbone": BACKBONE, **HEADS}
    assert len(info.macs_per_subset) == 7
    for key, macs in info.macs_per_subset.items():
        assert macs == BACKBONE + sum(HEADS[t] for t in key.split("+")), key
    assert info.macs_per_subset["a+b+c"] == info.macs == BACKBONE + sum(HEADS.values())


def test_subset_macs_and_parts_of_a_zoo_model() -> None:
    """On a zoo model: subset = backbone part + its heads' parts, and parameters per part add up."""
    torch.manual_seed(0)
    model = mtprune.build_model("deeplab_resnet18", {"seg": 5, "depth": 1, "normal": 3}, width=0.125, head="conv",
                                head_kwargs={"hidden": 16})
    info = mtprune.profile(model, torch.randn(1, 3, 32, 40), latency=False)
    parts = info.macs_per_part
    assert set(parts) == {"backbone", "seg", "depth", "normal"} and all(v > 0 for v in parts.values())
    for key, macs in info.macs_per_subset.items():
        assert macs == parts["backbone"] + sum(parts[t] for t in key.split("+")), key
    assert info.macs_per_subset["seg+depth+normal"] == info.macs == sum(parts.values())
    assert sum(info.params_per_part.values()) == info.params == sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for p in model.heads["seg"].parameters())
    assert info.params_per_part["seg"] == head_params


def test_latency_and_setting() -> None:
    """Latency is measured (positive) and its setting records threads, batch size and input shape."""
    model = hand_mt()
    info = mtprune.profile(model, X, warmup=1, repeats=2)
    assert info.latency_ms is not None and info.latency_ms > 0
    assert info.setting["threads"] == torch.get_num_threads() == 1
    assert info.setting["batch_size"] == 2 and info.setting["input_shape"] == [3, 8, 10]
    assert info.setting["device"] == "cpu" and info.setting["repeats"] == 2
    info = mtprune.profile(model, X, warmup=1, repeats=2, batch_size=5, subsets_latency=True)
    assert info.setting["batch_size"] == 5
    assert set(info.latency_per_subset_ms) == set(info.macs_per_subset)
    assert all(v > 0 for v in info.latency_per_subset_ms.values())
    assert info.to_dict()["macs"] == info.macs


class UserNet(nn.Module):
    """A user model without ``tasks=`` in its forward and without ``heads.`` names."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Linear(6, 2)
        self.right = nn.Conv2d(6, 1, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        return {"left": self.left(f.mean(dim=(2, 3))), "right": self.right(f)}


def test_user_model_without_tasks_argument() -> None:
    """Per-subset MACs of any dict-returning model come from its autograd graph; subset latency is skipped."""
    torch.manual_seed(0)
    trunk, left, right = 8 * 10 * 6 * 27, 6 * 2, 8 * 10 * 1 * 6
    info = mtprune.profile(UserNet(), X, warmup=1, repeats=2, subsets_latency=True)
    assert info.macs_per_subset == {"left": trunk + left, "right": trunk + right, "left+right": trunk + left + right}
    assert info.latency_ms > 0 and info.latency_per_subset_ms == {}
    assert info.params_per_part == {"backbone": info.params}


def test_profile_leaves_the_model_as_found() -> None:
    """Training mode and frozen parameters are restored; a frozen model is profiled like a trainable one."""
    model = hand_mt()
    want = mtprune.profile(model, X, latency=False)
    frozen = copy.deepcopy(model)
    frozen.backbone.requires_grad_(False)
    frozen.train()
    frozen.heads["b"].eval()  # mixed modes, e.g. a frozen head with its BatchNorm statistics fixed
    modes = {n: m.training for n, m in frozen.named_modules()}
    got = mtprune.profile(frozen, X, warmup=1, repeats=1)
    assert got.macs_per_subset == want.macs_per_subset and got.params == want.params
    assert {n: m.training for n, m in frozen.named_modules()} == modes
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.heads.parameters())
    everything = copy.deepcopy(model).requires_grad_(False).eval()
    assert mtprune.profile(everything, X, latency=False).macs_per_subset == want.macs_per_subset
    assert not everything.training


def test_profile_of_a_pruned_model_matches_the_prune_report() -> None:
    """After pruning, profile's MACs and parameters are those the prune report states."""
    torch.manual_seed(0)
    model = mtprune.build_model("vgg16", {"seg": 5, "depth": 1}, width=0.125, head="conv",
                                head_kwargs={"hidden": 16})
    x = torch.randn(1, 3, 32, 40)
    before = mtprune.profile(model, x, latency=False)
    report = mtprune.prune(model, x, "l1", target_macs=0.5)
    after = mtprune.profile(model, x, latency=False)
    assert (before.macs, before.params) == (report.macs_before, report.params_before)
    assert (after.macs, after.params) == (report.macs_after, report.params_after)
    assert after.macs < before.macs
