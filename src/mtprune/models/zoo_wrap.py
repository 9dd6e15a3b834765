"""torchvision and timm classifiers wrapped as two-task models: the model list of the conformance checks.

Shared by ``tests/test_conformance_zoo.py``, ``tests/test_conformance_timm.py`` and ``mtprune bench conformance``
(issue 14). One model per architecture family, at tiny inputs: where torchvision exposes the knobs, the family's
own constructor is called with fewer blocks or channels, and VGG/AlexNet get a narrow classifier. Each backbone
outputs ``FEATURES`` classes (or an ``FEATURES``-channel segmentation), read by two task heads (``TwoHeads``).
torchvision and timm are imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURES = 8  # the backbone's own classifier / segmentation output width, read by both heads
PRUNES, EITHER = "prunes", "prunes or refuses"  # expected outcomes; anything else is a refusal message pattern
WINDOW = "is window attention .*: not supported for structured pruning"


class TwoHeads(nn.Module):
    """A torchvision/timm model as the shared backbone of two tasks: a 3-way and a 2-way classifier on its
    ``FEATURES``-way output, or (``dense``) a 3-class segmentation and a depth head on its segmentation output."""

    def __init__(self, backbone: nn.Module, dense: bool = False) -> None:
        super().__init__()
        self.backbone, self.dense = backbone, dense
        layer = (lambda c: nn.Conv2d(FEATURES, c, 1)) if dense else (lambda c: nn.Linear(FEATURES, c))
        self.heads = nn.ModuleDict({"a": layer(3), "b": layer(1 if dense else 2)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.backbone(x)
        f = f["out"] if self.dense else f
        return {k: h(f) for k, h in self.heads.items()}


@dataclass(frozen=True)
class ZooCase:
    """One wrapped model: its backbone constructor, input size, output kind and the outcome the tests expect
    (``PRUNES``, ``EITHER``, or a regular expression of the one-line refusal)."""

    source: str  # "torchvision" or "timm"
    make: Callable[[], nn.Module]
    size: int = 32
    dense: bool = False
    expect: str = PRUNES


def _tv():
    import torchvision

    return torchvision.models


def _narrow(name: str, width: int) -> Callable[[], nn.Module]:
    """VGG / AlexNet with the classifier narrowed (its 4096-wide layers would dominate the time); the same
    dropout-linear-ReLU pattern, read after global pooling."""

    def make() -> nn.Module:
        net = getattr(_tv(), name)()
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Sequential(nn.Dropout(), nn.Linear(width, 64), nn.ReLU(), nn.Dropout(),
                                       nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, FEATURES))
        return net

    return make


def _efficientnet_v2() -> nn.Module:
    """EfficientNetV2's two block kinds (fused MBConv, then MBConv with squeeze-excitation), one block per stage."""
    eff = _tv().efficientnet
    setting = [eff.FusedMBConvConfig(1, 3, 1, 16, 16, 1), eff.FusedMBConvConfig(4, 3, 2, 16, 32, 1),
               eff.MBConvConfig(4, 3, 2, 32, 48, 1), eff.MBConvConfig(6, 3, 1, 48, 64, 1)]
    return _tv().EfficientNet(setting, dropout=0.2, num_classes=FEATURES, last_channel=128)


def _convnext() -> nn.Module:
    cfg = _tv().convnext.CNBlockConfig
    return _tv().ConvNeXt([cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, None, 1)], num_classes=FEATURES)


def _resnet(block: str, **kw) -> Callable[[], nn.Module]:
    return lambda: _tv().ResNet(getattr(_tv().resnet, block), [1, 1, 1, 1], num_classes=FEATURES, **kw)


def _seg(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(_tv().segmentation, name)(weights=None, weights_backbone=None, num_classes=FEATURES,
                                                     aux_loss=False)


def _tvm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: getattr(_tv(), name)(num_classes=FEATURES, **kw)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=FEATURES, **kw)

    return make


def _tv_class(cls: str, *args, **kw) -> Callable[[], nn.Module]:
    return lambda: getattr(_tv(), cls)(*args, num_classes=FEATURES, **kw)


