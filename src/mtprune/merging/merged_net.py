"""The merged multi-task network of PAM (He et al., KDD 2021, §3.5), built physically from the partitions.

At hidden layer l the kept neurons form the shared partition C_l and one exclusive partition E_{t,l} per task:

- C_l reads only C_{l-1};
- E_{t,l} reads ``[E_{t,l-1}, C_{l-1}]`` (concatenated in that order);
- the output layer of task t reads ``[E_{t,L}, C_L]``;
- layer 0 reads the input.

Weights are slices of the block-diagonal concatenation of the T original networks: a merged weight that links
two neurons of the same original network is that network's weight, one that crosses networks starts at 0. So,
as long as no kept neuron loses an input it had (e.g. with D empty and every neuron shared), the merged network
computes exactly what the originals computed. Empty partitions are simply absent; a partition whose inputs are
all absent is moved to D by :func:`settle` (its neurons would be constants).

``MergedNet.forward(x, tasks=S)`` runs C and the E_t of the tasks in S only, so serving S costs
``FLOPs(C) + Σ_{t∈S} FLOPs(E_t)``. The modules are named like a ``MultiTaskModel``: the shared trunk is
``shared.l<k>``; everything exclusive to task t is under ``heads.<t>`` (whose ``predictor`` is its output
layer), so ``mtprune.profile`` attributes costs to tasks and ``mtprune.prune`` protects the outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError

from .chain import Chain, Stage
from .grouping import Partition

__all__ = ["MergedNet", "MergedStage", "TaskBranch", "build_merged", "settle"]


class MergedStage(nn.Module):
    """``cat(inputs) → pre → layer → post``: one partition of one layer."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, pre: Sequence[nn.Module], post: Sequence[nn.Module]) -> None:
        super().__init__()
        self.pre = nn.Sequential(*pre)
        self.layer = layer
        self.post = nn.Sequential(*post)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        return self.post(self.layer(self.pre(x)))


class TaskBranch(nn.Module):
    """What only task t runs: its exclusive partitions ``stages.l<k>`` and its output layer ``out``."""

    def __init__(self, stages: Mapping[str, MergedStage], out: MergedStage) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.out = out

    @property
    def predictor(self) -> list[nn.Module]:
        """The task's output layer (pruning protects it)."""
        return [self.out.layer]


class MergedNet(nn.Module):
    """PAM's merged network; ``forward(x, tasks=None) -> {task: output}`` (see the module docstring)."""

    def __init__(self, shared: Mapping[str, MergedStage], heads: Mapping[str, TaskBranch], depth: int) -> None:
        super().__init__()
        self.shared = nn.ModuleDict(shared)
        self.heads = nn.ModuleDict(heads)
        self.depth = depth

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def _select(self, tasks: Sequence[str] | str | None) -> list[str]:
        if tasks is None:
            return list(self.heads.keys())
        names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
        unknown = [t for t in names if t not in self.heads]
        if unknown or not names:
            raise MTPruneInputError(f"unknown or empty task selection {names}; this model has {list(self.heads)}")
        return names

    def forward(self, x: Tensor, tasks: Sequence[str] | str | None = None) -> dict[str, Tensor]:
        names = self._select(tasks)
        trunk: list[Tensor | None] = []
        c: Tensor | None = x
        for k in range(self.depth):
            key = f"l{k}"
            c = self.shared[key]([c]) if key in self.shared and c is not None else None
            trunk.append(c)
        out: dict[str, Tensor] = {}
        for t in names:
            branch = self.heads[t]
            e: Tensor | None = None
            for k in range(self.depth):
                key = f"l{k}"
                if key in branch.stages:
                    inputs = [x] if k == 0 else [v for v in (e, trunk[k - 1]) if v is not None]
                    e = branch.stages[key](inputs)
                else:
                    e = None
            out[t] = branch.out([v for v in (e, trunk[-1]) if v is not None])
        return out


