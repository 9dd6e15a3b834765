"""The cost of a pruned configuration, computed from widths: no deep copy, no re-tracing.

:class:`CostModel` takes per-sample MACs of every conv/linear layer as :func:`mtprune.measure.layer_macs` counts
them, and each layer's input and output shapes, from the forward the graph traced (:func:`layer_costs`; one
counting forward of its own where that record cannot be used, e.g. attention matmuls), and reads from the
:class:`~mtprune.pruning.graph.PruningGraph` which input and output channels of which layer every channel group
touches. A plan (group index -> channels to remove) then gives every layer's kept input and output widths, and

- **MACs**: a layer's MACs scale with its kept output fraction times its kept input fraction (a depthwise conv:
  the output fraction only). Spatial sizes do not change when channels are removed, so this is exactly the count
  of :func:`mtprune.pruning.prune.count`.
- **parameters**: conv/linear weights scale the same way, biases and per-channel norm parameters with the kept
  output channels.
- **any per-layer cost** ``fn(layer, in_width, out_width)``, e.g. a latency table (``pruning/latency.py``),
  summed over the layers; :class:`Tracker` keeps such a sum up to date while an allocator removes channels one
  block at a time, touching only the layers of the group that changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..measure import layer_macs
from ..utils.inputs import first_samples
from ..utils.runtime import eval_mode
from . import attention
from .graph import ChannelGroup, PruningGraph

__all__ = ["CostModel", "LayerShape", "Tracker", "layer_costs"]

Plan = Mapping[int, Sequence[int]]
LayerCost = Callable[[str, int, int], float]


@dataclass(frozen=True)
class LayerShape:
    """One conv/linear layer as it runs in the dense model (per sample)."""

    name: str
    kind: str  # "conv", "pointwise" (1×1, groups 1), "depthwise", "grouped", "linear", "conv_transpose"
    cin: int
    cout: int
    macs: int
    in_shape: tuple[int, ...]  # one sample's input, without the batch dimension
    out_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    bias: bool = False
    groups: int = 1
    prune_in: bool = False  # some group removes input channels of this layer
    prune_out: bool = False  # some group removes output channels of this layer


def layer_kind(module: nn.Module) -> str:
    """The kind of a conv/linear layer, as used for per-kind ``round_to`` and latency signatures."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if module.groups > 1:
        return "depthwise" if module.groups == module.in_channels == module.out_channels else "grouped"
    return "pointwise" if all(k == 1 for k in module.kernel_size) else "conv"


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _multiplicity(root: list[int], channels: int) -> Tensor:
    """How many local channels each group channel stands for (a flatten: ``h*w``; a split: 0 for some)."""
    return torch.from_numpy(np.bincount(np.asarray(root, dtype=np.int64), minlength=channels).astype(np.float64))


