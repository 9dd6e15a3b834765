"""Small building blocks shared by the model zoo: channel scaling, output-stride planning, init.

Every zoo module scales its channel counts with :func:`scale_channels`, so ``width=1.0`` gives the
paper's sizes and smaller widths give CPU-sized variants of the same topology.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from mtprune.utils.errors import MTPruneInputError


def check_width(width: float) -> float:
    """Return ``width`` as a float, or refuse anything that is not a finite positive number."""
    if isinstance(width, bool) or not isinstance(width, int | float):
        raise MTPruneInputError(f"width must be a positive number, got {type(width).__name__}")
    if not math.isfinite(width) or width <= 0:
        raise MTPruneInputError(f"width must be a positive number, got {width!r}")
    return float(width)


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded half up, and at least 1."""
    return max(1, int(math.floor(channels * width + 0.5)))


def plan_output_stride(strides: Sequence[int], output_stride: int, initial_stride: int = 1) -> list[tuple[int, int]]:
    """Turn the strides of consecutive stages into ``(stride, dilation)`` pairs for a target output stride.

    Stages keep their stride until the cumulative stride reaches ``output_stride``; after that each would-be
    stride is replaced by stride 1 and the dilation grows by the same factor (the "atrous" trick of
    Chen et al., DeepLab v2, 2017), so the receptive field is preserved at a higher resolution.
    """
    total, dilation, plan = initial_stride, 1, []
    for stride in strides:
        if total * stride > output_stride:
            dilation *= stride
            plan.append((1, dilation))
        else:
            total *= stride
            plan.append((stride, dilation))
    if total != output_stride:
        valid = sorted({initial_stride * math.prod(strides[:i]) for i in range(len(strides) + 1)})
        raise MTPruneInputError(f"output_stride must be one of {valid}, got {output_stride!r}")
    return plan


def init_weights(module: nn.Module) -> None:
    """He (Kaiming) normal init for convs, N(0, 0.01) for linear layers, BN at identity, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int, else raise an input error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MTPruneInputError(f"{name} must be a positive int, got {value!r}")
    return value
