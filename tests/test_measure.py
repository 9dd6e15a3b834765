"""``mtprune.profile`` (mtprune.measure): parameters, MACs overall / per part / per task subset, and latency.

MACs are checked against counts done by hand on small models, an analytic count of a torchvision ViT (attention
included) and a hook count of resnet18's convs; per-subset MACs against the backbone plus the heads of the
subset; latency only for being measured and for recording its setting.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtprune
import mtprune.pruning.prune
from mtprune.measure import count_macs, layer_macs
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


# ---------------------------------------------------------------- what runs: functional calls and attention
def vit_macs(image: int, patch: int, layers: int, dim: int, mlp: int, classes: dict[str, int]) -> int:
    """Analytic per-sample MACs of torchvision's VisionTransformer with a linear head per task."""
    patches = (image // patch) ** 2
    tokens = patches + 1  # + class token
    embed = patches * dim * 3 * patch * patch
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * mlp
    return embed + layers * block + sum(dim * c for c in classes.values())


class TwoHeads(nn.Module):
    """A single-task network's features with one linear head per task."""

    def __init__(self, net: nn.Module, dim: int, classes: dict[str, int]) -> None:
        super().__init__()
        self.net = net
        self.heads = nn.ModuleDict({t: nn.Linear(dim, c) for t, c in classes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.net(x)
        return {t: h(f) for t, h in self.heads.items()}


def tiny_vit(classes: dict[str, int]) -> TwoHeads:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    net.heads = nn.Identity()
    return TwoHeads(net, 32, classes)


def test_vit_macs_equal_the_analytic_count() -> None:
    """torchvision ViT (nn.MultiheadAttention, out_proj through F.linear, fused attention): MACs equal the
    analytic count, whatever the mode and gradient state; out_proj is attributed to its own module."""
    classes = {"a": 3, "b": 5}
    model = tiny_vit(classes)
    want = vit_macs(32, 8, 2, 32, 64, classes)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    info = mtprune.profile(model, x, latency=False)
    assert info.macs == want
    model.requires_grad_(False)  # the inference fast path of MultiheadAttention would hide the attention
    with torch.no_grad():
        assert count_macs(model, x) == want
        assert mtprune.pruning.prune.count(model, x)[1] == want  # the count targets are measured against
    macs, _ = layer_macs(model, x)
    attn = "net.encoder.layers.encoder_layer_0.self_attention"
    tokens = 17
    assert macs[f"{attn}.out_proj"] == tokens * 32 * 32
    assert macs[attn] == tokens * 3 * 32 * 32 + 2 * tokens * tokens * 32  # in_proj (its own weight) + QK^T, AV
    assert info.macs_per_subset["a"] == want - 32 * 5 and info.macs_shared == want - 32 * 8


def test_macs_are_flop_counter_flops_over_two() -> None:
    """The total is FlopCounterMode's FLOPs / 2 on the same forward (one MAC = one multiply-add), once CPU's
    fused attention kernel, which FlopCounterMode does not know, is given its formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from mtprune.measure import _extra_formulas

    model = tiny_vit({"a": 3}).eval()
    x = torch.randn(1, 3, 32, 32)
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as fc, torch.enable_grad():
        model(x)
    assert count_macs(model, x) == fc.get_total_flops() // 2 == vit_macs(32, 8, 2, 32, 64, {"a": 3})


class Functional(nn.Module):
    """Weights used through F.linear / F.conv2d / matmul, and nn.MultiheadAttention returning its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.proj = nn.Linear(6, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = F.conv2d(x, self.w, padding=1)  # 6 x 8 x 10
        t = F.linear(f.flatten(2).transpose(1, 2), self.proj.weight)  # 80 tokens x 4
        a, _ = self.attn(t, t, t, need_weights=True)  # the bmm path
        return {"tok": a, "gram": t.transpose(1, 2) @ t}


def test_functional_calls_and_attention_are_counted() -> None:
    """F.conv2d on a parameter, F.linear on a module's weight, a bare matmul and MultiheadAttention's bmm path."""
    torch.manual_seed(0)
    macs, _ = layer_macs(Functional(), X)
    tokens = 8 * 10
    assert macs[""] == 80 * 6 * 27 + 4 * 4 * tokens  # the model's own weight (F.conv2d) and its matmul
    assert macs["proj"] == tokens * 6 * 4
    assert macs["attn"] == tokens * 3 * 4 * 4 + 2 * tokens * tokens * 4
    assert macs["attn.out_proj"] == tokens * 4 * 4


def test_resnet_macs_equal_a_hand_count_of_its_convs() -> None:
    """torchvision resnet18 with two heads: MACs equal Σ over convs of out elements × in/groups × kh × kw, plus
    the linear heads, counted here independently with forward hooks."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18()
    net.fc = nn.Identity()
    model = TwoHeads(net, 512, {"a": 3, "b": 2})
    hand = []

    def hook(m, args, out):
        hand.append(out[0].numel() * m.weight[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert count_macs(model, torch.randn(3, 3, 32, 32)) == sum(hand) > 0


def test_swin_layers_called_through_f_linear_are_counted() -> None:
    """torchvision Swin calls its qkv and proj through F.linear (profile raised KeyError before): every layer
    and the windowed attention products are counted, by hand."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    net = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                          num_classes=8)
    model = TwoHeads(net, 8, {"a": 2, "b": 3})
    macs, _ = layer_macs(model, torch.randn(2, 3, 16, 16))
    stage1 = 16 * 16 * 48 + 4 * 2 * (4 * 4 * 16) + 16 * 16 * 16 + 2 * 16 * 16 * 64  # 16 tokens, 4 windows of 4
    stage2 = 4 * 32 * 96 + 2 * 2 * (4 * 4 * 16) + 4 * 32 * 32 + 2 * 4 * 32 * 128  # 4 tokens, 2 heads of 16
    assert macs["net.features.1.0.attn.qkv"] == 16 * 16 * 48 and macs["net.features.1.0.attn"] == 2 * 4 * 4 * 4 * 16
    assert sum(macs.values()) == 16 * 16 * 48 + stage1 + 4 * 64 * 32 + stage2 + 32 * 8 + 8 * 5
