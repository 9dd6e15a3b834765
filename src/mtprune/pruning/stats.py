"""One statistics engine for every data-driven criterion.

Per batch it runs **one forward** and then **T backward passes** (``torch.autograd.grad`` with
``retain_graph``), one per task, asking autograd only for what the chosen criteria need:

- ``task_weight_grads``: ∂L_t/∂W for each group's producer weights, as ``[C, D]`` rows;
- ``task_gate_taylor``: Σ a · ∂L_t/∂a at each group's gates (Molchanov et al., CVPR 2019), summed over every
  dimension of the gate's output except its channel dimension (see :func:`gate_statistic`).

The core, :func:`per_task_gradients`, gives per-task gradients of any tensors (``mtprune.sparsity`` uses it
for every conv/linear weight). Summed-loss statistics follow by linearity (∂ΣL_t = Σ ∂L_t), so they cost nothing
extra. Each criterion turns the batch statistics of a group into per-channel scores; the engine averages them
over the batches of an interval and, under ``torch.distributed``, all-reduces the sums across ranks before any
decision.

Memory: gate statistics are reduced to one value per channel as each task's gradients arrive; per-task weight
gradients are asked of autograd only when a criterion needs them and live for one batch, and each group's
``GroupStats`` is built and scored one group at a time. Across batches only per-channel scores are kept (peak
memory against model size: ``mtprune bench speed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..models.validate import check_multitask_output
from ..utils.errors import MTPruneInputError
from ..utils.inputs import call_model, to_device
from .graph import ChannelGroup, PruningGraph

Loss = Callable[[Tensor, Tensor], Tensor]
TASK_WEIGHT_GRADS = "task_weight_grads"
TASK_GATE_TAYLOR = "task_gate_taylor"


def weight_rows(module: nn.Module, weight: Tensor | None = None) -> Tensor:
    """A producer's weight (or a tensor shaped like it, e.g. its gradient) as ``[out_channels, -1]`` rows.

    Conv and Linear weights hold output channels in dimension 0; a transposed conv's weight is
    ``[in, out/groups, *k]``, so its rows are gathered group by group."""
    w = module.weight if weight is None else weight
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        g = module.groups
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(g * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.GroupNorm, nn.PReLU)


def gate_params(module: nn.Module) -> list[Tensor] | None:
    """The parameters ``[weight, bias?]`` in which each output channel ``c`` of a gate is affine
    (``y_c = w_c · u + b_c``), or ``None`` when there are none (the statistic is then taken on the activation).

    For these modules Σ y_c · ∂L/∂y_c = ⟨w_c, ∂L/∂w_c⟩ + b_c · ∂L/∂b_c exactly, over every call of the module and
    whatever dimension its channels sit in (Conv: 1; Linear on tokens: last; LayerNorm: last; a channels-last
    ``LayerNorm2d``: 1). ``nn.MultiheadAttention``'s output is its ``out_proj`` (called through ``F.linear``).
    """
    if isinstance(module, nn.MultiheadAttention):
        module = module.out_proj
    if isinstance(module, (nn.modules.conv._ConvTransposeNd, nn.PReLU)):
        return None  # transposed: channels are not weight rows; PReLU: not affine in its parameter
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm,
                                                                 *_CHANNELS_FIRST[1:4])):
        return None
    bias = getattr(module, "bias", None)
    return [weight] + ([bias] if isinstance(bias, Tensor) else [])


def channel_dim(module: nn.Module, out: Tensor) -> int:
    """The dimension of ``module``'s output that holds its channels (used when a gate has no affine parameters):
    1 for Conv/BatchNorm/InstanceNorm/GroupNorm/PReLU, the last for Linear and LayerNorm. Refused when that
    dimension does not have the module's width (e.g. a channels-last subclass), rather than scoring another one."""
    if isinstance(module, nn.Linear):
        dim, width = out.dim() - 1, module.out_features
    elif isinstance(module, nn.LayerNorm):
        dim, width = out.dim() - len(module.normalized_shape), module.normalized_shape[0]
    elif isinstance(module, _CHANNELS_FIRST):
        dim = 1
        width = next((getattr(module, a) for a in ("out_channels", "num_features", "num_channels", "num_parameters")
                      if hasattr(module, a)), None)
    else:
        raise MTPruneInputError(f"cannot tell the channel dimension of gate {type(module).__name__}")
    if out.dim() <= dim or (width is not None and out.shape[dim] != width):
        raise MTPruneInputError(f"gate {type(module).__name__} outputs shape {tuple(out.shape)}: its {width} "
                                f"channels are not in dimension {dim}; cannot score its channels")
    return dim


