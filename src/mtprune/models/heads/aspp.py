"""ASPP task heads (Chen et al., DeepLab v2 2017 and DeepLab v3 2017). Outputs stay at feature resolution.

* ``aspp_v2`` -- DeepLab-v2 ASPP as used by AdaShare and DiSparse (Sun et al. 2022): four parallel branches,
  each conv3x3 (dilation 6/12/18/24) -> ReLU -> dropout -> conv1x1 hidden->hidden -> ReLU -> dropout ->
  conv1x1 -> outputs; the four branch outputs are summed. ``hidden`` is 1024 at width 1.
* ``small_aspp`` -- the same head with dilations 1/2/4/6: Garg et al. 2023's SmallASPP. With the dense VGG-16
  and NYUv2's 40/3/1 output channels the whole model has 84,125,680 parameters (biases included), the paper's
  84.13M, so the 1024-wide first layer is indeed a 3x3 conv and the next one a 1x1.
* ``deeplabv3_aspp`` -- DeepLab-v3 ASPP: a 1x1 branch, three 3x3 branches with dilations 12/24/36 and an
  image-pooling branch (global average -> 1x1), all 256 wide with BN + ReLU, concatenated and projected by
  1x1 + BN + ReLU (+ dropout, 0.1 by our choice); then 3x3 conv + BN + ReLU and a 1x1 classifier. The paper
  uses rates 6/12/18 at output stride 16 and doubles them at output stride 8; our dense backbones are at
  output stride 8, hence 12/24/36 by default (pass ``rates=(6, 12, 18)`` for output stride 16). As in the
  paper, the image-pooling branch has BatchNorm, so training it needs batches of more than one image.

Predictors: every head has a ``predictor`` property, the list of its output layers, which pruning protects.
For the branch-sum heads that is the four final 1x1 convs (they are summed, so they share output channels);
for ``deeplabv3_aspp`` it is the final 1x1 classifier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers import check_positive_int, init_weights, scale_channels
from ..registry import register_head


class BranchSumASPP(nn.Module):
    """Parallel atrous branches conv3x3(d) -> ReLU -> drop -> conv1x1 -> ReLU -> drop -> conv1x1, summed.

    Args:
        in_channels: feature channels. out_channels: task outputs.
        dilations: one branch per dilation.
        hidden: branch width at ``width`` 1. width: multiplier for ``hidden``. dropout: probability.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int],
        hidden: int = 1024,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        mid = scale_channels(check_positive_int("hidden", hidden), width)
        branches = []
        for d in dilations:
            d = check_positive_int("dilation", d)
            branches.append(
                nn.Sequential(
                    OrderedDict(
                        conv=nn.Conv2d(in_channels, mid, 3, padding=d, dilation=d),
                        relu1=nn.ReLU(),
                        drop1=nn.Dropout(dropout),
                        fc=nn.Conv2d(mid, mid, 1),
                        relu2=nn.ReLU(),
                        drop2=nn.Dropout(dropout),
                        out=nn.Conv2d(mid, out_channels, 1),
                    )
                )
            )
        if not branches:
            raise ValueError("BranchSumASPP needs at least one dilation")
        self.branches = nn.ModuleList(branches)
        init_weights(self)
        for branch in self.branches:  # DeepLab initialises the output layers with N(0, 0.01)
            nn.init.normal_(branch.out.weight, 0.0, 0.01)

    @property
    def predictor(self) -> list[nn.Module]:
        """The final 1x1 conv of every branch."""
        return [branch.out for branch in self.branches]

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


@register_head("aspp_v2")
def aspp_v2(
    in_channels: int,
    out_channels: int,
    dilations: Sequence[int] = (6, 12, 18, 24),
    hidden: int = 1024,
    width: float = 1.0,
    dropout: float = 0.5,
) -> BranchSumASPP:
    """DeepLab-v2 ASPP (AdaShare / DiSparse): dilations 6/12/18/24, hidden 1024."""
    return BranchSumASPP(in_channels, out_channels, dilations, hidden, width, dropout)


@register_head("small_aspp")
def small_aspp(
    in_channels: int,
    out_channels: int,
    dilations: Sequence[int] = (1, 2, 4, 6),
    hidden: int = 1024,
    width: float = 1.0,
    dropout: float = 0.5,
) -> BranchSumASPP:
    """SmallASPP of Garg et al. 2023: dilations 1/2/4/6, hidden 1024."""
    return BranchSumASPP(in_channels, out_channels, dilations, hidden, width, dropout)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv + BN + ReLU, broadcast back to the feature size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pool(x)).expand(-1, -1, x.shape[-2], x.shape[-1])


class DeepLabV3ASPP(nn.Module):
    """DeepLab-v3 ASPP head followed by a 3x3 conv and a 1x1 classifier (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int] = (12, 24, 36),
        channels: int = 256,
        width: float = 1.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        mid = scale_channels(check_positive_int("channels", channels), width)
        branches = [_conv_bn_relu(in_channels, mid, 1)]
        branches += [_conv_bn_relu(in_channels, mid, 3, check_positive_int("rate", r)) for r in rates]
        branches.append(ImagePooling(in_channels, mid))
        self.branches = nn.ModuleList(branches)
        self.project = _conv_bn_relu(mid * len(branches), mid, 1)
        self.dropout = nn.Dropout(dropout)
        self.conv = _conv_bn_relu(mid, mid, 3)
        self.classifier = nn.Conv2d(mid, out_channels, 1)
        init_weights(self)

    @property
    def predictor(self) -> list[nn.Module]:
        """The final 1x1 classifier."""
        return [self.classifier]

    def forward(self, x: Tensor) -> Tensor:
        x = self.project(torch.cat([branch(x) for branch in self.branches], dim=1))
        return self.classifier(self.conv(self.dropout(x)))


@register_head("deeplabv3_aspp")
def deeplabv3_aspp(
    in_channels: int,
    out_channels: int,
    rates: Sequence[int] = (12, 24, 36),
    channels: int = 256,
    width: float = 1.0,
    dropout: float = 0.1,
) -> DeepLabV3ASPP:
    """DeepLab-v3 ASPP (rates 12/24/36 for output stride 8) + 3x3 conv + 1x1 classifier."""
    return DeepLabV3ASPP(in_channels, out_channels, rates, channels, width, dropout)
