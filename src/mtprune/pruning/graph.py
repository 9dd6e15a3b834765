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

**Validation** (every group is checked before anything is removed; what cannot be pruned safely is left alone,
with the reason in :attr:`PruningGraph.skipped`):

- a channel map that is not one-to-one (a ``view``/``reshape`` that folds channels together, e.g. MTI-Net's
  ``view(B, C//N, N, H, W)``), or that points past a layer's width, leaves its group unpruned;
- couplings that autograd does not show are honoured by leaving their groups alone: the channels entering a
  ``MaxPool(return_indices=True)`` whose indices feed a ``MaxUnpool`` (SegNet) and the channels a ``MaxUnpool``
  produces; and groups touching a layer whose ``nn.Parameter`` is tied to another layer's (pruning would untie
  them);
- :meth:`PruningGraph.prune` runs Torch-Pruning's ``check_pruning_group`` on every group of the plan and checks
  every index against the layer's width before removing anything; should the pruned model still fail to run, every
  module is restored and one :class:`MTPruneInputError` names the layers. No layer is ever left with width 0.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from mtprune.measure import LayerRecord, recording_layers
from mtprune.models.validate import check_multitask_output
from mtprune.pruning import attention
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

    def locals_of(self, roots: set[int]) -> list[int]:
        """The module's channels that the group channels ``roots`` touch."""
        return [lc for r, lc in zip(self.root, self.local, strict=True) if r in roots]


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
    heads: attention.HeadSpec | None = None  # attention heads a removal must respect (pruning/attention.py)


def _is_layer(m: object) -> bool:
    return isinstance(m, _LAYER_TYPES)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    """A grouped conv Torch-Pruning cannot prune correctly (anything with groups > 1 that is not depthwise)."""
    return isinstance(m, _CONV) and m.groups > 1 and not _is_depthwise(m)


def _index_coupled(model: nn.Module, m: nn.Module) -> bool:
    """An unpooling layer, or (in a model that has one) a pooling layer returning indices: their channels are
    coupled through the indices, which autograd does not trace."""
    pooling = nn.modules.pooling
    if isinstance(m, pooling._MaxUnpoolNd):
        return True
    return isinstance(m, pooling._MaxPoolNd) and m.return_indices and any(
        isinstance(u, pooling._MaxUnpoolNd) for u in model.modules())


def _tied_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> the other module(s) holding one of its ``nn.Parameter`` objects (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():  # a module reused under two names is one module, not a tie
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    tied: dict[str, str] = {}
    for names in owners.values():
        for n in names if len(names) > 1 else ():
            tied[n] = ", ".join(o for o in names if o != n)
    return tied


def _map_problems(dg: tp.DependencyGraph, modules: Mapping[str, nn.Module], channels: int,
                  out_maps: Mapping[str, tuple[list[int], list[int]]],
                  in_maps: Mapping[str, tuple[list[int], list[int]]]) -> list[str]:
    """Why a group's channel maps cannot be pruned exactly ([] when they can).

    Output channels (producers, norms) must map one-to-one to the group's channels; input channels may fan out
    (a flatten: one channel -> h*w features) but no input channel may belong to two group channels; no index may
    point past the group's or the layer's width.
    """
    problems = []
    for maps, side in ((out_maps, "output"), (in_maps, "input")):
        for name, (roots, locs) in maps.items():
            module = modules.get(name)
            if module is None:
                continue
            width = dg.get_out_channels(module) if side == "output" else dg.get_in_channels(module)
            pairs = set(zip(roots, locs, strict=True))
            if pairs and (min(roots) < 0 or max(roots) >= channels):
                problems.append(f"its channel map of {name} points past the group's {channels} channels")
            elif pairs and width is not None and (min(locs) < 0 or max(locs) >= width):
                worst = max(locs)
                problems.append(f"it maps channel {worst} of {name}, which has only {width} {side} channels")
            elif len(set(locs)) < len(pairs):  # some layer channel belongs to two group channels
                problems.append(f"several of its channels map onto one {side} channel of {name} (a view or "
                                "reshape that folds channels together), so removing one channel would remove others")
            elif side == "output" and len(set(roots)) < len(pairs):
                problems.append(f"one of its channels maps onto several output channels of {name}")
    return problems


def _flattened_concat_width(dg: tp.DependencyGraph, node: Any) -> int | None:
    """The channels of a ``cat(dim=1)`` read only by ``flatten → Linear``-like consumers, or None if not such a one.

    Checked on the traced shapes (so only on a freshly traced graph): every reader of the concat is a reshape
    whose input is ``(N, C, *spatial)`` with ``C`` = the sum of the concat's inputs and whose readers take
    ``C·Πspatial`` features (a flatten, each channel one contiguous block), or reads exactly ``C`` channels.
    """
    from torch_pruning.dependency import shape_infer

    sizes = node.module.concat_sizes
    if getattr(node.grad_fn, "_saved_dim", None) != 1 or not sizes or any(not isinstance(c, int) for c in sizes):
        return None
    width, flattened = sum(sizes), False
    for out in node.outputs:
        shape = getattr(out.grad_fn, "_saved_self_sym_sizes", None)
        if out.type == _optype("RESHAPE") and shape is not None and len(shape) >= 3:
            feats = [shape_infer.infer_in_channels_recursively(dg, o, [0]) for o in out.outputs]
            per_channel = int(torch.Size(shape[2:]).numel())
            if int(shape[1]) != width or not feats or any(f != width * per_channel for f in feats):
                return None
            flattened = True
        elif out.type == _optype("RESHAPE") or shape_infer.infer_in_channels_recursively(dg, out, [0]) != width:
            return None
    return width if flattened else None


def _dependency_graph() -> tp.DependencyGraph:
    """Torch-Pruning's DependencyGraph, knowing the width of a channel concatenation that is flattened.

    Torch-Pruning 1.6.1 infers a concat's output channels from its readers; after ``cat(dim=1) → flatten → Linear``
    that gives the Linear's ``C·h·w`` input features, not ``C``, so it takes the concat for one along another
    dimension and sets no offsets: channel i of every input is then coupled with channel i of every other input
    (wrong groups; pruning breaks the forward). Here such a concat, once :func:`_flattened_concat_width` confirms
    it on the traced shapes, reports ``C`` = the sum of its (current) input widths, so Torch-Pruning computes the
    concat offsets and the flatten's ``h*w`` blocks itself. Every other node keeps Torch-Pruning's inference.
    """
    import torch_pruning as tp  # imported lazily: it pulls in timm/torchvision when they are installed

    class Graph(tp.DependencyGraph):
        def __init__(self) -> None:
            super().__init__()
            self._flat_concats: dict[Any, bool] = {}  # concat node -> confirmed on the traced shapes

        def get_in_channels(self, module_or_node: Any) -> int | None:
            ch = super().get_in_channels(module_or_node)
            node = module_or_node if isinstance(module_or_node, tp.Node) else self.module2node.get(module_or_node)
            if ch is not None or node is None or node.type != _optype("CONCAT"):
                return ch
            if node not in self._flat_concats:
                if node.module.concat_sizes is None:
                    return None  # asked before Torch-Pruning sized the concat: decide later, on the same shapes
                self._flat_concats[node] = _flattened_concat_width(self, node) is not None
            if not self._flat_concats[node] or any(not isinstance(c, int) for c in node.module.concat_sizes):
                return None
            return sum(node.module.concat_sizes)  # kept current by Torch-Pruning's ConcatPruner while pruning

    return Graph()


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module's attributes, with its parameter/buffer dicts copied: Torch-Pruning assigns new Parameter and
    buffer objects and new widths, never edits tensors in place, so restoring these undoes a pruning step."""
    return [(m, {k: (_copy_dict(v) if isinstance(v, dict) else v) for k, v in vars(m).items()})
            for m in model.modules()]


def _copy_dict(d: dict) -> dict:
    """``copy.copy(d)``; a dict's or OrderedDict's own ``copy()`` (the same shallow copy, without the pickling
    protocol ``copy.copy`` takes for an OrderedDict)."""
    return d.copy() if type(d) in (dict, OrderedDict) else copy.copy(d)


def _restore(snapshot: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for module, attrs in snapshot:
        vars(module).clear()
        vars(module).update(attrs)


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
        record_layers: also count every layer's MACs and shapes in the traced forward, as :attr:`layer_record`
            (``measure.recording_layers``), so that a ``CostModel`` of the model as traced needs no forward of its
            own (the re-trace after :meth:`prune` records nothing).

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
        record_layers: bool = False,
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
        self._record_layers = record_layers
        self.layer_record: LayerRecord | None = None
        attention.refuse_unsupported(model)  # window attention (Swin, MaxViT): one line, before any tracing
        self._build()
        self._record_layers = False

    # ------------------------------------------------------------------ tracing
    def _trace(self) -> tuple[tp.DependencyGraph, set[Any]]:
        """Build Torch-Pruning's graph; restore modes, ``requires_grad`` and hooks whatever happens."""
        model = self.model
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.requires_grad for p in model.parameters()}
        hooks = {m: set(m._forward_hooks) for m in model.modules()}
        holder: dict[str, Any] = {}
        self._index_fns: dict[Any, str] = {}  # grad_fn of a pooling-with-indices / unpooling output -> module name
        module_names = {m: n for n, m in model.named_modules()}

        def note_index_op(mod: nn.Module, args: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, Tensor) and t.grad_fn is not None:
                self._index_fns[t.grad_fn] = module_names.get(mod, type(mod).__name__)

        def forward_fn(m: nn.Module, inputs: Any) -> Any:
            index_hooks = [mod.register_forward_hook(note_index_op) for mod in m.modules() if _index_coupled(m, mod)]
            counting = recording_layers(m, inputs) if self._record_layers else contextlib.nullcontext({})
            try:
                with counting as counted:
                    out = _call(m, inputs)
                self.layer_record = counted.get("record")
            finally:
                for h in index_hooks:
                    h.remove()
            try:
                out = check_multitask_output(out)
            except MTPruneInputError as exc:  # trace nothing; raised once Torch-Pruning has removed its hooks
                holder["error"] = exc
                return {}
            holder["out"] = out
            return out

        try:
            for p in grads:
                p.requires_grad_(True)  # frozen layers must show up in autograd to be traced
            with torch.enable_grad():
                try:
                    dg = _dependency_graph().build_dependency(
                        model, self.example_inputs, forward_fn=forward_fn, verbose=False
                    )
                except Exception as err:  # noqa: BLE001
                    if "out" not in holder:
                        raise  # the model's own forward failed: its error is the user's to read
                    first = (str(err).strip().splitlines() or [""])[0]
                    raise MTPruneInputError(
                        f"Torch-Pruning cannot map the channels of {type(model).__name__} "
                        f"({type(err).__name__}: {first}); this model cannot be pruned") from err
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
        self.tasks = list(holder["out"])  # the model's output names
        outputs = {t.grad_fn for t in holder["out"].values() if t.grad_fn is not None}
        return dg, outputs

    def _build(self) -> None:
        dg, output_fns = self._trace()
        self._dg = dg
        model = self.model
        names = {m: n for n, m in model.named_modules()}
        order = {n: i for i, n in enumerate(names.values())}
        self._modules = {n: m for m, n in names.items()}

        hidden = attention.hidden_layers(model)  # MultiheadAttention.out_proj: runs through F.linear
        untraced = [n for m, n in names.items() if _is_layer(m) and m not in dg.module2node and n not in hidden]
        if untraced:
            warnings.warn(
                f"layers not reached when tracing the model on example_inputs: {untraced}. Every head must run "
                "(and return its output) on example_inputs, or pruning will leave these layers inconsistent.",
                stacklevel=3,
            )

        auto = self._declared_predictors()
        self._tied = _tied_modules(model)
        self.skipped: dict[str, str] = {}  # root -> why its group is left alone

        visited: set[nn.Module] = set()
        candidates: list[tuple[set[str], dict[str, Any]]] = []
        qkv = attention.find_qkv_attention(model)
        for m, name in names.items():
            if not _is_layer(m) or m in visited or m not in dg.module2node:
                continue
            pruner = dg.get_pruner_of_module(m)
            width = pruner.get_out_channels(m)
            if width is None:
                continue
            if name in qkv:  # attention: its inner channels, rooted at the projection's input channels
                via = self._modules[qkv[name][1]]
                width = dg.get_pruner_of_module(via).get_in_channels(via)
                group = dg.get_pruning_group(via, dg.get_pruner_of_module(via).prune_in_channels, list(range(width)))
            else:
                group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(width)))
            info = self._describe(dg, group, name, width, names, order, output_fns)
            self._attach_heads(info, qkv)
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
            if info["unsafe"]:
                self.skipped[info["root"]] = info["unsafe"]
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
                    heads=info["heads"],
                )
            )

    def _attach_heads(self, info: dict[str, Any], qkv: Mapping[str, tuple[str, str]]) -> None:
        """The head structure of a group holding attention (``info["heads"]``). A MultiheadAttention's
        ``out_proj`` is one more producer, consumer and Taylor gate of its group (Torch-Pruning prunes it with the
        attention module). Attention modules that disagree on their heads leave the group alone."""
        try:
            info["heads"] = attention.head_spec(self.model, info["root"], info["channels"], info["norms"], qkv)
        except ValueError as err:
            info["heads"] = None
            info["unsafe"] = info.get("unsafe") or str(err)
            return
        root, width = info["root"], info["channels"]
        if info["heads"] is not None and info["heads"].kind == "mha":  # out_proj (run by F.linear): in and out
            for proj in (f"{n}.out_proj" for n in info["heads"].modules):
                same = ChannelMap(list(range(width)), list(range(width)))
                info["producers"].append(proj)
                info["consumers"].append(proj)
                info["gates"].append(proj)
                info["out_maps"][proj] = info["in_maps"][proj] = same
        if info["heads"] is not None and info["heads"].kind == "qkv" and info["unsafe"] == (
                f"one of its channels maps onto several output channels of {root}"):
            if not attention.is_qkv_map(info["out_maps"][root], width):
                return  # not the q, k, v layout: left alone
            rest = {n: c for n, c in info["out_maps"].items() if n != root}  # q, k, v rows of a channel: expected
            problems = _map_problems(self._dg, self._modules, width, rest, info["in_maps"])
            info["unsafe"] = problems[0] if problems else ""

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
        unsafe: list[str] = []
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
            op = self._index_op(node.grad_fn)
            if op:
                unsafe.append(op)
            if not isinstance(module, nn.Module) or module not in names:
                continue  # Torch-Pruning's own ops (add, concat, reshape, ...) and unwrapped parameters
            name = names[module]
            if name in self._tied:
                unsafe.append(f"{name} shares its weights with {self._tied[name]} (tied): pruning would untie them")
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

        unsafe.extend(_map_problems(dg, self._modules, width, out_maps, in_maps))
        by_order = lambda ns: sorted(ns, key=lambda n: order[n])  # noqa: E731
        producers = by_order(n for n in out_maps if _is_layer(self._modules[n]))
        producers = [root] + [n for n in producers if n != root]
        norms = by_order(n for n in out_maps if not _is_layer(self._modules[n]))
        consumers = by_order(in_maps)
        maps = {n: sorted_map(out_maps[n]) for n in producers + norms}  # sorted, unique: equal iff the sets are
        for p in producers:  # a layer and its own norm hold the same channels
            gate = self._gates(dg, [p], set(norms), names)[0]
            if gate != p and maps[p] != maps[gate]:
                unsafe.append(f"{p} and its norm {gate} map to different channels of the group (one channel reached "
                              "by two paths, e.g. concatenated with a depthwise copy of itself)")
        return {
            "root": root,
            "channels": width,
            "producers": producers,
            "consumers": consumers,
            "norms": norms,
            "gates": self._gates(dg, producers, set(norms), names),
            "part": self._group_part(producers),
            "out_maps": maps,
            "in_maps": {n: sorted_map(in_maps[n]) for n in consumers},
            "out_modules": out_modules,
            "reaches_output": reaches_output,
            "grouped": grouped,
            "unsafe": unsafe[0] if unsafe else "",
        }

    def _index_op(self, grad_fn: Any) -> str:
        """Why channels through ``grad_fn`` are coupled by indices autograd does not trace ('' if they are not)."""
        if grad_fn in self._index_fns:
            return (f"its channels pass through {self._index_fns[grad_fn]}, tied by max-pooling indices to a "
                    "MaxUnpool; autograd does not show that coupling, so pooled and unpooled channels would be pruned "
                    "apart")
        if type(grad_fn).__name__.startswith("MaxUnpool"):
            return "its channels pass through a functional max_unpool, coupled by indices autograd does not trace"
        return ""

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
            if g.heads is not None:  # whole heads, or as many channels from every head (pruning/attention.py)
                chosen = attention.snap_to_heads(g.heads, chosen, self.min_channels)
                if not chosen:
                    continue
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
            if module not in self._dg.module2node:
                continue  # a MultiheadAttention's out_proj: pruned with (and checked as) its attention module
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
        roots = [(self.groups[gi], idxs) for gi, idxs in clean.items()]
        for g, idxs in roots:  # every group is validated before anything is removed
            self._validate(self._tp_group(g, idxs))
        saved = _snapshot(model), dict(self.__dict__)
        try:
            for g, idxs in roots:  # one group at a time; Torch-Pruning re-maps concat offsets in between
                if g.heads is not None:
                    attention.update_heads(model, g.heads, idxs)  # num_heads / head_dim before Torch-Pruning runs
                self._tp_group(g, idxs).prune()
            attention.sync_widths(model)  # widths a forward reads from attributes (torchvision ViT's hidden_dim)
            for n, p in model.named_parameters():  # pruned parameters come back with requires_grad=True
                if n in frozen:
                    p.requires_grad_(frozen[n])
            self._build()  # traces the pruned model: a forward pass that fails here is undone below
        except (RuntimeError, IndexError, ValueError) as err:
            _restore(saved[0])
            self.__dict__.update(saved[1])
            listed = [self.groups[gi].root for gi in clean]
            names = ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise MTPruneInputError(f"pruning the groups of {names} breaks the model ({first}); the model is "
                                    "unchanged: protect these layers or leave their groups out of the plan") from err

    def _tp_group(self, g: ChannelGroup, idxs: Sequence[int]) -> Any:
        """Torch-Pruning's group for removing ``idxs`` of ``g``: from its root's output channels, or for attention
        from the projection's input channels (channel i is row i, C + i and 2C + i of qkv)."""
        if g.heads is not None and g.heads.via:
            module = self._modules[g.heads.via]
            return self._dg.get_pruning_group(module, self._dg.get_pruner_of_module(module).prune_in_channels, idxs)
        module = self._modules[g.root]
        return self._dg.get_pruning_group(module, self._dg.get_pruner_of_module(module).prune_out_channels, idxs)

    def _validate(self, group: Any) -> None:
        """Refuse (naming the layer) a Torch-Pruning group that points past a layer's width or empties a layer."""
        names = {m: n for n, m in self._modules.items()}
        for dep, idxs in group:
            module = dep.target.module
            if module not in names:
                continue  # Torch-Pruning's own ops
            is_out = self._dg.is_out_channel_pruning_fn(dep.handler)
            width = self._dg.get_out_channels(module) if is_out else self._dg.get_in_channels(module)
            if width is None or not (is_out or self._dg.is_in_channel_pruning_fn(dep.handler)):
                continue
            side = "output" if is_out else "input"
            bad = [i for i in idxs if not 0 <= int(i) < width]
            if bad:
                raise MTPruneInputError(f"cannot prune layer {names[module]}: channel {max(bad)} is past its {width} "
                                        f"{side} channels; the model is unchanged")
            if len(set(idxs)) >= width:
                raise MTPruneInputError(f"cannot prune layer {names[module]}: the plan removes all of its {width} "
                                        f"{side} channels; the model is unchanged")
        if not self._dg.check_pruning_group(group):  # Torch-Pruning's own check, as a backstop
            raise MTPruneInputError(f"cannot prune the group of {names.get(group[0].dep.target.module, '?')}: "
                                    "Torch-Pruning's check_pruning_group refuses it; the model is unchanged")

    def __repr__(self) -> str:
        return f"PruningGraph({len(self.groups)} groups, {len(self.protected)} protected)"


