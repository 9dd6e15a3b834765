"""Reading a single-task network as a chain of stages, the form PAM merges (He et al., KDD 2021, §3.5).

A *stage* is one Conv2d or Linear layer (``layer``), the parameter-free ops that feed it and may re-index its
input (``pre``: a Flatten, pooling on the input, ...) and the per-channel ops after it (``post``: ReLU,
BatchNorm, max/average pooling, dropout). The last stage is the task's output layer (the predictor); the
others are the *hidden* stages whose output neurons PAM partitions.

Supported: ``MultiTaskModel`` with one head, ``nn.Sequential`` chains (nested ones too, e.g. the zoo's
``lenet5`` and ``vgg16_cls``) and the zoo's ``linear`` head. Anything else (a residual block, a custom
``forward``) is refused with an :class:`MTPruneInputError` that names the module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtprune.models.heads.simple import LinearHead
from mtprune.models.multitask import MultiTaskModel
from mtprune.utils.errors import MTPruneInputError

__all__ = ["Chain", "Stage", "check_same_architecture", "read_chain"]

LAYERS = (nn.Conv2d, nn.Linear)
PER_CHANNEL = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
)
SUPPORTED = "Conv2d, Linear, BatchNorm1d/2d, ReLU, max/average pooling, Dropout and Flatten in a sequence"


@dataclass
class Stage:
    """One layer of a chain with the ops around it; ``in_per_channel`` input features per producer channel."""

    name: str  # qualified name of the layer in its model
    layer: nn.Conv2d | nn.Linear
    pre: list[nn.Module] = field(default_factory=list)
    post: list[nn.Module] = field(default_factory=list)
    in_per_channel: int = 1  # h*w when a Flatten sits between the previous stage and this Linear
    out_shape: tuple[int, ...] = ()  # per-sample shape after ``post``

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.layer, nn.Conv2d) else "linear"

    @property
    def width(self) -> int:
        return self.layer.out_channels if isinstance(self.layer, nn.Conv2d) else self.layer.out_features

    def run(self, x: Tensor) -> Tensor:
        for op in self.pre:
            x = op(x)
        x = self.layer(x)
        for op in self.post:
            x = op(x)
        return x


@dataclass
class Chain:
    """A network as ``stages``; ``stages[-1]`` is the output layer."""

    stages: list[Stage]
    input_shape: tuple[int, ...]

    @property
    def hidden(self) -> list[Stage]:
        return self.stages[:-1]

    def activations(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Outputs of every hidden stage (after its per-channel ops) and the network output."""
        acts = []
        for stage in self.stages:
            x = stage.run(x)
            acts.append(x)
        return acts[:-1], x


def _refuse(task: str, path: str, module: nn.Module, why: str = "") -> MTPruneInputError:
    where = path or "the model"
    return MTPruneInputError(
        f"PAM merges chain networks only ({SUPPORTED}); network {task!r}: {where} is a "
        f"{type(module).__name__}{why}, which is not supported"
    )


def _walk(task: str, module: nn.Module, path: str, x: Tensor, out: list[tuple[str, nn.Module]]) -> Tensor:
    """Append the leaf ops of ``module`` to ``out`` and propagate the probe ``x`` through them."""
    join = (lambda n: f"{path}.{n}" if path else n)  # noqa: E731
    if isinstance(module, MultiTaskModel):
        if len(module.heads) != 1:
            raise MTPruneInputError(f"network {task!r} has {len(module.heads)} heads; PAM merges single-task "
                                    f"networks (one head each)")
        x = _walk(task, module.backbone, join("backbone"), x, out)
        name, head = next(iter(module.heads.items()))
        return _walk(task, head, join(f"heads.{name}"), x, out)
    if isinstance(module, LinearHead):
        if x.dim() == 4:
            out += [(join("pool"), nn.AdaptiveAvgPool2d(1)), (join("pool.flatten"), nn.Flatten(1))]
            x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        if module.hidden is not None:
            x = _walk(task, module.hidden, join("hidden"), x, out)
        return _walk(task, module.out, join("out"), x, out)
    if isinstance(module, nn.Sequential):  # a subclass's own forward is checked against the chain afterwards
        for name, child in module.named_children():
            x = _walk(task, child, join(name), x, out)
        return x
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        raise _refuse(task, path, module, " with groups > 1 or non-zero padding")
    if isinstance(module, (*LAYERS, *PER_CHANNEL, nn.Flatten)):
        out.append((path, module))
        return module(x)
    raise _refuse(task, path, module)


