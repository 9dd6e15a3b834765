"""Conformance on torchvision: every classification and segmentation architecture that Torch-Pruning 1.6.1 can
prune, wrapped with two task heads, pruned with ``l1`` and then ``task_taylor``, saved and loaded back with
``base=``, and profiled; what cannot be pruned is refused in one line with the model untouched.

One model per architecture family (the other sizes of a family share its code), at tiny inputs; where torchvision
exposes the knobs, the family's own constructor is called with fewer blocks or channels (DenseNet, ResNet/ResNeXt,
EfficientNetV2, ConvNeXt) and the 4096-wide classifiers of VGG/AlexNet are narrowed, to keep the suite fast.
MobileNetV3-Large is the backbone of both MobileNet segmentation models; Wide-ResNet is the ResNet bottleneck at
another width. docs/architectures.md lists the results.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtprune.io import load, save
from mtprune.measure import profile
from mtprune.pruning.prune import prune
from mtprune.utils.errors import MTPruneInputError

tv = pytest.importorskip("torchvision")
models, seg = tv.models, tv.models.segmentation
FEATURES = 8  # the backbone's own classifier / segmentation output width, read by both heads


class TwoHeads(nn.Module):
    """A torchvision model as the shared backbone of two tasks: two classifiers, or a 3-class segmentation and a
    depth head on the segmentation output."""

    def __init__(self, backbone: nn.Module, dense: bool) -> None:
        super().__init__()
        self.backbone, self.dense = backbone, dense
        layer = (lambda c: nn.Conv2d(FEATURES, c, 1)) if dense else (lambda c: nn.Linear(FEATURES, c))
        self.heads = nn.ModuleDict({"a": layer(3), "b": layer(1 if dense else 2)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.backbone(x)
        f = f["out"] if self.dense else f
        return {k: h(f) for k, h in self.heads.items()}


def _narrow(net: nn.Module, width: int) -> nn.Module:
    """VGG / AlexNet with the classifier narrowed (its 4096-wide layers would dominate the suite's time); the same
    dropout-linear-ReLU pattern, read after global pooling."""
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(nn.Dropout(), nn.Linear(width, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 64),
                                   nn.ReLU(), nn.Linear(64, FEATURES))
    return net


def _efficientnet_v2() -> nn.Module:
    """EfficientNetV2's two block kinds (fused MBConv, then MBConv with squeeze-excitation), one block per stage."""
    eff = models.efficientnet
    setting = [eff.FusedMBConvConfig(1, 3, 1, 16, 16, 1), eff.FusedMBConvConfig(4, 3, 2, 16, 32, 1),
               eff.MBConvConfig(4, 3, 2, 32, 48, 1), eff.MBConvConfig(6, 3, 1, 48, 64, 1)]
    return models.EfficientNet(setting, dropout=0.2, num_classes=FEATURES, last_channel=128)


def _convnext() -> nn.Module:
    cfg = models.convnext.CNBlockConfig
    return models.ConvNeXt([cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, None, 1)], num_classes=FEATURES)


def _resnet(block: str, **kw) -> Callable[[], nn.Module]:
    cls = getattr(models.resnet, block)
    return lambda: models.ResNet(cls, [1, 1, 1, 1], num_classes=FEATURES, **kw)


