"""Simple task heads. Outputs stay at feature resolution.

* ``conv`` -- conv3x3 (hidden, 256 at width 1) + BN + ReLU -> conv1x1 to the outputs: a light dense head.
* ``linear`` -- for classification and attributes: a 4-D input is global-average-pooled and flattened; an
  optional hidden Linear + ReLU (``hidden``, scaled by ``width``); then the final Linear (fc8 of VGG-16,
  Simonyan & Zisserman 2015; the classifier of LeNet-5, LeCun et al. 1998).

Predictors: each head's ``predictor`` property is ``[final layer]`` (the 1x1 conv or the last Linear), which
pruning protects.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import check_positive_int, init_weights, scale_channels
from ..registry import register_head


class ConvHead(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv1x1."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 256, width: float = 1.0) -> None:
        super().__init__()
        mid = scale_channels(check_positive_int("hidden", hidden), width)
        self.conv = nn.Conv2d(in_channels, mid, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()
        self.out = nn.Conv2d(mid, out_channels, 1)
        init_weights(self)

    @property
    def predictor(self) -> list[nn.Module]:
        """The final 1x1 conv."""
        return [self.out]

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.relu(self.bn(self.conv(x))))


class LinearHead(nn.Module):
    """[global average pool + flatten if 4-D] -> [Linear + ReLU] -> Linear."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None, width: float = 1.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        if hidden is None:
            self.hidden = None
            features = in_channels
        else:
            features = scale_channels(check_positive_int("hidden", hidden), width)
            self.hidden = nn.Sequential(nn.Linear(in_channels, features), nn.ReLU())
        self.out = nn.Linear(features, out_channels)
        init_weights(self)

    @property
    def predictor(self) -> list[nn.Module]:
        """The final Linear."""
        return [self.out]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = self.pool(x).flatten(1)
        if self.hidden is not None:
            x = self.hidden(x)
        return self.out(x)


@register_head("conv")
def conv_head(in_channels: int, out_channels: int, hidden: int = 256, width: float = 1.0) -> ConvHead:
    """conv3x3-BN-ReLU-conv1x1 dense head."""
    return ConvHead(in_channels, out_channels, hidden, width)


@register_head("linear")
def linear_head(in_channels: int, out_channels: int, hidden: int | None = None, width: float = 1.0) -> LinearHead:
    """Linear classifier head, optionally with one hidden layer."""
    return LinearHead(in_channels, out_channels, hidden, width)