def apply_widths(model: nn.Module, example_inputs: Tensor | tuple | Any, widths: Mapping[str, int],
                 heads: Mapping[str, Sequence[int]] | None = None) -> None:
    """Shrink a fresh (unpruned) ``model`` so that every named group root has the recorded width.

    The LAST channels of each group are removed; the caller loads the pruned weights afterwards. This rebuilds
    a pruned architecture from its recorded widths (e.g. to retrain it from scratch). Roots not named keep their
    width. Unknown roots, or widths above the current ones, are an :class:`MTPruneInputError`. ``heads``
    (``attention.head_layout`` of the pruned model: attention module -> ``[num_heads, head_dim]``) rebuilds the
    groups holding attention instead of their widths: the last heads and the last channels of every head go.
    """
    graph = PruningGraph(model, example_inputs)
    by_root = {g.root: g for g in graph.groups}
    unknown = sorted(set(widths) - set(by_root))
    if unknown:
        raise MTPruneInputError(f"widths name unknown or unprunable group roots: {unknown}")
    plan: dict[int, list[int]] = {}
    layout = dict(heads or {})
    for g in graph.groups:
        if g.heads is not None and g.heads.modules[0] in layout:
            plan[g.index] = attention.layout_plan(g.heads, layout[g.heads.modules[0]])
    for root, width in widths.items():
        g = by_root[root]
        if g.index in plan or (g.heads is not None and g.heads.modules[0] in layout):
            continue
        if not isinstance(width, Integral) or isinstance(width, bool) or not 1 <= width <= g.channels:
            raise MTPruneInputError(f"width {width!r} for {root!r} must be an int in [1, {g.channels}]")
        if width < g.channels:
            plan[g.index] = list(range(int(width), g.channels))
    graph.prune({gi: idxs for gi, idxs in plan.items() if idxs})