def settle(partitions: Sequence[Partition]) -> dict[int, int]:
    """Move partitions that read nothing, or that nothing reads, to D, in place; returns {layer: neurons moved}.

    C_l needs C_{l-1}; E_{t,l} needs E_{t,l-1} or C_{l-1}, and is read only by E_{t,l+1} (or task t's output).
    The output of task t needs E_{t,L} or C_L: if both are empty the task has no features left and this is an
    :class:`MTPruneInputError` (lower α).
    """
    moved: dict[int, int] = {}
    for k in range(1, len(partitions)):
        prev, part = partitions[k - 1], partitions[k]
        gone: list[int] = []
        if not prev.shared and part.shared:
            gone += part.shared
            part.shared = []
        for t, members in part.exclusive.items():
            if members and not prev.shared and not prev.exclusive.get(t):
                gone += members
                part.exclusive[t] = []
        if gone:
            part.dropped = sorted(part.dropped + gone)
            moved[k] = len(gone)
    for k in range(len(partitions) - 2, -1, -1):  # E_{t,k} is read by E_{t,k+1} only: a dead end otherwise
        part, nxt = partitions[k], partitions[k + 1]
        gone = []
        for t, members in part.exclusive.items():
            if members and not nxt.exclusive.get(t):
                gone += members
                part.exclusive[t] = []
        if gone:
            part.dropped = sorted(part.dropped + gone)
            moved[k] = moved.get(k, 0) + len(gone)
    if partitions:
        last = partitions[-1]
        starved = [t for t, m in last.exclusive.items() if not m and not last.shared]
        if starved:
            raise MTPruneInputError(f"after grouping, the last hidden layer keeps no neuron for task(s) {starved}: "
                                    "every neuron was found irrelevant to them; lower alpha_linear / alpha_conv")
    return moved


