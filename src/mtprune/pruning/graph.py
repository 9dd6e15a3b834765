"""The channel-dependency graph of a multi-task model: the one adapter over Torch-Pruning.

Structured pruning removes whole channels. Removing output channel ``i`` of a conv also removes entry ``i`` of the
BatchNorm after it, input channel ``i`` of every layer that reads it, and, across a residual add, channel ``i`` of
every other layer summed into the same tensor. Torch-Pruning's DependencyGraph (Fang et al., "DepGraph: Towards
Any Structural Pruning", CVPR 2023) finds these coupled sets by tracing autograd; this module turns its groups into
plain :class:`ChannelGroup` records (module names, not Torch-Pruning objects) and removes channels on request.

Nothing else in mtprune imports ``torch_pruning`` (pinned ``==1.6.1``). What this adapter adds on top of it:

- **Output predictors are protected automatically**: a Conv/Linear whose output channels reach no other
  Conv/Linear (they flow to the model output, possibly through upsampling or a sum of branches), or whose channels
  are themselves returned by the model, keeps its output width. Protection blocks only the group of the
  predictor's *output* channels; its input channels are pruned with the layers that produce them.
- **The model is left as found**: Torch-Pruning traces in eval mode and does not restore train mode, and it cannot
  see frozen layers fed by inputs that need no gradient (a frozen stem or backbone: their outputs carry no
  ``grad_fn``), so their channels would silently fall out of every group. Tracing here enables
  ``requires_grad`` temporarily and restores every module's ``training`` flag and every parameter's
  ``requires_grad`` flag afterwards, also after pruning (pruned parameters are new ``nn.Parameter`` objects).
- **Multi-task contract**: the model must return ``dict[str, Tensor]``; every returned output is traced.

Pruning replaces the pruned ``nn.Parameter`` objects (and the BatchNorm buffers): **callers must rebuild their
optimizers (and any other object holding parameter references) after** :meth:`PruningGraph.prune`.

Scope: Conv (1-D/2-D/3-D, transposed, depthwise) and Linear layers with BatchNorm/GroupNorm/InstanceNorm/
LayerNorm/PReLU, joined by residual adds, concatenations, splits, upsampling, pooling and flatten. Groups touching
a grouped convolution that is not depthwise (``1 < groups`` and not ``groups == in == out``) are left unpruned.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from mtprune.models.validate import check_multitask_output
from mtprune.utils.errors import MTPruneInputError

if TYPE_CHECKING:
    import torch_pruning as tp

__all__ = ["ChannelGroup", "ChannelMap", "PruningGraph", "apply_widths"]

_CONV = nn.modules.conv._ConvNd
_LINEAR = nn.Linear
_LAYER_TYPES = (_CONV, _LINEAR)


class ChannelMap(NamedTuple):
    """Which channels of one module a group's channels touch: ``root[k]`` (a group channel) ↔ ``local[k]``.

    For the usual layers the map is the identity (``root == local == range(channels)``). It is not when a module
    sees a group through a concatenation (an offset), a flatten (one channel ↔ ``h*w`` input features), or
    carries more channels than the group. Scores can be gathered with ``scores.index_add_(0, root, per_local)``.
    """

    root: list[int]
    local: list[int]


@dataclass
class ChannelGroup:
    """One set of coupled channels that are removed together (one dependency group of DepGraph)."""

    index: int  # position in PruningGraph.groups
    root: str  # the module whose out-channels define the group (its first producer in module order)
    channels: int  # current number of channels in the group
    producers: list[str]  # Conv/Linear modules whose OUTPUT channels are these channels
    consumers: list[str]  # Conv/Linear modules whose INPUT channels are these channels
    norms: list[str]  # per-channel modules on these channels (BatchNorm, GroupNorm, InstanceNorm, LayerNorm, PReLU)
    gates: list[str]  # where a Taylor gate sits: for each producer, its following norm if any, else the producer
    part: str  # "backbone" or the task whose head holds the producers
    out_maps: dict[str, ChannelMap] = field(default_factory=dict)  # producers and norms: group channel ↔ out channel
    in_maps: dict[str, ChannelMap] = field(default_factory=dict)  # consumers: group channel ↔ input channel(s)


def _is_layer(m: object) -> bool:
    return isinstance(m, _LAYER_TYPES)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    """A grouped conv Torch-Pruning cannot prune correctly (anything with groups > 1 that is not depthwise)."""
    return isinstance(m, _CONV) and m.groups > 1 and not _is_depthwise(m)


def _optype(name: str) -> Any:
    from torch_pruning.ops import OPTYPE

    return OPTYPE[name]


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, list | tuple):
        return model(*example_inputs)
    return model(example_inputs)


def _resolve_names(model: nn.Module, names: Iterable[str], what: str) -> set[str]:
    """Expand module names (a container stands for all its submodules); unknown names are an input error."""
    modules = dict(model.named_modules())
    out: set[str] = set()
    for name in names:
        if name not in modules:
            raise MTPruneInputError(f"{what}: the model has no module named {name!r}")
        prefix = f"{name}." if name else ""
        out.update(n for n in modules if n == name or n.startswith(prefix))
    return out


class PruningGraph:
    """The prunable channel groups of a multi-task model, and their physical removal.

    Args:
        model: any ``nn.Module`` whose forward returns ``dict[str, Tensor]`` (all heads must run on
            ``example_inputs``); it is modified in place by :meth:`prune`.
        example_inputs: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments, on the
            model's device. Keep it small (batch 1): the traced autograd graph is kept alive with the graph.
        protected: extra module names whose output channels are never pruned (a container name protects all of
            its layers). Output predictors are protected automatically.
        parts: module-name prefix -> part name, to attribute groups of a user model to tasks (the longest
            matching prefix wins). Without a match, ``heads.<task>.…`` gives ``<task>`` when ``model.heads`` is
            an ``nn.ModuleDict`` (``MultiTaskModel``); anything else is ``"backbone"``.
        min_channels: no group may be pruned below this width.

    After :meth:`prune`, the Parameter objects of pruned layers are new: rebuild optimizers.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor | tuple | Any,
        *,
        protected: Iterable[str] = (),
        parts: Mapping[str, str] | None = None,
        min_channels: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MTPruneInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(min_channels) < 1:
            raise ValueError(f"min_channels must be >= 1, got {min_channels}")
        self.model = model
        self.example_inputs = example_inputs
        self.min_channels = int(min_channels)
        self._explicit = _resolve_names(model, protected, "protected")
        self._parts = dict(parts or {})
        if self._parts:
            _resolve_names(model, self._parts.keys(), "parts")
        self.groups: list[ChannelGroup] = []
        self.protected: list[str] = []
        self._build()

    # ------------------------------------------------------------------ tracing
    def _trace(self) -> tuple[tp.DependencyGraph, set[Any]]:
        """Build Torch-Pruning's graph; restore modes, ``requires_grad`` and hooks whatever happens."""
        model = self.model
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.requires_grad for p in model.parameters()}
        hooks = {m: set(m._forward_hooks) for m in model.modules()}
        holder: dict[str, Any] = {}

        def forward_fn(m: nn.Module, inputs: Any) -> Any:
            out = _call(m, inputs)
            try:
                out = check_multitask_output(out)
            except MTPruneInputError as exc:  # trace nothing; raised once Torch-Pruning has removed its hooks
                holder["error"] = exc
                return {}
            holder["out"] = out
            return out

        import torch_pruning as tp  # imported lazily: it pulls in timm/torchvision when they are installed

        try:
            for p in grads:
                p.requires_grad_(True)  # frozen layers must show up in autograd to be traced
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(
                    model, self.example_inputs, forward_fn=forward_fn, verbose=False
                )
        finally:
            for m, was in modes.items():
                m.training = was
            for p, req in grads.items():
                p.requires_grad_(req)
            for m, keys in hooks.items():  # on an exception inside forward, Torch-Pruning leaves its hooks behind
                for k in set(m._forward_hooks) - keys:
                    del m._forward_hooks[k]
        if "error" in holder:
            raise holder["error"]
        outputs = {t.grad_fn for t in holder["out"].values() if t.grad_fn is not None}
        return dg, outputs

    def _build(self) -> None:
        dg, output_fns = self._trace()
        self._dg = dg
        model = self.model
        names = {m: n for n, m in model.named_modules()}
        order = {n: i for i, n in enumerate(names.values())}
        self._modules = {n: m for m, n in names.items()}

        untraced = [n for m, n in names.items() if _is_layer(m) and m not in dg.module2node]
        if untraced:
            warnings.warn(
                f"layers not reached when tracing the model on example_inputs: {untraced}. Every head must run "
                "(and return its output) on example_inputs, or pruning will leave these layers inconsistent.",
                stacklevel=3,
            )

        auto = self._declared_predictors()

        visited: set[nn.Module] = set()
        candidates: list[tuple[set[str], dict[str, Any]]] = []
        for m, name in names.items():
            if not _is_layer(m) or m in visited or m not in dg.module2node:
                continue
            pruner = dg.get_pruner_of_module(m)
            width = pruner.get_out_channels(m)
            if width is None:
                continue
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(width)))
            info = self._describe(dg, group, name, width, names, order, output_fns)
            for module in info["out_modules"]:
                visited.add(module)
            if info["reaches_output"] or not info["consumers"]:
                auto.update(info["producers"])
                continue
            candidates.append((set(info["producers"]) | set(info["norms"]), info))

        blocked = auto | self._explicit
        explicit = {n for n in self._explicit if any(True for _ in self._modules[n].parameters(recurse=False))}
        self.protected = sorted(auto | explicit, key=lambda n: order[n])
        self.groups = []
        for out_names, info in candidates:
            if out_names & blocked or info["grouped"]:
                continue
            self.groups.append(
                ChannelGroup(
                    index=len(self.groups),
                    root=info["root"],
                    channels=info["channels"],
                    producers=info["producers"],
                    consumers=info["consumers"],
                    norms=info["norms"],
                    gates=info["gates"],
                    part=info["part"],
                    out_maps=info["out_maps"],
                    in_maps=info["in_maps"],
                )
            )

    def _declared_predictors(self) -> set[str]:
        """Cross-check: the modules that zoo heads declare as ``head.predictor``."""
        heads = getattr(self.model, "heads", None)
        if not isinstance(heads, nn.ModuleDict):
            return set()
        names = {m: n for n, m in self.model.named_modules()}
        out: set[str] = set()
        for head in heads.values():
            declared = getattr(head, "predictor", None)
            if declared is None:
                continue
            mods = [declared] if isinstance(declared, nn.Module) else list(declared)
            out.update(names[m] for m in mods if isinstance(m, nn.Module) and m in names)
        return out

    def _describe(
        self,
        dg: tp.DependencyGraph,
        group: Any,
        root: str,
        width: int,
        names: dict[nn.Module, str],
        order: dict[str, int],
        output_fns: set[Any],
    ) -> dict[str, Any]:
        """Turn one Torch-Pruning group (full indices) into names, channel maps, gates and a part."""
        out_maps: dict[str, tuple[list[int], list[int]]] = {}
        in_maps: dict[str, tuple[list[int], list[int]]] = {}
        out_modules: list[nn.Module] = []
        reaches_output = grouped = False
        for item in group:
            dep, idxs, roots = item.dep, list(item.idxs), list(item.root_idxs)
            node = dep.target
            module = node.module
            pruner = dg.get_pruner_of_module(module)
            is_out = dep.handler == pruner.prune_out_channels
            is_in = dep.handler == pruner.prune_in_channels
            # the group's channels are a model output: the output op itself, or a returned tensor made by an op
            # that carries these channels to its output (not a layer that merely reads them)
            if node.type == _optype("OUTPUT") or (node.grad_fn in output_fns and (is_out or not _is_layer(module))):
                reaches_output = True
            if not isinstance(module, nn.Module) or module not in names:
                continue  # Torch-Pruning's own ops (add, concat, reshape, ...) and unwrapped parameters
            name = names[module]
            grouped = grouped or _is_grouped(module)
            if _is_layer(module) and is_in and not is_out:
                target = in_maps
            elif is_out:
                target = out_maps
                out_modules.append(module)
            else:
                continue
            r, loc = target.setdefault(name, ([], []))
            r.extend(roots)
            loc.extend(idxs)

        def sorted_map(pair: tuple[list[int], list[int]]) -> ChannelMap:
            pairs = sorted(set(zip(pair[0], pair[1], strict=True)))
            return ChannelMap([p[0] for p in pairs], [p[1] for p in pairs])

        by_order = lambda ns: sorted(ns, key=lambda n: order[n])  # noqa: E731
        producers = by_order(n for n in out_maps if _is_layer(self._modules[n]))
        producers = [root] + [n for n in producers if n != root]
        norms = by_order(n for n in out_maps if not _is_layer(self._modules[n]))
        consumers = by_order(in_maps)
        return {
            "root": root,
            "channels": width,
            "producers": producers,
            "consumers": consumers,
            "norms": norms,
            "gates": self._gates(dg, producers, set(norms), names),
            "part": self._group_part(producers),
            "out_maps": {n: sorted_map(out_maps[n]) for n in producers + norms},
            "in_maps": {n: sorted_map(in_maps[n]) for n in consumers},
            "out_modules": out_modules,
            "reaches_output": reaches_output,
            "grouped": grouped,
        }

    def _gates(
        self, dg: tp.DependencyGraph, producers: list[str], norms: set[str], names: dict[nn.Module, str]
    ) -> list[str]:
        """Each producer's following norm (reached through single-input element-wise ops), else the producer."""
        gates: list[str] = []
        for p in producers:
            gate = p
            frontier = list(dg.module2node[self._modules[p]].outputs)
            seen = set()
            while frontier:
                node = frontier.pop(0)
                if node in seen:
                    continue
                seen.add(node)
                name = names.get(node.module) if isinstance(node.module, nn.Module) else None
                if name in norms:
                    gate = name
                    break
                if node.type == _optype("ELEMENTWISE") and len(node.inputs) == 1:
                    frontier.extend(node.outputs)  # ReLU, dropout, pooling, upsampling: same channels
            if gate not in gates:
                gates.append(gate)
        return gates

    def _part_of(self, name: str) -> str:
        matches = [
            (len(p), part) for p, part in self._parts.items() if p == "" or name == p or name.startswith(p + ".")
        ]
        if matches:
            return max(matches, key=lambda m: m[0])[1]  # the longest prefix wins
        bits = name.split(".")
        if len(bits) >= 2 and bits[0] == "heads" and isinstance(getattr(self.model, "heads", None), nn.ModuleDict):
            return bits[1]
        return "backbone"

    def _group_part(self, producers: list[str]) -> str:
        parts = {self._part_of(n) for n in producers}
        return parts.pop() if len(parts) == 1 else "backbone"

    # ------------------------------------------------------------------ queries and pruning
    def widths(self) -> dict[str, int]:
        """Root name -> current number of channels, for every prunable group."""
        return {g.root: g.channels for g in self.groups}

    def _check_plan(self, plan: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        clean: dict[int, list[int]] = {}
        removed: dict[str, set[int]] = {}
        for key, idxs in plan.items():
            gi = int(key)
            if not 0 <= gi < len(self.groups):
                raise ValueError(f"plan names group {key}, but there are {len(self.groups)} groups")
            g = self.groups[gi]
            chosen = sorted({int(i) for i in idxs})
            if not chosen:
                continue
            if chosen[0] < 0 or chosen[-1] >= g.channels:
                raise ValueError(
                    f"group {gi} ({g.root}) has {g.channels} channels; plan index out of range: "
                    f"{[i for i in chosen if not 0 <= i < g.channels]}"
                )
            left = g.channels - len(chosen)
            if left < self.min_channels:
                raise ValueError(
                    f"group {gi} ({g.root}) would keep {left} of {g.channels} channels, "
                    f"below min_channels={self.min_channels}"
                )
            if left < 2 and any(_is_depthwise(self._modules[n]) for n in g.producers):
                raise ValueError(
                    f"group {gi} ({g.root}) holds a depthwise conv and would keep {left} channel(s); keep at least 2"
                )
            drop = set(chosen)
            for name, cmap in g.out_maps.items():
                removed.setdefault(name, set()).update(
                    loc for r, loc in zip(cmap.root, cmap.local, strict=True) if r in drop
                )
            clean[gi] = chosen
        for name, gone in removed.items():
            module = self._modules[name]
            total = self._dg.get_out_channels(module)
            if total is not None and total - len(gone) < 1:
                raise ValueError(f"the plan removes every channel of {name}")
            if isinstance(module, nn.GroupNorm) and (total - len(gone)) % module.num_groups:
                raise ValueError(
                    f"{name} is a GroupNorm with {module.num_groups} groups: the plan would leave "
                    f"{total - len(gone)} channels, not a multiple of it"
                )
        return clean

    def prune(self, plan: Mapping[int, Sequence[int]]) -> None:
        """Remove channels physically: ``plan`` maps a group index to the channel indices to REMOVE.

        The whole plan is validated before anything changes (``ValueError`` if a group would fall below
        ``min_channels``, or an index is out of range). The graph is then rebuilt, so group indices may change:
        re-read :attr:`groups`. Pruned layers get new ``nn.Parameter`` objects: rebuild optimizers afterwards.
        """
        clean = self._check_plan(plan)
        if not clean:
            return
        model = self.model
        frozen = {n: p.requires_grad for n, p in model.named_parameters()}
        roots = [(self._modules[self.groups[gi].root], idxs) for gi, idxs in clean.items()]
        for module, idxs in roots:  # one group at a time; Torch-Pruning re-maps concat offsets in between
            pruner = self._dg.get_pruner_of_module(module)
            self._dg.get_pruning_group(module, pruner.prune_out_channels, idxs).prune()
        for n, p in model.named_parameters():  # pruned parameters come back with requires_grad=True
            if n in frozen:
                p.requires_grad_(frozen[n])
        self._build()

    def __repr__(self) -> str:
        return f"PruningGraph({len(self.groups)} groups, {len(self.protected)} protected)"


def apply_widths(model: nn.Module, example_inputs: Tensor | tuple | Any, widths: Mapping[str, int]) -> None:
    """Shrink a fresh (unpruned) ``model`` so that every named group root has the recorded width.

    The LAST channels of each group are removed; the caller loads the pruned weights afterwards. This rebuilds
    a pruned architecture from its recorded widths (e.g. to retrain it from scratch). Roots not named keep their
    width. Unknown roots, or widths above the current ones, are an :class:`MTPruneInputError`.
    """
    graph = PruningGraph(model, example_inputs)
    by_root = {g.root: g for g in graph.groups}
    unknown = sorted(set(widths) - set(by_root))
    if unknown:
        raise MTPruneInputError(f"widths name unknown or unprunable group roots: {unknown}")
    plan: dict[int, list[int]] = {}
    for root, width in widths.items():
        g = by_root[root]
        if not isinstance(width, Integral) or isinstance(width, bool) or not 1 <= width <= g.channels:
            raise MTPruneInputError(f"width {width!r} for {root!r} must be an int in [1, {g.channels}]")
        if width < g.channels:
            plan[g.index] = list(range(int(width), g.channels))
    graph.prune(plan)


def torch_pruning_magnitude(model: nn.Module, example_inputs: Tensor | tuple | Any, pruning_ratio: float) -> None:
    """Prune ``model`` in place the way a Torch-Pruning user would: ``MetaPruner`` with
    ``GroupMagnitudeImportance`` (L2 norm, mean over the coupled group) at one channel ratio for every layer
    (its default, non-global mode), with each task's output predictor in ``ignored_layers``.

    The baseline row of the ``criteria`` benchmark (Fang et al., DepGraph, CVPR 2023). The predictors to protect
    are found as :class:`PruningGraph` finds them; train mode and ``requires_grad`` flags are restored.
    """
    import torch_pruning as tp

    if not 0 <= pruning_ratio < 1:
        raise MTPruneInputError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
    graph = PruningGraph(model, example_inputs)
    if pruning_ratio == 0:
        return
    modules = dict(model.named_modules())
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}

    def forward_fn(m: nn.Module, inputs: Any) -> Any:
        return check_multitask_output(_call(m, inputs))

    try:
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=pruning_ratio, ignored_layers=[modules[n] for n in graph.protected], forward_fn=forward_fn)
        pruner.step()
    finally:
        for m, was in modes.items():
            m.training = was
        for p in model.parameters():
            p.requires_grad_(grads.get(p, True))
