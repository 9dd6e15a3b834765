"""Per-sample conv/linear MACs after removing channels, without surgery (PAGCP's trials, Ye et al. 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ...measure import layer_macs
from ...utils.inputs import first_samples
from ..graph import ChannelGroup


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups == module.in_channels == \
        module.out_channels


class MacsModel:
    """Per-sample conv/linear MACs of the model after removing channels, computed without surgery.

    Each layer's MACs (``mtprune.measure.layer_macs``, measured once) are scaled by the kept fraction of its
    output channels (as a producer) and of its input channels (as a consumer); a depthwise conv by its output
    fraction only. Exact for the MACs mtprune counts: spatial sizes do not change when channels are removed.
    """

    def __init__(self, model: nn.Module, example_inputs: Tensor) -> None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.base, _ = layer_macs(model, first_samples(example_inputs))
        finally:
            model.train(was)
        modules = dict(model.named_modules())
        self.layers = {n: modules[n] for n in self.base}
        self.total = sum(self.base.values())

    def after(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> int:
        """MACs once ``plan`` (group index → channels to remove) is applied."""
        out_rm: dict[str, set[int]] = {}
        in_rm: dict[str, set[int]] = {}
        for gi, idxs in plan.items():
            g, drop = groups[gi], set(idxs)
            for name in g.producers:
                out_rm.setdefault(name, set()).update(g.out_maps[name].locals_of(drop))
            for name in g.consumers:
                in_rm.setdefault(name, set()).update(g.in_maps[name].locals_of(drop))
        total = 0.0
        for name, macs in self.base.items():
            if name not in out_rm and name not in in_rm:
                total += macs
                continue
            module = self.layers[name]
            cin, cout = _widths(module)
            keep_out = 1 - len(out_rm.get(name, ())) / cout
            keep_in = 1.0 if _is_depthwise(module) else 1 - len(in_rm.get(name, ())) / cin
            total += macs * keep_out * keep_in
        return round(total)

    def saved(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> int:
        return self.total - self.after(groups, plan)