def torch_pruning_magnitude(model: nn.Module, example_inputs: Tensor | tuple | Any, pruning_ratio: float,
                            protected: Sequence[str] | None = None, *, heads: bool = False) -> None:
    """Prune ``model`` in place the way a Torch-Pruning user would: ``MetaPruner`` with
    ``GroupMagnitudeImportance`` (L2 norm, mean over the coupled group) at one channel ratio for every layer
    (its default, non-global mode), with each task's output predictor in ``ignored_layers``.

    The baseline row of the ``criteria`` benchmark (Fang et al., DepGraph, CVPR 2023). The predictors to protect
    are found as :class:`PruningGraph` finds them, unless given as ``protected`` (module names, e.g. a graph's
    ``protected`` read beforehand, so that only Torch-Pruning's own work is timed); train mode and
    ``requires_grad`` flags are restored.

    ``heads=True`` follows Torch-Pruning's own ViT recipe for timm-style attention: ``num_heads={qkv: heads}``
    with ``prune_head_dims=True``, then ``num_heads`` / ``head_dim`` (and timm's ``attn_dim``) set from the pruner.
    """
    import torch_pruning as tp

    if not 0 <= pruning_ratio < 1:
        raise MTPruneInputError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
    if protected is None:
        protected = PruningGraph(model, example_inputs).protected
    if pruning_ratio == 0:
        return
    modules = dict(model.named_modules())
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    attn = attention.find_qkv_attention(model) if heads else {}

    def forward_fn(m: nn.Module, inputs: Any) -> Any:
        return check_multitask_output(_call(m, inputs))

    try:
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=pruning_ratio, ignored_layers=[modules[n] for n in protected], forward_fn=forward_fn,
            num_heads={modules[q]: modules[a].num_heads for q, (a, _) in attn.items()},
            prune_head_dims=True, prune_num_heads=False)
        pruner.step()
        for q, (a, _) in attn.items():  # the recipe's attribute update (attn_dim: timm >= 1.0's reshape)
            m = modules[a]
            m.num_heads = pruner.num_heads[modules[q]]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
    finally:
        for m, was in modes.items():
            m.training = was
        for p in model.parameters():
            p.requires_grad_(grads.get(p, True))