def layer_costs(model: nn.Module, example_inputs: Any, graph: PruningGraph | None = None
                ) -> tuple[dict[str, int], dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Per-sample MACs by module name (exactly :func:`mtprune.measure.layer_macs`) and each conv/linear layer's
    first (input, output) shape per sample.

    Read from the forward that ``graph`` traced when it recorded one (``PruningGraph(record_layers=True)``) that
    :meth:`~mtprune.measure.LayerRecord.describes` this model on these inputs: batch 1, same shapes, no layer
    changed since, and every counted call a module's own weight. Otherwise (attention matmuls and other calls
    without a weight, whose module ``layer_macs`` finds with hooks on every module) one counting forward runs.
    """
    record = graph.layer_record if graph is not None and graph.model is model else None
    if record is not None and record.describes(model, example_inputs):
        return dict(record.macs), dict(record.shapes)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            def hook(mod, args, out, name=name):
                if name not in shapes and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                    shapes[name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
            hooks.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            macs, _ = layer_macs(model, first_samples(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return macs, shapes


class CostModel:
    """Costs of pruned configurations of ``model`` (as traced by ``graph``), from widths only.

    Build it on the dense model, before pruning: the plans it evaluates refer to ``graph.groups``. Without a
    graph it costs the model as it is (no plan can be evaluated).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, graph: PruningGraph | None) -> None:
        self.groups: list[ChannelGroup] = list(graph.groups) if graph is not None else []
        modules = dict(model.named_modules())
        macs, shapes = layer_costs(model, example_inputs, graph)
        self.params_total = sum(p.numel() for p in model.parameters())
        self.macs_total = sum(macs.values())
        layer_types = nn.Linear | nn.modules.conv._ConvNd
        # MACs not owned by a conv/linear module (attention matmuls, functional calls): kept as a constant, except
        # those of attention modules, which scale with their widths (pruning/attention.py: cost_shape)
        costed = lambda m: isinstance(m, layer_types) or attention.cost_shape(m) is not None  # noqa: E731
        self.other_macs = sum(v for n, v in macs.items() if not costed(modules.get(n)))
        macs = {n: v for n, v in macs.items() if costed(modules.get(n))}
        per_channel = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
        # parameters outside layers and norms (embeddings, layer scales, ...) may shrink unseen by the maps
        self._plain = all(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, *per_channel)) for m in modules.values()
                          if any(True for _ in m.parameters(recurse=False)))
        # which layer channels each group touches: (layer, "in"/"out", local channels per group channel)
        self.touch: dict[int, list[tuple[str, str, Tensor]]] = {}
        self.norms: dict[int, list[tuple[str, Tensor]]] = {}
        pruned_in: set[str] = set()
        pruned_out: set[str] = set()
        for g in self.groups:
            entries = [(n, "out", _multiplicity(g.out_maps[n].root, g.channels)) for n in g.producers]
            entries += [(n, "in", _multiplicity(g.in_maps[n].root, g.channels)) for n in g.consumers]
            entries += attention.cost_touch(g)  # attention products, MultiheadAttention's in_proj
            self.touch[g.index] = [e for e in entries if e[0] in macs]
            self.norms[g.index] = [(n, _multiplicity(g.out_maps[n].root, g.channels)) for n in g.norms]
            pruned_out.update(g.producers)
            pruned_in.update(g.consumers)
        self.layers: dict[str, LayerShape] = {}
        attention_weights: dict[str, int] = {}
        for name, value in macs.items():
            m = modules[name]
            if not isinstance(m, nn.Linear | nn.modules.conv._ConvNd):  # attention: scaled by its widths
                shape = attention.cost_shape(m)
                if shape is not None:
                    self.layers[name] = LayerShape(name=name, kind=shape[0], cin=shape[1], cout=shape[1],
                                                   macs=int(value), in_shape=(), out_shape=())
                    attention_weights[name] = shape[2]
                continue
            cin, cout = _widths(m)
            ins, outs = shapes.get(name, ((), ()))
            conv = not isinstance(m, nn.Linear)
            self.layers[name] = LayerShape(
                name=name, kind=layer_kind(m), cin=cin, cout=cout, macs=int(value), in_shape=ins, out_shape=outs,
                kernel=tuple(m.kernel_size) if conv else (), stride=tuple(m.stride) if conv else (),
                padding=(m.padding if isinstance(m.padding, str) else tuple(m.padding)) if conv else (),
                dilation=tuple(m.dilation) if conv else (), bias=m.bias is not None,
                groups=m.groups if conv else 1,
                prune_in=name in pruned_in, prune_out=name in pruned_out)
        self._weights = {n: attention_weights[n] if n in attention_weights else modules[n].weight.numel()
                         for n in self.layers}
        self._norm_params = {n: [p.shape[0] if p.dim() else 0 for p in modules[n].parameters(recurse=False)]
                             for idx in self.norms for n, _ in self.norms[idx]}
        # multiplicity tensors with a single value (one-to-one maps: 1.0), by id, for :meth:`gone`
        mults = [m for e in self.touch.values() for _, _, m in e] + [m for e in self.norms.values() for _, m in e]
        self._uniform = {id(m): float(m[0]) for m in mults if len(m) and bool((m == m[0]).all())}

    # ------------------------------------------------------------------ widths of a plan
    def removed(self, plan: Plan) -> tuple[dict[str, float], dict[str, float]]:
        """(input channels, output channels) removed from each touched layer by ``plan``."""
        rm_in: dict[str, float] = {}
        rm_out: dict[str, float] = {}
        for gi, idxs in plan.items():
            if not len(idxs):
                continue
            for name, side, mult in self.touch[gi]:
                target = rm_out if side == "out" else rm_in
                target[name] = target.get(name, 0.0) + self.gone(mult, idxs)
        return rm_in, rm_out

    def gone(self, mult: Tensor, idxs: Sequence[int]) -> float:
        """How many channels of a layer the group channels ``idxs`` stand for (``mult``: per group channel, as in
        :attr:`touch` and :attr:`norms`). Those of a one-to-one map (most) are counted without indexing."""
        same = self._uniform.get(id(mult))  # only the model's own tensors are there, alive while it is
        if same is not None:
            return same * len(idxs)
        return float(mult[torch.as_tensor(list(idxs), dtype=torch.long)].sum())

    def widths(self, plan: Plan) -> dict[str, tuple[int, int]]:
        """Every layer's kept (input, output) width once ``plan`` is applied."""
        rm_in, rm_out = self.removed(plan)
        return {n: self.kept(n, rm_in.get(n, 0.0), rm_out.get(n, 0.0)) for n in self.layers}

    def kept(self, name: str, rm_in: float, rm_out: float) -> tuple[int, int]:
        s = self.layers[name]
        cout = s.cout - round(rm_out)
        cin = cout if s.kind == "depthwise" else s.cin - round(rm_in)
        return cin, cout

    # ------------------------------------------------------------------ costs
    def layer_macs(self, name: str, cin: int, cout: int) -> float:
        """A layer's per-sample MACs at widths (``cin``, ``cout``)."""
        s = self.layers[name]
        value = s.macs * cout / s.cout
        return value if s.kind == "depthwise" else value * cin / s.cin

    def total(self, plan: Plan, fn: LayerCost) -> float:
        """Σ over every layer of ``fn(layer, kept in, kept out)``."""
        return sum(fn(n, cin, cout) for n, (cin, cout) in self.widths(plan).items())

    @property
    def exact(self) -> bool:
        """Whether :meth:`macs` and :meth:`params` are exact: every counted MAC belongs to a conv/linear layer
        and every parameter to a layer or a per-channel norm."""
        return self.other_macs == 0 and self._plain

    def macs(self, plan: Plan) -> int:
        """Per-sample MACs once ``plan`` is applied: exactly what ``count`` measures after pruning when
        :attr:`exact` (else the MACs of other calls, such as attention matmuls, are taken as unchanged)."""
        rm_in, rm_out = self.removed(plan)
        saved = sum(self.layers[n].macs - self.layer_macs(n, *self.kept(n, rm_in.get(n, 0.0), rm_out.get(n, 0.0)))
                    for n in set(rm_in) | set(rm_out))
        return round(self.macs_total - saved)

    def params(self, plan: Plan) -> int:
        """Parameters once ``plan`` is applied."""
        rm_in, rm_out = self.removed(plan)
        saved = 0.0
        for n in set(rm_in) | set(rm_out):
            s = self.layers[n]
            cin, cout = self.kept(n, rm_in.get(n, 0.0), rm_out.get(n, 0.0))
            keep = cout / s.cout * (1.0 if s.kind == "depthwise" else cin / s.cin)
            saved += self._weights[n] * (1 - keep) + (s.cout - cout if s.bias else 0)
        for gi, idxs in plan.items():
            if not len(idxs):
                continue
            for name, mult in self.norms[gi]:
                gone = self.gone(mult, idxs)
                saved += sum(gone for size in self._norm_params[name] if size > 1)
        return round(self.params_total - saved)

    def tracker(self, fn: LayerCost) -> Tracker:
        """A running sum of ``fn`` over the layers, starting from the dense widths."""
        return Tracker(self, fn)