def _seg(fn: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    return lambda: fn(weights=None, weights_backbone=None, num_classes=FEATURES, aux_loss=False)


# name -> (constructor, dense output?, input size, fast?)
CASES: dict[str, tuple[Callable[[], nn.Module], bool, int, bool]] = {
    "resnet18": (lambda: models.resnet18(num_classes=FEATURES), False, 32, True),
    "mobilenet_v3_small": (lambda: models.mobilenet_v3_small(num_classes=FEATURES), False, 32, True),
    "mnasnet0_5": (lambda: models.mnasnet0_5(num_classes=FEATURES), False, 32, False),
    "squeezenet1_1": (lambda: models.squeezenet1_1(num_classes=FEATURES), False, 32, True),
    "densenet (2-2-2-2 blocks)": (lambda: models.DenseNet(8, (2, 2, 2, 2), 16, num_classes=FEATURES), False, 32,
                                  True),
    "lraspp_mobilenet_v3_large": (_seg(seg.lraspp_mobilenet_v3_large), True, 32, False),
    "resnet50 (bottleneck, 1 block/stage)": (_resnet("Bottleneck"), False, 32, False),
    "resnext50_32x4d (1 block/stage)": (_resnet("Bottleneck", groups=32, width_per_group=4), False, 32, False),
    "mobilenet_v2": (lambda: models.mobilenet_v2(num_classes=FEATURES, width_mult=0.5), False, 32, False),
    "efficientnet_b0": (lambda: models.efficientnet_b0(num_classes=FEATURES), False, 32, False),
    "efficientnet_v2 (4 stages, 1 block each)": (_efficientnet_v2, False, 32, False),
    "regnet_x_400mf": (lambda: models.regnet_x_400mf(num_classes=FEATURES), False, 32, False),
    "regnet_y_400mf": (lambda: models.regnet_y_400mf(num_classes=FEATURES), False, 32, False),
    "googlenet": (lambda: models.googlenet(num_classes=FEATURES, aux_logits=False, init_weights=False), False, 32,
                  False),
    "inception_v3": (lambda: models.inception_v3(num_classes=FEATURES, aux_logits=False, init_weights=False),
                     False, 75, False),
    "alexnet (narrow classifier)": (lambda: _narrow(models.alexnet(), 256), False, 64, False),
    "vgg11_bn (narrow classifier)": (lambda: _narrow(models.vgg11_bn(), 512), False, 32, False),
    "convnext (16-32-64, 1 block/stage)": (_convnext, False, 32, False),
    "deeplabv3_mobilenet_v3_large": (_seg(seg.deeplabv3_mobilenet_v3_large), True, 32, False),
    "fcn_resnet50": (_seg(seg.fcn_resnet50), True, 32, False),
    "vit (2 layers, width 32, 4 heads)": (lambda: models.VisionTransformer(32, 8, 2, 4, 32, 64, num_classes=FEATURES),
                                          False, 32, True),
}
WINDOW = "is window attention .*: not supported for structured pruning"
REFUSED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    # Torch-Pruning 1.6.1 cannot build the dependency graph of its channel shuffle (at any input size)
    "shufflenet_v2_x0_5": (lambda: models.shufflenet_v2_x0_5(num_classes=FEATURES),
                           "Torch-Pruning cannot map the channels of TwoHeads"),
    # window attention: Torch-Pruning's index maps through window partitions do not fit in bounded memory
    "swin (2 stages, width 16)": (lambda: models.SwinTransformer([4, 4], 16, [1, 1], [2, 2], [2, 2],
                                                                 num_classes=FEATURES), WINDOW),
    "maxvit (2 stages, width 16)": (lambda: models.MaxVit((32, 32), 16, 2, [16, 32], [1, 1], 8, 0.0,
                                                          num_classes=FEATURES), WINDOW),
}


def _build(name: str) -> tuple[TwoHeads, Tensor]:
    make, dense, size, _ = CASES[name]
    torch.manual_seed(0)
    return TwoHeads(make(), dense).eval(), torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _data(model: TwoHeads, x: Tensor) -> tuple[list, dict]:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        out = model(x)
    if model.dense:
        targets = {k: torch.randn(v.shape, generator=g) for k, v in out.items()}
        return [(x, targets)], {"a": F.mse_loss, "b": F.mse_loss}
    targets = {k: torch.randint(0, v.shape[1], (x.shape[0],), generator=g) for k, v in out.items()}
    return [(x, targets)], {"a": F.cross_entropy, "b": F.cross_entropy}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if fast else pytest.mark.slow) for n, (_, _, _, fast) in CASES.items()])
def test_prune_save_load_profile(name: str, tmp_path) -> None:
    model, x = _build(name)
    shapes = {k: v.shape for k, v in model(x).items()}
    params0 = _params(model)

    report = prune(model, x[:1], "l1", channel_ratio=0.3)
    assert report.params_after < params0 and _params(model) == report.params_after
    assert {k: v.shape for k, v in model(x).items()} == shapes  # the heads' outputs keep their shapes

    path = save(model, tmp_path / "m.mtp", example_inputs=x[:1])
    loaded = load(path, base=_build(name)[0]).eval()
    for task, out in model(x).items():
        torch.testing.assert_close(loaded(x)[task], out, rtol=1e-4, atol=1e-5)

    prof = profile(loaded, x[:1], latency=False)
    assert prof.params == report.params_after and prof.macs > 0
    assert set(prof.macs_per_subset) >= {"a", "b"}

    data, losses = _data(loaded, x)  # a second round, gradient-based, on the loaded model
    again = prune(loaded, x[:1], "task_taylor", channel_ratio=0.2, data=data, losses=losses, batches=1)
    assert again.params_after < report.params_after
    assert {k: v.shape for k, v in loaded(x).items()} == shapes
    assert all(m.weight.shape[0] > 0 for m in loaded.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.mark.parametrize("name", list(REFUSED))
def test_unprunable_models_are_refused_in_one_line(name: str) -> None:
    torch.manual_seed(0)
    make, message = REFUSED[name]
    model, x = TwoHeads(make(), dense=False).eval(), torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MTPruneInputError, match=message) as info:
        prune(model, x, "l1", channel_ratio=0.3)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