def gate_statistic(params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """Σ a · ∂L/∂a per output channel from a gate's affine parameters and their gradients (``[C]``)."""
    return sum((p.detach() * g).reshape(p.shape[0], -1).sum(1) for p, g in zip(params, grads, strict=True))


def activation_statistic(module: nn.Module, act: Tensor, grad: Tensor) -> Tensor:
    """Σ a · ∂L/∂a per channel of an activation, summed over every dimension but the channel one (``[C]``)."""
    dim = channel_dim(module, act)
    return (act.detach() * grad).movedim(dim, 0).reshape(act.shape[dim], -1).sum(1)


@dataclass
class GroupStats:
    """What a criterion sees of one channel group (weights always; gradients when asked for)."""

    group: ChannelGroup
    weight: Tensor  # [C, D]: the producers' weight rows, concatenated
    norm_weight: Tensor | None  # [C]: Σ |γ| over the group's normalisation layers
    task_weight_grads: dict[str, Tensor] = field(default_factory=dict)  # task → [C, D]
    task_gate_taylor: dict[str, Tensor] = field(default_factory=dict)  # task → [C]


def to_group(group: ChannelGroup, name: str, rows: Tensor) -> Tensor:
    """Rows indexed by module ``name``'s output channels → rows indexed by the group's channels (its out map).

    The map is the identity for most layers; it is not when a producer reaches the group through a
    concatenation (e.g. ``cat([a(x), b(x)]) + c(x)``: channels 4..7 of ``c`` are channels 0..3 of ``b``'s group).
    """
    cmap = group.out_maps.get(name)
    if cmap is None or (rows.shape[0] == group.channels and cmap.root == cmap.local == list(range(group.channels))):
        return rows
    root = torch.tensor(cmap.root, device=rows.device)
    local = torch.tensor(cmap.local, device=rows.device)
    repeats = torch.bincount(root, minlength=group.channels)
    if rows.dim() == 2 and len(cmap.root) > group.channels and bool((repeats == repeats[0]).all()):
        # m out channels per group channel (an attention group: q, k and v rows of one channel): side by side
        order = torch.argsort(root, stable=True)
        return rows.index_select(0, local[order]).reshape(group.channels, -1)
    out = rows.new_zeros((group.channels, *rows.shape[1:]))
    return out.index_add_(0, root, rows.index_select(0, local))


def group_weights(model: nn.Module, group: ChannelGroup,
                  modules: Mapping[str, nn.Module] | None = None) -> tuple[Tensor, Tensor | None]:
    """A group's producer weight rows ``[C, D]`` and Σ |γ| of its normalisation layers (``modules``: the model's
    ``named_modules()`` as a dict, when the caller has it)."""
    modules = modules if modules is not None else dict(model.named_modules())
    weight = torch.cat([to_group(group, n, weight_rows(modules[n]).detach()) for n in group.producers], dim=1)
    gammas = [to_group(group, n, modules[n].weight.detach().abs()) for n in group.norms
              if getattr(modules[n], "weight", None) is not None]
    return weight, (torch.stack(gammas).sum(0) if gammas else None)


def static_stats(model: nn.Module, graph: PruningGraph) -> list[GroupStats]:
    """Weight-only statistics: no data needed."""
    modules = dict(model.named_modules())
    return [GroupStats(g, *group_weights(model, g, modules)) for g in graph.groups]


def check_losses(losses: Mapping[str, Loss], outputs: Mapping[str, Tensor]) -> None:
    missing = sorted(set(losses) - set(outputs))
    if missing:
        raise MTPruneInputError(f"losses given for tasks the model does not output: {missing}; "
                                f"model outputs {sorted(outputs)}")


def task_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                losses: Mapping[str, Loss]) -> dict[str, Tensor]:
    """Per-task losses; a non-finite loss is refused with the task's name (it must not decide a pruning step)."""
    check_losses(losses, outputs)
    out = {}
    for task, fn in losses.items():
        if task not in targets:
            raise MTPruneInputError(f"the data has no target for task {task!r}; targets: {sorted(targets)}")
        value = fn(outputs[task], targets[task])
        if not torch.isfinite(value):
            raise MTPruneInputError(f"the loss of task {task!r} is {value.item()}: refusing to use it")
        out[task] = value
    return out