def _split(task: str, leaves: list[tuple[str, nn.Module]]) -> list[Stage]:
    stages: list[Stage] = []
    pending: list[nn.Module] = []  # ops waiting for the next layer
    flattened = False
    for path, op in leaves:
        if isinstance(op, LAYERS):
            stages.append(Stage(path, op, pre=pending))
            pending, flattened = [], False
        elif stages and not flattened and isinstance(op, PER_CHANNEL):
            stages[-1].post.append(op)
        else:
            if stages and isinstance(op, (nn.BatchNorm1d, nn.BatchNorm2d)):
                raise _refuse(task, path, op, " after a Flatten")
            pending.append(op)
            flattened = flattened or isinstance(op, nn.Flatten)
    if not stages:
        raise MTPruneInputError(f"network {task!r} has no Conv2d or Linear layer to merge")
    if pending:
        if any(isinstance(op, nn.Flatten) for op in pending):
            raise MTPruneInputError(f"network {task!r} ends in a Flatten after its output layer; PAM needs the "
                                    "output layer last")
        stages[-1].post += pending
    return stages


def read_chain(task: str, model: nn.Module, example: Tensor) -> Chain:
    """Read ``model`` as a :class:`Chain`, checking on ``example`` (one sample is enough) that it is one."""
    if not isinstance(model, nn.Module):
        raise MTPruneInputError(f"network {task!r} must be an nn.Module, got {type(model).__name__}")
    probe = example[:1]
    leaves: list[tuple[str, nn.Module]] = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _walk(task, model, "", probe, leaves)
            stages = _split(task, leaves)
            y = probe
            prev: Stage | None = None
            for stage in stages:
                if prev is not None and isinstance(stage.layer, nn.Linear):
                    channels = prev.width
                    if stage.layer.in_features % channels:
                        raise MTPruneInputError(
                            f"network {task!r}: {stage.name} reads {stage.layer.in_features} features, not a "
                            f"multiple of the {channels} channels of {prev.name}")
                    stage.in_per_channel = stage.layer.in_features // channels
                y = stage.run(y)
                stage.out_shape = tuple(y.shape[1:])
                if y.shape[1] != stage.width:
                    raise _refuse(task, stage.name, stage.layer, " whose channels are re-indexed after it")
                prev = stage
            expected = model(probe)
    finally:
        model.train(was)
    if isinstance(expected, Mapping):
        expected = next(iter(expected.values()))
    if not isinstance(expected, Tensor) or expected.shape != y.shape or not torch.allclose(expected, y, atol=1e-5):
        raise MTPruneInputError(
            f"network {task!r}: its forward is not the sequence of its layers (a custom forward, a skip "
            f"connection?); PAM merges chain networks only ({SUPPORTED})")
    return Chain(stages, tuple(example.shape[1:]))


def _signature(op: nn.Module) -> str:
    if isinstance(op, nn.Conv2d):
        return f"Conv2d(k={op.kernel_size}, s={op.stride}, p={op.padding}, d={op.dilation})"
    if isinstance(op, nn.Linear):
        return "Linear"
    if isinstance(op, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"{type(op).__name__}(eps={op.eps}, affine={op.affine}, stats={op.track_running_stats})"
    return repr(op)


def check_same_architecture(chains: Mapping[str, Chain]) -> None:
    """PAM merges networks of one architecture; widths may differ, the layer sequence may not."""
    (first, ref), *others = chains.items()
    for task, chain in others:
        if chain.input_shape != ref.input_shape:
            raise MTPruneInputError(f"networks {first!r} and {task!r} read inputs of different shapes "
                                    f"{ref.input_shape} and {chain.input_shape}")
        if len(chain.stages) != len(ref.stages):
            raise MTPruneInputError(f"networks {first!r} and {task!r} have {len(ref.stages)} and "
                                    f"{len(chain.stages)} layers; PAM merges networks of the same architecture")
        for a, b in zip(ref.stages, chain.stages, strict=True):
            sig_a = [_signature(o) for o in (*a.pre, a.layer, *a.post)]
            sig_b = [_signature(o) for o in (*b.pre, b.layer, *b.post)]
            if sig_a != sig_b or a.out_shape[1:] != b.out_shape[1:] or a.in_per_channel != b.in_per_channel:
                raise MTPruneInputError(f"networks {first!r} and {task!r} differ at {a.name} / {b.name}: "
                                        f"{sig_a} vs {sig_b}")
