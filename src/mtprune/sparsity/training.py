"""A small iteration-based training loop for masked models, for the methods that train while they sparsify
(dynamic sparse training, IMP rounds). Equal task weights: the loss is Σ_t L_t. Epoch-level training with
evaluation and checkpoints is ``mtprune.engine.Trainer``; masks survive it too.

After every optimizer step the pruned entries of ``weight_orig`` are set to 0 again, so the invariant holds
under any optimizer (with Adam or SGD, with or without weight decay, they stay at 0 anyway: the mask multiplies
their gradient).

Kill and resume: with ``SparseTrainConfig.checkpoint`` set, the drivers (IMP rounds, dynamic sparse training every
``checkpoint_every`` iterations) save each completed unit with :func:`save_progress`, and with ``resume`` continue
from it (:func:`load_progress`). A unit's checkpoint is an ordinary training checkpoint (``engine.checkpoint``:
atomic write, ``weights_only`` load) holding the masked model (``weight_orig`` and ``weight_mask``), the global RNG
states and the data loader's generator. The next batch after a checkpoint starts a new pass over the data, in the
uninterrupted run as in the resumed one, so both continue bit for bit alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.batch import unpack_batch
from ..engine.checkpoint import capture_rng, load_checkpoint, one_line, restore_rng, save_checkpoint
from ..engine.optim import build_optimizer
from ..engine.trainer import set_data_epoch
from ..utils.errors import MTPruneInputError
from ..utils.inputs import call_model
from .masks import apply_masks, is_masked, maskable_layers
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
    checkpoint: str | Path | None = None  # a file: each completed unit is saved there (IMP: a round)
    checkpoint_every: int = 0  # dynamic methods: iterations per unit (0: no checkpoints)
    resume: bool = False  # continue from ``checkpoint`` when it exists

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.weight_decay < 0 or self.checkpoint_every < 0:
            raise MTPruneInputError(f"invalid sparse training options {self}")


def cycle(data: Iterable, step: int = 0) -> Iterator:
    """Iterate ``data`` again and again (a shuffling DataLoader reshuffles each pass). A DataLoader's dataset is
    told the epoch of each pass (``set_data_epoch``; counted from 1 as the trainer does, the first pass being
    epoch ``step // len(data) + 1``), so a procedural dataset such as ``synthetic_scenes`` serves the sparse loops
    fresh samples every epoch exactly as it serves the trainer."""
    dataset = getattr(data, "dataset", None)
    epoch = step // len(data) + 1 if dataset is not None and len(data) else 1
    while True:
        if dataset is not None:
            set_data_epoch(dataset, epoch)
        epoch += 1
        seen = False
        for batch in data:
            seen = True
            yield batch
        if not seen:
            raise MTPruneInputError("no batches were seen: the data is empty")


class SparseLoop:
    """Equal-weight multi-task training of a (masked) model, ``steps`` iterations at a time."""

    def __init__(self, model: nn.Module, data: Iterable, losses: Mapping, config: SparseTrainConfig) -> None:
        self.model, self.config, self.data = model, config, data
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
                out = call_model(self.model, images)
                values = {t: fn(out[t], targets[t]) for t, fn in self.losses.items()}
                total = torch.stack([v.reshape(()) for v in values.values()]).sum()
            if not torch.isfinite(total):
                bad = [t for t, v in values.items() if not bool(torch.isfinite(v).all())]
                raise MTPruneInputError(f"the training loss of task(s) {bad} is NaN or Inf at step {self.step + 1}; "
                                        "stopped before the update")
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

    def new_pass(self) -> None:
        """Make the next batch start a new pass over the data (done after every checkpoint)."""
        self.batches = cycle(self.data, self.step)

    def save(self, kind: str, **state: Any) -> None:
        """:func:`save_progress` of this loop: the model, the optimizer, the step and the losses so far, plus
        ``state``; then a new data pass begins."""
        save_progress(self.config, kind, self.model, self.data, self.optimizer, step=self.step,
                      history=self.history, **state)
        self.new_pass()

    def resume(self, kind: str) -> dict[str, Any] | None:
        """Continue from the checkpoint :meth:`save` wrote (None: there is none, or not resuming)."""
        payload = load_progress(self.config, kind, self.model, self.data, self.optimizer)
        if payload is not None:
            self.step, self.history = int(payload["step"]), list(payload["history"])
            self.new_pass()
        return payload


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, entries: Tensor) -> None:
    """Zero every per-entry state tensor of ``param`` (Adam moments, SGD momentum) at ``entries`` (bool)."""
    state = optimizer.state.get(param)
    if not state:
        return
    with torch.no_grad():
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value[entries.to(value.device)] = 0


def load_masked_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a state dict of a (possibly) masked model: its masks are applied first, then every tensor loaded."""
    masks = {k[: -len("_mask")]: v.bool() for k, v in state.items() if k == "weight_mask" or k.endswith(".weight_mask")}
    apply_masks(model, masks)
    model.load_state_dict(state)


def _data_generator(data: Iterable) -> torch.Generator | None:
    gen = getattr(data, "generator", None)  # a DataLoader's: it shuffles and seeds each pass
    return gen if isinstance(gen, torch.Generator) else None


def save_progress(config: SparseTrainConfig, kind: str, model: nn.Module, data: Iterable,
                  optimizer: torch.optim.Optimizer | None = None, **state: Any) -> None:
    """Save a completed unit of work to ``config.checkpoint`` atomically (nothing without a path): the masked
    model, the optimizer, the global RNG states, the data loader's generator and ``state`` (tensors and plain
    containers)."""
    if not config.checkpoint:
        return
    gen = _data_generator(data)
    device = next(model.parameters()).device
    save_checkpoint(config.checkpoint, {
        "kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
        "rng": capture_rng(device), "data_rng": gen.get_state() if gen is not None else None, **state})


def load_progress(config: SparseTrainConfig, kind: str, model: nn.Module, data: Iterable,
                  optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
    """The checkpoint :func:`save_progress` wrote, when ``config.resume`` and it exists: the model (masks
    included), the optimizer and the RNG states are restored; returns the whole payload. A foreign or damaged file
    is an input error naming it."""
    if not (config.resume and config.checkpoint and Path(config.checkpoint).is_file()):
        return None
    path = config.checkpoint
    payload = load_checkpoint(path)
    if payload.get("kind") != kind:
        raise MTPruneInputError(f"{path}: a {payload.get('kind')!r} checkpoint, not {kind!r}; cannot resume from it")
    try:
        load_masked_state(model, payload["model"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        gen = _data_generator(data)
        if gen is not None and payload["data_rng"] is not None:
            gen.set_state(payload["data_rng"])
        restore_rng(payload["rng"], next(model.parameters()).device)
    except (KeyError, RuntimeError, TypeError, ValueError, MTPruneInputError) as err:
        raise MTPruneInputError(f"{path}: a damaged checkpoint, or one of another model; cannot resume from it "
                                f"({type(err).__name__}: {one_line(err)})") from err
    return payload
