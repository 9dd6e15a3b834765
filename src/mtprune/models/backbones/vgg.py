"""VGG-16 backbones (Simonyan & Zisserman, ICLR 2015): 13 convs with ReLU and no BatchNorm, as a plain chain.

``vgg16`` (dense prediction; the backbone of Garg et al. 2023) follows DeepLab-LargeFOV (Chen et al., DeepLab
v2, 2017) for output stride 8: every block ends in a 3x3 max-pool with padding 1; pools 1-3 have stride 2,
pools 4-5 stride 1, and the convs after a stride-1 pool are dilated by the stride they gave up (conv5 at
dilation 2). The fc6/fc7 layers of LargeFOV are left out: the task heads (SmallASPP) read conv5's 512
channels directly. ``output_stride`` 16 or 32 moves the same rule one or two pools later.

``vgg16_cls`` (classification / attributes, e.g. CelebA in PAM, He et al. 2021) is the original network: 2x2
max-pools of stride 2, then a global average (``pool="avg"``), global max (``"max"``) or a flatten of the
final map (``"flatten"``, which needs ``input_size``), then fc6 and fc7 (4096 wide at width 1) with ReLU.
The task heads play the part of fc8. Both variants are ``nn.Sequential`` chains with named layers
(``conv1_1``, ``relu1_1``, ``pool1``, ... ``fc7``, ``relu7``) so that chain-only methods such as PAM apply.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from mtprune.utils.errors import MTPruneInputError

from ..layers import check_positive_int, init_weights, plan_output_stride, scale_channels
from ..registry import register_backbone

_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _features(
    in_channels: int, width: float, pool: Callable[[int], nn.Module], plan: list[tuple[int, int]],
    batch_norm: bool = False,
) -> tuple[OrderedDict[str, nn.Module], int]:
    """The 13 convs. ``plan[b]`` = (stride, dilation after) of pool ``b+1``; the next block uses that dilation;
    ``batch_norm`` puts a BatchNorm (``bn<b>_<i>``) between each conv and its ReLU (VGG-16-BN)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    in_ch = check_positive_int("in_channels", in_channels)
    dilation = 1
    for b, ((channels, convs), (stride, next_dilation)) in enumerate(zip(_BLOCKS, plan, strict=True), 1):
        out_ch = scale_channels(channels, width)
        for i in range(1, convs + 1):
            layers[f"conv{b}_{i}"] = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
            if batch_norm:
                layers[f"bn{b}_{i}"] = nn.BatchNorm2d(out_ch)
            layers[f"relu{b}_{i}"] = nn.ReLU()
            in_ch = out_ch
        layers[f"pool{b}"] = pool(stride)
        dilation = next_dilation
    return layers, in_ch


class VGG16(nn.Sequential):
    """A named chain of layers with ``out_channels`` (the width of its last output)."""

    def __init__(self, layers: OrderedDict[str, nn.Module], out_channels: int) -> None:
        super().__init__(layers)
        self.out_channels = out_channels
        init_weights(self)


@register_backbone("vgg16", default_head="small_aspp")
def vgg16(width: float = 1.0, in_channels: int = 3, output_stride: int = 8, batch_norm: bool = False) -> VGG16:
    """Dense VGG-16, DeepLab-LargeFOV layout, output ``[N, 512*width, H/8, W/8]`` (rounded up); ``batch_norm``:
    VGG-16-BN (a BatchNorm after every conv)."""
    plan = plan_output_stride((2, 2, 2, 2, 2), output_stride)
    layers, out_ch = _features(in_channels, width, lambda s: nn.MaxPool2d(3, stride=s, padding=1), plan, batch_norm)
    return VGG16(layers, out_ch)


_GLOBAL_POOLS: dict[str, Callable[[], nn.Module]] = {
    "avg": lambda: nn.AdaptiveAvgPool2d(1),
    "max": lambda: nn.AdaptiveMaxPool2d(1),
}


@register_backbone("vgg16_cls", default_head="linear")
def vgg16_cls(
    width: float = 1.0,
    in_channels: int = 3,
    pool: str = "avg",
    input_size: int | None = None,
    fc_hidden: int = 4096,
    batch_norm: bool = False,
) -> VGG16:
    """Classification VGG-16: 13 convs, 5 max-pools, a global pool or flatten, fc6-ReLU-fc7-ReLU.

    Output ``[N, fc_hidden*width]``. ``pool="flatten"`` needs ``input_size`` (the square input side);
    ``batch_norm``: VGG-16-BN (a BatchNorm after every conv).
    """
    layers, channels = _features(in_channels, width, lambda s: nn.MaxPool2d(2, stride=s), [(2, 1)] * 5, batch_norm)
    if pool in _GLOBAL_POOLS:
        layers["gpool"] = _GLOBAL_POOLS[pool]()
        flat = channels
    elif pool == "flatten":
        if input_size is None or check_positive_int("input_size", input_size) < 32:
            raise MTPruneInputError(f"vgg16_cls with pool='flatten' needs input_size >= 32, got {input_size!r}")
        flat = channels * (input_size // 32) ** 2
    else:
        raise MTPruneInputError(f"pool must be one of {[*_GLOBAL_POOLS, 'flatten']}, got {pool!r}")
    hidden = scale_channels(check_positive_int("fc_hidden", fc_hidden), width)
    layers["flatten"] = nn.Flatten(1)
    layers["fc6"] = nn.Linear(flat, hidden)
    layers["relu6"] = nn.ReLU()
    layers["fc7"] = nn.Linear(hidden, hidden)
    layers["relu7"] = nn.ReLU()
    return VGG16(layers, hidden)
