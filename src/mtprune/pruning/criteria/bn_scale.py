"""|γ| of the BatchNorm that follows each filter (Liu et al., Network Slimming, ICCV 2017).

Groups without a normalisation layer are not candidates under this criterion.
"""

from __future__ import annotations

from torch import Tensor

from ..graph import ChannelGroup
from ..stats import GroupStats
from .base import Criterion


class BNScale(Criterion):
    name = "bn_scale"
    requirement = "it scores a group by its normalisation layer's scale, and no group has one"

    def applies_to(self, group: ChannelGroup) -> bool:
        return bool(group.norms)

    def score(self, stats: GroupStats) -> Tensor:
        return stats.norm_weight
