"""A small iteration-based training loop for masked models, for the methods that train while they sparsify
(dynamic sparse training, IMP rounds). Equal task weights: the loss is Σ_t L_t. Epoch-level training with
evaluation and checkpoints is ``mtprune.engine.Trainer``; masks survive it too.

After every optimizer step the pruned entries of ``weight_orig`` are set to 0 again, so the invariant holds
under any optimizer (with Adam or SGD, with or without weight decay, they stay at 0 anyway: the mask multiplies
their gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..engine.batch import unpack_batch
from ..engine.optim import build_optimizer
from ..utils.errors import MTPruneInputError
from .masks import is_masked, maskable_layers
from .scores import as_losses

StepHook = Callable[[int, Tensor, dict[str, Tensor]], None]


@dataclass
class SparseTrainConfig:
    """Options of :class:`SparseLoop` (``steps`` optimizer iterations)."""

    steps: int = 1000
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    grad_clip: float | None = None
    cosine: bool = False  # learning rate lr · (1 + cos(π t / steps)) / 2, t = iterations done by the loop

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise MTPruneInputError(f"invalid sparse training options {self}")


def cycle(data: Iterable) -> Iterator:
    """Iterate ``data`` again and again (a shuffling DataLoader reshuffles each pass)."""
    while True:
        seen = False
        for batch in data:
            seen = True
            yield batch
        if not seen:
            raise MTPruneInputError("no batches were seen: the data is empty")


class SparseLoop:
    """Equal-weight multi-task training of a (masked) model, ``steps`` iterations at a time."""

    def __init__(self, model: nn.Module, data: Iterable, losses: Mapping, config: SparseTrainConfig) -> None:
        self.model, self.config = model, config
        self.losses = as_losses(losses)
        self.device = next(model.parameters()).device
        self.batches = cycle(data)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config.optimizer, [{"params": params}], lr=config.lr,
                                         weight_decay=config.weight_decay, momentum=config.momentum)
        self.step = 0
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def _keep_pruned_at_zero(self) -> None:
        for m in maskable_layers(self.model).values():
            if is_masked(m):
                m.weight_orig.mul_(m.weight_mask)

    def run(self, steps: int | None = None, hook: StepHook | None = None) -> None:
        """Train ``steps`` iterations (default ``config.steps``); ``hook(step, images, targets)`` after each."""
        names = list(self.losses)
        for _ in range(self.config.steps if steps is None else steps):
            if self.config.cosine:
                progress = min(self.step / max(self.config.steps, 1), 1.0)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.config.lr * (1 + math.cos(math.pi * progress)) / 2
            images, targets = unpack_batch(next(self.batches), names, self.device)
            self.model.train()
            with torch.enable_grad():
                out = self.model(images)
                values = {t: fn(out[t], targets[t]) for t, fn in self.losses.items()}
                total = torch.stack([v.reshape(()) for v in values.values()]).sum()
            if not torch.isfinite(total):
                raise MTPruneInputError(f"the training loss is {total.item()} at step {self.step + 1}: stopped")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self._keep_pruned_at_zero()
            self.step += 1
            self.history.append({t: float(v.detach()) for t, v in values.items()})
            if hook is not None:
                hook(self.step, images, targets)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, entries: Tensor) -> None:
    """Zero every per-entry state tensor of ``param`` (Adam moments, SGD momentum) at ``entries`` (bool)."""
    state = optimizer.state.get(param)
    if not state:
        return
    with torch.no_grad():
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value[entries.to(value.device)] = 0
