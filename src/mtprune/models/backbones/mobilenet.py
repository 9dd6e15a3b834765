"""MobileNetV2 backbone (Sandler et al., CVPR 2018) at output stride 8 by dilation.

Inverted residual blocks (1x1 expand, 3x3 depthwise, linear 1x1 project; ReLU6; identity shortcut when the
shape allows) with the paper's table of (expansion t, channels c, repeats n, stride s). For dense prediction
the strides after output stride 8 become stride 1 with dilation 2 (the 64- and 96-channel stages) and 4 (the
160- and 320-channel stages), as in DeepLabV3 (Chen et al., 2017). The final 1x1 conv to 1280 of the
classifier is left out, as in DeepLabV3's MobileNetV2: the output has 320*width channels. Channel counts are
``round(c * width)`` (not rounded to multiples of 8), which equals the paper at width 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import check_positive_int, init_weights, plan_output_stride, scale_channels
from ..registry import register_backbone

# (expansion t, output channels c, repeats n, stride s): Table 2 of Sandler et al.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1):
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 (strided or dilated) -> linear projection (1x1 + BN)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int, dilation: int = 1) -> None:
        super().__init__()
        hidden = int(round(in_ch * expansion))
        layers = [] if expansion == 1 else [_conv_bn_relu6(in_ch, hidden, 1)]
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor; ``out_channels`` = 320*width."""

    def __init__(self, width: float = 1.0, in_channels: int = 3, output_stride: int = 8) -> None:
        super().__init__()
        in_ch = scale_channels(32, width)
        blocks: list[nn.Module] = [_conv_bn_relu6(check_positive_int("in_channels", in_channels), in_ch, 3, 2)]
        plan = plan_output_stride([s for *_, s in _SETTINGS], output_stride, initial_stride=2)
        for (t, c, n, _), (stride, dilation) in zip(_SETTINGS, plan, strict=True):
            out_ch = scale_channels(c, width)
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, t, dilation))
                in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.out_channels = in_ch
        self.output_stride = output_stride
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@register_backbone("mobilenetv2", default_head="deeplabv3_aspp")
def mobilenetv2(width: float = 1.0, in_channels: int = 3, output_stride: int = 8) -> MobileNetV2:
    """MobileNetV2 at output stride 8 (16 and 32 also accepted)."""
    return MobileNetV2(width, in_channels, output_stride)