TORCHVISION: dict[str, ZooCase] = {
    "resnet18": ZooCase("torchvision", _tvm("resnet18")),
    "mobilenet_v3_small": ZooCase("torchvision", _tvm("mobilenet_v3_small")),
    "mnasnet0_5": ZooCase("torchvision", _tvm("mnasnet0_5")),
    "squeezenet1_1": ZooCase("torchvision", _tvm("squeezenet1_1")),
    "densenet (2-2-2-2 blocks)": ZooCase("torchvision", _tv_class("DenseNet", 8, (2, 2, 2, 2), 16)),
    "lraspp_mobilenet_v3_large": ZooCase("torchvision", _seg("lraspp_mobilenet_v3_large"), dense=True),
    "resnet50 (bottleneck, 1 block/stage)": ZooCase("torchvision", _resnet("Bottleneck")),
    "resnext50_32x4d (1 block/stage)": ZooCase("torchvision", _resnet("Bottleneck", groups=32, width_per_group=4)),
    "mobilenet_v2": ZooCase("torchvision", _tvm("mobilenet_v2", width_mult=0.5)),
    "efficientnet_b0": ZooCase("torchvision", _tvm("efficientnet_b0")),
    "efficientnet_v2 (4 stages, 1 block each)": ZooCase("torchvision", _efficientnet_v2),
    "regnet_x_400mf": ZooCase("torchvision", _tvm("regnet_x_400mf")),
    "regnet_y_400mf": ZooCase("torchvision", _tvm("regnet_y_400mf")),
    "googlenet": ZooCase("torchvision", _tvm("googlenet", aux_logits=False, init_weights=False)),
    "inception_v3": ZooCase("torchvision", _tvm("inception_v3", aux_logits=False, init_weights=False), size=75),
    "alexnet (narrow classifier)": ZooCase("torchvision", _narrow("alexnet", 256), size=64),
    "vgg11_bn (narrow classifier)": ZooCase("torchvision", _narrow("vgg11_bn", 512)),
    "convnext (16-32-64, 1 block/stage)": ZooCase("torchvision", _convnext),
    "deeplabv3_mobilenet_v3_large": ZooCase("torchvision", _seg("deeplabv3_mobilenet_v3_large"), dense=True),
    "fcn_resnet50": ZooCase("torchvision", _seg("fcn_resnet50"), dense=True),
    "vit (2 layers, width 32, 4 heads)": ZooCase("torchvision", _tv_class("VisionTransformer", 32, 8, 2, 4, 32, 64)),
}
"""torchvision models that ``mtprune`` prunes (one per family)."""

TORCHVISION_REFUSED: dict[str, ZooCase] = {
    # Torch-Pruning 1.6.1 cannot build the dependency graph of its channel shuffle (at any input size)
    "shufflenet_v2_x0_5": ZooCase("torchvision", _tvm("shufflenet_v2_x0_5"),
                                  expect="Torch-Pruning cannot map the channels of TwoHeads"),
    # window attention: Torch-Pruning's index maps through window partitions do not fit in bounded memory
    "swin (2 stages, width 16)": ZooCase("torchvision", _tv_class("SwinTransformer", [4, 4], 16, [1, 1], [2, 2],
                                                                  [2, 2]), expect=WINDOW),
    "maxvit (2 stages, width 16)": ZooCase("torchvision", _tv_class("MaxVit", (32, 32), 16, 2, [16, 32], [1, 1], 8,
                                                                    0.0), expect=WINDOW),
}
"""torchvision models that ``mtprune`` refuses in one line."""

TIMM: dict[str, ZooCase] = {
    "tv_resnet18": ZooCase("torchvision", _tvm("resnet18")),
    "mobilenetv3_small_100": ZooCase("timm", _timm("mobilenetv3_small_100")),
    "convnext_atto": ZooCase("timm", _timm("convnext_atto")),
    "resnet26d": ZooCase("timm", _timm("resnet26d")),
    "tf_efficientnet_lite0": ZooCase("timm", _timm("tf_efficientnet_lite0")),
    "regnetx_002": ZooCase("timm", _timm("regnetx_002")),
    "ghostnet_050": ZooCase("timm", _timm("ghostnet_050")),
    "rexnet_100": ZooCase("timm", _timm("rexnet_100")),
    "mixer_s16_224 (32 px)": ZooCase("timm", _timm("mixer_s16_224", img_size=32)),
    "deit_tiny_patch16_224 (32 px)": ZooCase("timm", _timm("deit_tiny_patch16_224", img_size=32)),
    "mobilevit_xxs": ZooCase("timm", _timm("mobilevit_xxs"), size=64),
    # LeViT's attention biases are indexed by position; some plans break its forward and are undone
    "levit_128s (64 px)": ZooCase("timm", _timm("levit_128s", img_size=64), size=64, expect=EITHER),
    # PoolFormer's layer scale is a parameter reshaped with .view(-1, 1, 1), which Torch-Pruning cannot map
    "poolformer_s12": ZooCase("timm", _timm("poolformer_s12"), expect="breaks the model .*the model is unchanged"),
}
"""timm models (and torchvision ``resnet18``, the CNN the fast criterion grid runs on), with expected outcomes."""


def build(case: ZooCase, batch: int = 2) -> tuple[TwoHeads, Tensor]:
    """The wrapped model (seeded, eval mode) and a seeded input batch of ``case.size`` pixels."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, case.size, case.size, generator=torch.Generator().manual_seed(1))
    return TwoHeads(case.make(), case.dense).eval(), x


def synthetic_data(model: TwoHeads, x: Tensor, batches: int = 1, seed: int = 2) -> tuple[list, dict]:
    """``batches`` batches shaped like ``x`` (the first is ``x`` itself) with random targets for both heads
    (class labels and cross-entropy; per-pixel values and MSE for dense heads), and their losses: enough for the
    gradient criteria to score every channel."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(batches):
        xb = x if i == 0 else torch.randn(x.shape, generator=g)
        with torch.no_grad():
            out = model(xb)
        if model.dense:
            targets = {k: torch.randn(v.shape, generator=g) for k, v in out.items()}
        else:
            targets = {k: torch.randint(0, v.shape[1], (xb.shape[0],), generator=g) for k, v in out.items()}
        data.append((xb, targets))
    loss = F.mse_loss if model.dense else F.cross_entropy
    return data, {k: loss for k in data[0][1]}
