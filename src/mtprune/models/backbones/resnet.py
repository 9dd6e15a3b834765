"""Deeplab-ResNet backbones (He et al., CVPR 2016) at output stride 8 by dilation (Chen et al., DeepLab v2, 2017).

The Deeplab-ResNet34 of AdaShare and DiSparse (Sun et al., CVPR 2022): the usual stem (conv 7x7/2, BN, ReLU,
max-pool 3x3/2) and four stages; for output stride 8 the last two stages keep stride 1 and use dilation 2 and 4
instead (``output_stride`` 16 and 32 are available too). Every block of a dilated stage uses that stage's
dilation, as in DeepLab v2. Bottlenecks put the stride on the 3x3 conv (torchvision's "v1.5"). Shortcuts are
1x1 conv + BN whenever the shape changes. The output is the last stage's feature map, with ``out_channels``
512 (ResNet-18/34) or 2048 (ResNet-50) times ``width``; parameters at width 1 equal torchvision's ResNet
minus its fc layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import check_positive_int, init_weights, plan_output_stride, scale_channels
from ..registry import register_backbone


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 conv + BN) shortcut; supports dilation."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv3x3(in_ch, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, out_ch, 1, dilation)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand by 4, with a shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class DeepLabResNet(nn.Module):
    """A ResNet trunk without pooling/fc whose last stages trade stride for dilation.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-34.
        width: channel multiplier (1.0 = He et al.).
        in_channels: input image channels.
        output_stride: 8 (default), 16 or 32.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        width: float = 1.0,
        in_channels: int = 3,
        output_stride: int = 8,
    ) -> None:
        super().__init__()
        stem = scale_channels(64, width)
        in_channels = check_positive_int("in_channels", in_channels)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        plan = plan_output_stride((1, 2, 2, 2), output_stride, initial_stride=4)
        in_ch = stem
        stages = zip(layers, (64, 128, 256, 512), plan, strict=True)
        for index, (blocks, base, (stride, dilation)) in enumerate(stages, 1):
            planes = scale_channels(base, width)
            stage = []
            for i in range(blocks):
                stage.append(block(in_ch, planes, stride if i == 0 else 1, dilation))
                in_ch = planes * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.out_channels = in_ch
        self.output_stride = output_stride
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_backbone("deeplab_resnet18", default_head="aspp_v2")
def deeplab_resnet18(width: float = 1.0, in_channels: int = 3, output_stride: int = 8) -> DeepLabResNet:
    """Deeplab-ResNet-18 (BasicBlock, 2-2-2-2)."""
    return DeepLabResNet(BasicBlock, (2, 2, 2, 2), width, in_channels, output_stride)


@register_backbone("deeplab_resnet34", default_head="aspp_v2")
def deeplab_resnet34(width: float = 1.0, in_channels: int = 3, output_stride: int = 8) -> DeepLabResNet:
    """Deeplab-ResNet-34 (BasicBlock, 3-4-6-3): the DiSparse / AdaShare backbone."""
    return DeepLabResNet(BasicBlock, (3, 4, 6, 3), width, in_channels, output_stride)


@register_backbone("deeplab_resnet50", default_head="aspp_v2")
def deeplab_resnet50(width: float = 1.0, in_channels: int = 3, output_stride: int = 8) -> DeepLabResNet:
    """Deeplab-ResNet-50 (Bottleneck, 3-4-6-3)."""
    return DeepLabResNet(Bottleneck, (3, 4, 6, 3), width, in_channels, output_stride)
