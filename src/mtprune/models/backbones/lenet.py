"""LeNet-5 backbone (LeCun et al., 1998), the small chain network of PAM's Fashion-MNIST experiments (He et al. 2021).

conv(6, 5x5) - ReLU - maxpool 2 - conv(16, 5x5) - ReLU - maxpool 2 - flatten - fc120 - ReLU - fc84 - ReLU,
no padding, so the flattened size depends on the input: 16*4*4 for 28x28 inputs, 16*5*5 for 32x32. The
backbone output is ``[N, 84*width]``; the task heads (``linear``) give the classes. A named ``nn.Sequential``
chain, as PAM needs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError

from ..layers import check_positive_int, init_weights, scale_channels
from ..registry import register_backbone


def _side(size: int) -> int:
    """Spatial side after conv5 - pool2 - conv5 - pool2 (no padding)."""
    return ((size - 4) // 2 - 4) // 2


class LeNet5(nn.Sequential):
    """LeNet-5 as a chain; checks the input's spatial size against ``input_size``."""

    def __init__(self, width: float = 1.0, in_channels: int = 3, input_size: int | Sequence[int] = 28) -> None:
        sides = [input_size] * 2 if isinstance(input_size, int) else list(input_size)
        if len(sides) != 2:
            raise MTPruneInputError(f"input_size must be an int or (H, W), got {input_size!r}")
        h, w = sides
        for side in sides:
            if check_positive_int("input_size", side) < 16:
                raise MTPruneInputError(f"LeNet-5 needs inputs of at least 16x16, got input_size {input_size!r}")
        c1, c2 = scale_channels(6, width), scale_channels(16, width)
        f1, f2 = scale_channels(120, width), scale_channels(84, width)
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(check_positive_int("in_channels", in_channels), c1, 5),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(c1, c2, 5),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(1),
                fc1=nn.Linear(c2 * _side(h) * _side(w), f1),
                relu3=nn.ReLU(),
                fc2=nn.Linear(f1, f2),
                relu4=nn.ReLU(),
            )
        )
        self.input_size = (h, w)
        self.out_channels = f2
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise MTPruneInputError(
                f"LeNet-5 was built for {self.input_size[0]}x{self.input_size[1]} inputs, got "
                f"{tuple(x.shape[-2:])}; set input_size"
            )
        return super().forward(x)


@register_backbone("lenet5", default_head="linear")
def lenet5(width: float = 1.0, in_channels: int = 3, input_size: int | Sequence[int] = 28) -> LeNet5:
    """LeNet-5 for ``in_channels x input_size x input_size`` images (input_size may be ``(H, W)``)."""
    return LeNet5(width, in_channels, input_size)
