"""The merged MFIS network, built physically from the index matrices (reconstruction of Cheng et al.,
Cognitive Computation 2021; METHODS.md §4).

At hidden layer l the surviving slots (``encoding.settle``) are grouped by their task set P. Each group is one
layer (``cat(inputs) → pre → conv/linear → post``, :class:`~mtprune.merging.merged_net.MergedStage`) whose
rows are the group's slots and whose inputs are the groups of layer l − 1 whose task set contains P. So:

- a shared slot is **one** filter, one row of one weight tensor, computed once for all its tasks; it starts
  as the **mean** of the merged tasks' (aligned) original filters, restricted to the inputs it reads; its
  bias and BatchNorm entries are the means too;
- a task's forward uses only its slots: the index matrix acts as a fixed mask on the connections, written
  into the structure, so multi-task fine-tuning trains each slot with the losses of its tasks only;
- task t's output layer is its original one, reading the last layer's slots of t.

``forward(x, tasks=S)`` runs the groups some task of S depends on, so serving S costs exactly
``objectives.subset_macs``. Groups that only one task depends on are named ``heads.<t>.stages.l<k>_<P>``,
the others ``shared.l<k>_<P>``, so ``mtprune.profile`` attributes their cost; ``heads.<t>.out`` is task t's
output layer (its ``predictor``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError

from ..chain import Chain, Stage
from ..merged_net import MergedStage, TaskBranch
from .encoding import pattern_names, settle

__all__ = ["TaskBranch", "MFISNet", "SlotGroup", "build_mfis"]


@dataclass(frozen=True)
class SlotGroup:
    """The slots of one layer that share a task set."""

    layer: int
    pattern: int  # bitmask of the tasks that use these slots
    users: int  # bitmask of the tasks whose outputs depend on them (⊆ pattern)
    slots: tuple[int, ...]
    key: str
    inputs: tuple[str, ...]  # keys of the groups of the previous layer it reads (empty: the network input)
    owner: str | None  # the one task that depends on it, or None when shared

    def to_dict(self, tasks: Sequence[str]) -> dict[str, Any]:
        return {"key": self.key, "tasks": pattern_names(self.pattern, tasks), "users": pattern_names(self.users, tasks),
                "slots": list(self.slots), "inputs": list(self.inputs)}


class MFISNet(nn.Module):
    """The merged network; ``forward(x, tasks=None) -> {task: output}`` (see the module docstring)."""

    def __init__(self, tasks: Sequence[str], plan: Sequence[Sequence[SlotGroup]], shared: Mapping[str, MergedStage],
                 heads: Mapping[str, TaskBranch], head_inputs: Mapping[str, Sequence[str]], widths: Sequence[int],
                 layer_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.plan = [list(groups) for groups in plan]
        self.shared = nn.ModuleDict(shared)
        self.heads = nn.ModuleDict(heads)
        self.head_inputs = {t: list(v) for t, v in head_inputs.items()}
        self.widths = list(widths)
        self.layer_names = list(layer_names)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks

    def stage(self, group: SlotGroup) -> MergedStage:
        return self.shared[group.key] if group.owner is None else self.heads[group.owner].stages[group.key]

    def groups(self) -> list[SlotGroup]:
        return [g for groups in self.plan for g in groups]

    def index_matrices(self) -> list[np.ndarray]:
        """``M_l[f, t]``: the settled index matrices this network implements."""
        out = []
        for width, groups in zip(self.widths, self.plan, strict=True):
            m = np.zeros((width, len(self.tasks)), dtype=bool)
            for g in groups:
                for i in range(len(self.tasks)):
                    if g.pattern >> i & 1:
                        m[list(g.slots), i] = True
            out.append(m)
        return out

    def structure(self) -> dict[str, Any]:
        """A JSON-able description of the groups and of every stage's modules (for reports and the ``.mtp``
        metadata, from which :func:`~.serialize.load_mfis` rebuilds the network)."""
        from .serialize import FORMAT_VERSION, describe_stages

        return {"version": FORMAT_VERSION, "tasks": list(self.tasks), "widths": self.widths,
                "layer_names": self.layer_names,
                "layers": [[g.to_dict(self.tasks) for g in groups] for groups in self.plan],
                "head_inputs": self.head_inputs, "modules": describe_stages(self)}

    def _select(self, tasks: Sequence[str] | str | None) -> list[str]:
        if tasks is None:
            return list(self.tasks)
        names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
        unknown = [t for t in names if t not in self.heads]
        if unknown or not names:
            raise MTPruneInputError(f"unknown or empty task selection {names}; this model has {list(self.tasks)}")
        return names

    def forward(self, x: Tensor, tasks: Sequence[str] | str | None = None) -> dict[str, Tensor]:
        names = self._select(tasks)
        mask = sum(1 << self.tasks.index(t) for t in names)
        acts: dict[str, Tensor] = {}
        for groups in self.plan:
            for g in groups:
                if g.users & mask:
                    acts[g.key] = self.stage(g)([x] if g.layer == 0 else [acts[k] for k in g.inputs])
        return {t: self.heads[t].out([acts[k] for k in self.head_inputs[t]]) for t in names}


def _new_layer(template: nn.Conv2d | nn.Linear, in_width: int, out_width: int, bias: bool) -> nn.Module:
    if isinstance(template, nn.Conv2d):
        return nn.Conv2d(in_width, out_width, template.kernel_size, stride=template.stride, padding=template.padding,
                         dilation=template.dilation, bias=bias)
    return nn.Linear(in_width, out_width, bias=bias)


def _post(stages: Sequence[Stage], rows: Tensor) -> list[nn.Module]:
    """Per-channel ops of ``stages[0]``; BatchNorm entries are the means over ``stages`` at ``rows``."""
    out = []
    for i, op in enumerate(stages[0].post):
        if not isinstance(op, nn.BatchNorm1d | nn.BatchNorm2d):
            out.append(copy.deepcopy(op))
            continue
        bn = type(op)(len(rows), eps=op.eps, momentum=op.momentum, affine=op.affine,
                      track_running_stats=op.track_running_stats).to(rows.device)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                dst = getattr(bn, attr, None)
                if dst is not None:
                    dst.copy_(torch.stack([getattr(s.post[i], attr)[rows] for s in stages]).mean(0))
            if bn.num_batches_tracked is not None and op.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(int(op.num_batches_tracked))
        out.append(bn)
    return out


def _slice(stages: Sequence[Stage], rows: Sequence[int], cols: Sequence[int] | None) -> MergedStage:
    """A layer whose weights are the mean over ``stages`` (the tasks sharing it) of their rows ``rows`` and
    input channels ``cols`` (None: all inputs of the first layer)."""
    ref = stages[0].layer
    dev = ref.weight.device
    r = torch.as_tensor(list(rows), dtype=torch.long, device=dev)
    m = stages[0].in_per_channel
    if cols is None:
        c = None
        in_width = ref.in_channels if isinstance(ref, nn.Conv2d) else ref.in_features
    else:
        base = torch.as_tensor(list(cols), dtype=torch.long, device=dev)
        c = (base[:, None] * m + torch.arange(m, device=dev)).flatten()
        in_width = len(c)
    bias = any(s.layer.bias is not None for s in stages)
    layer = _new_layer(ref, in_width, len(r), bias).to(device=dev, dtype=ref.weight.dtype)
    with torch.no_grad():
        weights = [s.layer.weight[r] if c is None else s.layer.weight[r][:, c] for s in stages]
        layer.weight.copy_(torch.stack(weights).mean(0))
        if bias:
            layer.bias.copy_(torch.stack([s.layer.bias[r] if s.layer.bias is not None else torch.zeros_like(r,
                                          dtype=ref.weight.dtype) for s in stages]).mean(0))
    pre = [copy.deepcopy(op) for op in stages[0].pre]
    return MergedStage(layer, pre, _post(stages, r))


def build_mfis(chains: Mapping[str, Chain], matrices: Sequence[np.ndarray]) -> MFISNet:
    """Build the merged network of ``chains`` (task → aligned single-task chain, equal widths) from index
    matrices ``[F_l, T]`` (columns in ``chains`` order); :func:`~.encoding.settle` is applied first."""
    tasks = list(chains)
    ref = chains[tasks[0]]
    depth = len(ref.hidden)
    if len(matrices) != depth:
        raise MTPruneInputError(f"{len(matrices)} index matrices for {depth} hidden layers")
    for k, m in enumerate(matrices):
        widths = {chains[t].stages[k].width for t in tasks}
        if len(widths) != 1 or np.asarray(m).shape != (ref.stages[k].width, len(tasks)):
            raise MTPruneInputError(f"index matrix of {ref.stages[k].name} has shape {np.asarray(m).shape}; "
                                    f"the networks have widths {sorted(widths)} there and {len(tasks)} tasks")
    settled = settle(matrices)
    if settled.starved:
        k, t = settled.starved[0]
        raise MTPruneInputError(f"task {tasks[t]!r} keeps no connected filter at {ref.stages[k].name}: the index "
                                "matrices do not give every task a path to its output")
    plan: list[list[SlotGroup]] = []
    shared: dict[str, MergedStage] = {}
    exclusive: dict[str, dict[str, MergedStage]] = {t: {} for t in tasks}
    for k in range(depth):
        pats, users = settled.patterns[k], settled.users[k]
        groups = []
        for p in sorted(int(v) for v in np.unique(pats[pats > 0])):
            slots = tuple(int(i) for i in np.flatnonzero(pats == p))
            u = int(np.bitwise_or.reduce(users[list(slots)]))
            inputs = tuple(g.key for g in plan[-1] if g.pattern & p == p) if k else ()
            owner = tasks[u.bit_length() - 1] if u & (u - 1) == 0 else None
            g = SlotGroup(k, p, u, slots, f"l{k}_{'+'.join(pattern_names(p, tasks))}", inputs, owner)
            cols = None if k == 0 else [s for key in inputs for s in next(h for h in plan[-1] if h.key == key).slots]
            stage = _slice([chains[t].stages[k] for t in pattern_names(p, tasks)], slots, cols)
            (shared if owner is None else exclusive[owner])[g.key] = stage
            groups.append(g)
        plan.append(groups)
    heads, head_inputs = {}, {}
    for i, t in enumerate(tasks):
        inputs = [g for g in plan[-1] if g.pattern >> i & 1]
        head_inputs[t] = [g.key for g in inputs]
        out_stage = chains[t].stages[-1]
        out = _slice([out_stage], range(out_stage.width), [s for g in inputs for s in g.slots])
        heads[t] = TaskBranch(exclusive[t], out)
    return MFISNet(tasks, plan, shared, heads, head_inputs, [ref.stages[k].width for k in range(depth)],
                   [ref.stages[k].name for k in range(depth)])