def _owners(widths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Global neuron index → (network index, index within that network)."""
    owner = torch.cat([torch.full((w,), i, dtype=torch.long) for i, w in enumerate(widths)])
    local = torch.cat([torch.arange(w) for w in widths])
    return owner, local


def _new_layer(template: nn.Conv2d | nn.Linear, in_width: int, out_width: int, bias: bool) -> nn.Module:
    if isinstance(template, nn.Conv2d):
        return nn.Conv2d(in_width, out_width, template.kernel_size, stride=template.stride,
                         padding=template.padding, dilation=template.dilation, bias=bias)
    return nn.Linear(in_width, out_width, bias=bias)


def _slice_post(stages: Sequence[Stage], rows: tuple[Tensor, Tensor], template: int) -> list[nn.Module]:
    """Per-channel ops of the rows: parameter-free ops are copied, BatchNorm entries come from each owner."""
    owner, local = rows
    out = []
    for i, op in enumerate(stages[template].post):
        if not isinstance(op, nn.BatchNorm1d | nn.BatchNorm2d):
            out.append(copy.deepcopy(op))
            continue
        bn = type(op)(len(owner), eps=op.eps, momentum=op.momentum, affine=op.affine,
                      track_running_stats=op.track_running_stats)
        with torch.no_grad():
            for n, stage in enumerate(stages):
                src, pos = stage.post[i], (owner == n).nonzero().flatten()
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(bn, attr, None) is not None:
                        getattr(bn, attr)[pos] = getattr(src, attr)[local[pos]].to(getattr(bn, attr).dtype)
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(int(op.num_batches_tracked))
        out.append(bn)
    return out


def _slice_stage(stages: Sequence[Stage], rows: tuple[Tensor, Tensor], cols: tuple[Tensor, Tensor] | None,
                 template: int = 0) -> MergedStage:
    """A merged stage: output neurons ``rows`` and input neurons ``cols`` as (network, index) pairs (``cols=None``:
    the network input); ops are copied from ``stages[template]``."""
    row_owner, row_local = rows
    m = stages[template].in_per_channel
    ref = stages[template].layer.weight
    if cols is None:
        first = stages[template].layer
        in_width = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    else:
        in_width = len(cols[0]) * m
    bias = any(s.layer.bias is not None for s in stages)
    layer = _new_layer(stages[template].layer, in_width, len(row_owner), bias).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        layer.weight.zero_()
        if bias:
            layer.bias.zero_()
        for n, stage in enumerate(stages):
            r_pos = (row_owner == n).nonzero().flatten()
            if len(r_pos) == 0:
                continue
            src = stage.layer.weight
            r_loc = row_local[r_pos]
            if cols is None:
                layer.weight[r_pos] = src[r_loc]
            else:
                c_pos = (cols[0] == n).nonzero().flatten()
                if len(c_pos) == 0:
                    continue
                c_loc = cols[1][c_pos]
                feat = torch.arange(m)
                dst_cols = (c_pos[:, None] * m + feat).flatten()
                src_cols = (c_loc[:, None] * m + feat).flatten()
                layer.weight[r_pos[:, None], dst_cols[None, :]] = src[r_loc[:, None], src_cols[None, :]]
            if stage.layer.bias is not None:
                layer.bias[r_pos] = stage.layer.bias[r_loc]
    pre = [copy.deepcopy(op) for op in stages[template].pre]
    return MergedStage(layer, pre, _slice_post(stages, rows, template))


def build_merged(chains: Mapping[str, Chain], partitions: Sequence[Partition]) -> MergedNet:
    """Build the merged network of ``chains`` (task → single-task chain) from one partition per hidden layer.

    Partition indices address the concatenation of the networks' neurons at that layer, in ``chains`` order.
    """
    tasks = list(chains)
    depth = len(next(iter(chains.values())).hidden)
    if depth == 0:
        raise MTPruneInputError("the networks have no hidden layer: there is nothing to merge")
    if len(partitions) != depth:
        raise MTPruneInputError(f"{len(partitions)} partitions for {depth} hidden layers")
    owners = []
    for k, part in enumerate(partitions):
        widths = [chains[t].stages[k].width for t in tasks]
        owners.append(_owners(widths))
        seen = part.dropped + part.shared + [i for t in tasks for i in part.exclusive.get(t, [])]
        if sorted(seen) != list(range(sum(widths))):
            raise MTPruneInputError(f"partition of hidden layer {k} ({chains[tasks[0]].stages[k].name}) does not "
                                    f"split its {sum(widths)} neurons into disjoint D, E_t and C")

    def pick(k: int, idx: list[int]) -> tuple[Tensor, Tensor]:
        i = torch.tensor(idx, dtype=torch.long)
        return owners[k][0][i], owners[k][1][i]

    def cat(*parts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    shared: dict[str, MergedStage] = {}
    exclusive: dict[str, dict[str, MergedStage]] = {t: {} for t in tasks}
    for k, part in enumerate(partitions):
        stages = [chains[t].stages[k] for t in tasks]
        where = f"hidden layer {k} ({stages[0].name})"
        if part.shared:
            if k > 0 and not partitions[k - 1].shared:
                raise MTPruneInputError(f"{where}: C is not empty but the C before it is (call settle())")
            shared[f"l{k}"] = _slice_stage(stages, pick(k, part.shared),
                                           None if k == 0 else pick(k - 1, partitions[k - 1].shared))
        for t in tasks:
            members = part.exclusive.get(t, [])
            if not members:
                continue
            cols = None
            if k > 0:
                prev = partitions[k - 1]
                if not prev.exclusive.get(t) and not prev.shared:
                    raise MTPruneInputError(f"{where}: E_{t} reads nothing (call settle())")
                cols = cat(pick(k - 1, prev.exclusive.get(t, [])), pick(k - 1, prev.shared))
            exclusive[t][f"l{k}"] = _slice_stage(stages, pick(k, members), cols)
    heads = {}
    last = partitions[-1]
    for n, t in enumerate(tasks):
        out_stages = [chains[s].stages[-1] for s in tasks]
        if not last.exclusive.get(t) and not last.shared:
            raise MTPruneInputError(f"the output layer of task {t!r} reads nothing (call settle())")
        width = out_stages[n].width
        rows = (torch.full((width,), n, dtype=torch.long), torch.arange(width))
        cols = cat(pick(depth - 1, last.exclusive.get(t, [])), pick(depth - 1, last.shared))
        out = _slice_stage(out_stages, rows, cols, template=n)
        heads[t] = TaskBranch(exclusive[t], out)
    return MergedNet(shared, heads, depth)