def check_batch(images: object, targets: object, tasks: Iterable[str]) -> None:
    """Refuse a batch the engine cannot use, naming the problem: images that are not a finite floating-point
    tensor, targets that are not a ``{task: tensor}`` mapping holding every task, non-finite float targets."""
    from ..engine.batch import check_images  # late: the engine package imports pruning

    check_images(images)
    if not isinstance(targets, Mapping):
        raise MTPruneInputError(f"the targets of a batch must be a mapping {{task: tensor}}, got "
                                f"{type(targets).__name__}")
    missing = sorted(set(tasks) - set(targets))
    if missing:
        raise MTPruneInputError(f"the batch has no target for tasks {missing}; targets: {sorted(targets)}")
    for task in tasks:
        target = targets[task]
        if not isinstance(target, Tensor):
            raise MTPruneInputError(f"the target of task {task!r} must be a tensor, got {type(target).__name__}")
        if target.is_floating_point() and not bool(torch.isfinite(target).all()):
            raise MTPruneInputError(f"the target of task {task!r} contains NaN or Inf values")


TaskGrads = Callable[[str, list[Tensor]], None]


def per_task_gradients(model: nn.Module, images: Tensor, targets: Mapping[str, Tensor], losses: Mapping[str, Loss],
                       inputs: Sequence[Tensor] | Callable[[], Sequence[Tensor]], *, checked: Sequence[str] = (),
                       on_task: TaskGrads | None = None) -> tuple[dict[str, float], dict[str, list[Tensor]]]:
    """The engine's core: **one forward**, then **T backward passes** (``autograd.grad`` with ``retain_graph``).

    Returns the task losses and ``{task: [∂L_t/∂x for x in inputs]}`` (zeros where x does not reach L_t).
    ``inputs`` may be a callable, called after the forward, for tensors that exist only then (activations
    captured by hooks; a masked layer's ``module.weight``, recomputed each forward, whose gradient is the dense
    gradient of the effective weight). Frozen parameters take part (``requires_grad`` is switched on for the
    pass, then restored); parametrized weights are computed once (``parametrize.cached``). The gradients of the
    first ``len(checked)`` inputs must be finite, else the error names the task and ``checked[i]``. With
    ``on_task(task, grads)``, each task's gradients are handed over as soon as computed and not kept (one
    task's gradients in memory at a time); the returned dict is then empty.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    kept: dict[str, list[Tensor]] = {}
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad(), parametrize.cached():
            values = task_losses(check_multitask_output(call_model(model, images)), targets, losses)
            xs = list(inputs() if callable(inputs) else inputs)
            names = list(values)
            for i, task in enumerate(names):
                grads = torch.autograd.grad(values[task], xs, retain_graph=i < len(names) - 1, allow_unused=True)
                grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads, strict=True)]
                looked = grads[:len(checked)]
                if looked and not bool(torch.stack([torch.isfinite(g).all() for g in looked]).all()):
                    bad = [n for n, g in zip(checked, looked, strict=False) if not torch.isfinite(g).all()]
                    raise MTPruneInputError(f"the gradients of task {task!r} contain NaN/Inf (at {bad[:3]}): "
                                            "refusing to prune on them")
                if on_task is None:
                    kept[task] = grads
                else:
                    on_task(task, grads)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return {t: float(v.detach()) for t, v in values.items()}, kept


class StatisticsEngine:
    """Gathers per-batch statistics for a set of criteria and accumulates their per-channel scores."""

    def __init__(self, model: nn.Module, graph: PruningGraph, losses: Mapping[str, Loss],
                 criteria: Iterable, device: torch.device | None = None) -> None:
        self.model, self.graph, self.losses = model, graph, dict(losses)
        self.criteria = list(criteria)
        self.needs = set().union(*(c.needs for c in self.criteria)) if self.criteria else set()
        self.device = device or next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        """Start a new interval: scores of removed filters are never reused."""
        self.sums: dict[str, dict[int, object]] = {c.name: {} for c in self.criteria}
        self.batches = 0

    def _gather(self, images: Tensor, targets: Mapping[str, Tensor], params: list[Tensor]):
        """One forward and T backward passes (``per_task_gradients``). Returns the losses, each task's raw
        statistics (``"w:<producer>"``: ∂L_t/∂W as ``[C, D]`` rows; ``"gate:<gate>"``: Σ a · ∂L_t/∂a, ``[C]``)
        and the summed-loss gradients of ``params``. Gate statistics come from the gate's affine parameters
        (:func:`gate_params`) or, for a gate without any, from its activation summed over every dimension but
        its channel dimension (:func:`channel_dim`); they are reduced to ``[C]`` as each task's gradients
        arrive. Weight gradients are kept only when a criterion asks for them."""
        modules = dict(self.model.named_modules())
        groups = self.graph.groups
        captured: dict[str, Tensor] = {}
        gates = sorted({n for g in groups for n in g.gates}) if TASK_GATE_TAYLOR in self.needs else []
        hooked = [n for n in gates if gate_params(modules[n]) is None]
        hooks = [modules[name].register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out))
                 for name in hooked]
        producers = sorted({n for g in groups for n in g.producers}) if TASK_WEIGHT_GRADS in self.needs else []
        slot: dict[int, int] = {}  # id(tensor) -> position in the inputs handed to autograd
        gate_slots: dict[str, list[int]] = {}
        checked: list[str] = []  # names of the leading inputs, filled in by inputs() before any gradient is read

        def inputs() -> list[Tensor]:  # after the forward: activations exist, (parametrized) weights are current
            xs: list[Tensor] = []

            def add(t: Tensor, name: str | None) -> int:
                if id(t) not in slot:
                    slot[id(t)] = len(xs)
                    xs.append(t)
                    if name is not None:
                        checked.append(name)
                return slot[id(t)]

            for n in producers:
                add(modules[n].weight, n)
            for n in gates:
                if n in captured:
                    out = captured[n]
                    if not isinstance(out, Tensor):
                        raise MTPruneInputError(f"gate {n} returns a {type(out).__name__}, not a tensor; "
                                                "cannot score its channels")
                    gate_slots[n] = [add(out, n)]
                else:
                    gate_slots[n] = [add(t, n) for t in gate_params(modules[n])]
            for p in params:
                add(p, None)
            return xs

        per_task: dict[str, dict[str, Tensor]] = {}
        summed: list[Tensor | None] = [None] * len(params)

        def on_task(task: str, grads: list[Tensor]) -> None:
            raw = per_task[task] = {}
            for n in producers:
                raw["w:" + n] = weight_rows(modules[n], grads[slot[id(modules[n].weight)]])
            for n, slots in gate_slots.items():
                if n in captured:
                    raw["gate:" + n] = activation_statistic(modules[n], captured[n], grads[slots[0]])
                else:
                    raw["gate:" + n] = gate_statistic(gate_params(modules[n]), [grads[i] for i in slots])
            for j, p in enumerate(params):
                g = grads[slot[id(p)]]
                summed[j] = g if summed[j] is None else summed[j] + g

        try:
            losses, _ = per_task_gradients(self.model, images, targets, self.losses, inputs,
                                           checked=checked, on_task=on_task)
        finally:
            for h in hooks:
                h.remove()
        return losses, per_task, summed

    def _group_stats(self, group: ChannelGroup, per_task: Mapping[str, Mapping[str, Tensor]],
                     modules: Mapping[str, nn.Module]) -> GroupStats:
        """One group's statistics, in the group's channel order, from the raw per-task statistics."""
        s = GroupStats(group, *group_weights(self.model, group, modules))
        for task, raw in per_task.items():
            if TASK_WEIGHT_GRADS in self.needs:
                s.task_weight_grads[task] = torch.cat([to_group(group, n, raw["w:" + n]) for n in group.producers],
                                                      dim=1)
            if TASK_GATE_TAYLOR in self.needs:
                s.task_gate_taylor[task] = torch.stack([to_group(group, n, raw["gate:" + n])
                                                        for n in group.gates]).sum(0)
        return s

    def step(self, images: Tensor, targets: Mapping[str, Tensor],
             params: list[Tensor] | None = None) -> dict[str, float]:
        """One batch: one forward, T backward passes; accumulate every criterion's batch scores.

        With ``params``, the gradient of the summed loss Σ_t L_t is also written into each ``param.grad``
        (from the same T backward passes), so a training step costs no extra pass. Memory: the raw per-task
        statistics live for this call only; each group's ``GroupStats`` is built, scored by every criterion and
        dropped before the next, and across batches only the criteria's per-channel scores are summed.
        """
        check_batch(images, targets, self.losses)
        images = to_device(images, self.device)  # a tensor, or a tuple/dict for several inputs
        targets = {k: v.to(self.device) for k, v in targets.items()}
        params = list(params or [])
        losses, per_task, summed = self._gather(images, targets, params)
        for p, g in zip(params, summed, strict=True):
            p.grad = g.detach()
        scoring = [c for c in self.criteria if c.needs_data]  # weight-only criteria score the weights directly
        if scoring:
            modules = dict(self.model.named_modules())
            for group in self.graph.groups:
                s = self._group_stats(group, per_task, modules)
                for crit in scoring:
                    value = crit.batch_score(s)
                    if value is not None:
                        acc = self.sums[crit.name]
                        acc[group.index] = _add(acc.get(group.index), value)
                del s
        self.batches += 1
        return losses

    def run(self, data: Iterable, max_batches: int | None = None) -> None:
        """``step`` over the ``(images, {task: target})`` batches of ``data``; a malformed batch is refused."""
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            if not (isinstance(batch, list | tuple) and len(batch) == 2):
                raise MTPruneInputError(f"batch {i} of the statistics data must be a pair (images, {{task: "
                                        f"target}}), got {type(batch).__name__}")
            self.step(*batch)
        if self.batches == 0:
            raise MTPruneInputError("no batches were seen: the data is empty")

    def averaged(self, criterion) -> dict[int, object]:
        """Mean batch scores of one criterion, reduced across DDP ranks; NaN is refused."""
        acc = self.sums[criterion.name]
        count = torch.tensor([float(self.batches)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            acc = {k: _map(v, _all_reduce) for k, v in acc.items()}
            count = _all_reduce(count)
        out = {k: _map(v, lambda t: (t.double() / count.item()).float()) for k, v in acc.items()}
        for k, v in out.items():
            for t in _leaves(v):
                if not torch.isfinite(t).all():
                    raise MTPruneInputError(f"statistics of group {k} contain NaN/Inf: refusing to prune on them")
        return out


def _all_reduce(t: Tensor) -> Tensor:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(device).clone()
    dist.all_reduce(out)
    return out.to(t.device)


def _map(value, fn):
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return fn(value)


def _leaves(value):
    return list(value.values()) if isinstance(value, dict) else [value]


def _add(acc, value):
    value = _map(value, lambda t: t.detach().double().cpu())
    if acc is None:
        return value
    if isinstance(value, dict):
        return {k: acc[k] + v for k, v in value.items()}
    return acc + value