class Tracker:
    """Σ ``fn(layer, in, out)`` over the layers of a :class:`CostModel`, updated as channels are removed."""

    def __init__(self, cost: CostModel, fn: LayerCost) -> None:
        self.cost, self.fn = cost, fn
        self.rm_in: dict[str, float] = {}
        self.rm_out: dict[str, float] = {}
        self.layer_value = {n: fn(n, s.cin, s.cout) for n, s in cost.layers.items()}
        self.value = sum(self.layer_value.values())

    def _after(self, gi: int, idxs: Sequence[int]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        rm_in: dict[str, float] = {}
        rm_out: dict[str, float] = {}
        for name, side, mult in self.cost.touch[gi]:
            target, base = (rm_out, self.rm_out) if side == "out" else (rm_in, self.rm_in)
            target[name] = target.get(name, base.get(name, 0.0)) + self.cost.gone(mult, idxs)
        return {n: self.fn(n, *self.cost.kept(n, rm_in.get(n, self.rm_in.get(n, 0.0)),
                                              rm_out.get(n, self.rm_out.get(n, 0.0))))
                for n in set(rm_in) | set(rm_out)}, rm_in, rm_out

    def delta(self, gi: int, idxs: Sequence[int]) -> float:
        """How much the sum changes (negative: it falls) if group ``gi`` loses channels ``idxs`` now."""
        values, _, _ = self._after(gi, idxs)
        return sum(v - self.layer_value[n] for n, v in values.items())

    def apply(self, gi: int, idxs: Sequence[int]) -> None:
        values, rm_in, rm_out = self._after(gi, idxs)
        self.rm_in.update(rm_in)
        self.rm_out.update(rm_out)
        for n, v in values.items():
            self.value += v - self.layer_value[n]
            self.layer_value[n] = v
