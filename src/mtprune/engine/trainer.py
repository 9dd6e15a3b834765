"""Multi-task training: one loop, with checkpoints, resume, model selection, DDP and logging.

Each epoch trains, evaluates on the validation split, appends a line to ``metrics.jsonl`` (and TensorBoard),
and writes ``checkpoints/last.pt`` atomically, plus ``checkpoints/best.pt`` when the selection score improves.

Model selection uses the validation split only; the score is Δm against a reference (see ``selection.py``).

Reproducibility: the data order depends only on ``(seed, epoch)``; the global RNGs are seeded once with
``seed + rank`` and their states saved in every checkpoint. Resuming from ``last.pt`` therefore continues
exactly as an uninterrupted run would (bit for bit on CPU).

Checkpoint keys (``torch.load(path, weights_only=True)`` reads them): ``format``, ``version``, ``epoch``
(epochs completed, 1-based), ``tasks`` (names), ``model``, ``optimizer``, ``scheduler``, ``weighting``,
``scaler`` (state dicts; ``model`` is the unwrapped module's), ``rng`` (one entry per rank: ``python``,
``numpy``, ``torch``, and ``cuda``, the training GPU's or None), ``run`` (``RunState`` as a dict: best
epoch/score/metrics, reference, last metrics) and ``config`` (``TrainConfig`` as a dict).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ..tasks.base import Task
from ..utils.atomic import remove_stale_temporaries
from ..utils.errors import MTPruneInputError
from ..utils.inputs import batch_size, call_model, input_spec
from ..utils.runtime import seed_everything
from .batch import check_targets, collate, task_outputs, unpack_batch
from .checkpoint import capture_rng, load_checkpoint, one_line, restore_rng, save_checkpoint
from .distributed import (
    all_gather_objects,
    all_reduce_sum,
    average_gradients,
    barrier,
    init_distributed,
    rank_device,
    train_sampler,
    unwrap,
    wrap_model,
)
from .evaluate import Metrics, eval_mode, evaluate
from .logging import RunLogger, log, progress_bar, progress_enabled
from .optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler
from .selection import RunState, check_reference
from .weighting import WEIGHTINGS, build_weighting


def set_data_epoch(dataset: Dataset, epoch: int) -> None:
    """Tell a dataset (or the dataset inside ``Subset`` wrappers) the epoch, when it has ``set_epoch``: a
    procedural dataset such as ``synthetic_scenes`` then serves fresh samples every epoch."""
    while dataset is not None:
        if callable(getattr(dataset, "set_epoch", None)):
            dataset.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)


class NonFiniteLossError(MTPruneInputError):
    """A task's training loss became NaN or Inf; training stopped before the optimizer step."""


@dataclass
class TrainConfig:
    """Training options (the YAML ``train`` section maps onto these)."""

    epochs: int = 10
    batch_size: int = 8  # per process
    eval_batch_size: int | None = None  # defaults to batch_size
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | step | cosine, stepped once per epoch
    step_size: int = 30
    gamma: float = 0.1
    weighting: str = "equal"  # equal | fixed | uncertainty | dwa
    weighting_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"weights": {...}}, {"temperature": 2}
    device: str = "auto"
    amp: bool = False  # CUDA only; ignored with a note on CPU
    seed: int = 0
    num_workers: int = 0
    grad_clip: float | None = None  # max global gradient norm
    drop_last: bool = False
    reference: dict[str, dict[str, float]] | None = None  # Δm reference for model selection
    quiet: bool = False
    tensorboard: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "eval_batch_size": self.eval_batch_size is None or self.eval_batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "step_size": self.step_size >= 1,
            "num_workers": self.num_workers >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "optimizer": self.optimizer in OPTIMIZERS,
            "scheduler": self.scheduler in SCHEDULERS,
            "weighting": self.weighting in WEIGHTINGS,
        }
        for key, ok in checks.items():
            if not ok:
                raise MTPruneInputError(f"train option {key!r} has an invalid value {getattr(self, key)!r}")


@dataclass
class TrainSummary:
    """What ``fit`` returns. ``best_*`` refer to the validation split; ``final_metrics`` to the last epoch."""

    best_epoch: int
    best_score: float
    best_metrics: Metrics
    final_metrics: Metrics
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    epochs_run: int  # epochs trained by this call (fewer than ``epochs`` after a resume)


class Trainer:
    """``Trainer(model, tasks, train_data, val_data, run_dir, config).fit()`` → :class:`TrainSummary`.

    ``model`` is any ``nn.Module`` whose forward returns ``{task: Tensor}``; it is trained in place on
    ``config.device``. Outputs for tasks not in ``tasks`` are ignored.

    DDP: under ``torchrun`` (or with a process group the caller started) the model is wrapped in DDP;
    ``find_unused_parameters`` is on only when the model also outputs tasks that are not trained. Batch size
    is per process; only rank 0 writes files; ``resume`` needs ``run_dir`` on a filesystem all ranks see.
    A process group started here stays up for later work: end it with ``distributed.shutdown_distributed()``.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[str, Task],
        train_data: Dataset,
        val_data: Dataset,
        run_dir: str | Path,
        config: TrainConfig | None = None,
    ) -> None:
        if not tasks:
            raise MTPruneInputError("training needs at least one task")
        self.model, self.tasks, self.names = model, dict(tasks), list(tasks)
        self.train_data, self.val_data = train_data, val_data
        self.run_dir = Path(run_dir)
        self.config = config or TrainConfig()
        if self.config.reference is not None:
            check_reference(self.config.reference, self.tasks)
        self.last_path = self.run_dir / "checkpoints" / "last.pt"
        self.best_path = self.run_dir / "checkpoints" / "best.pt"

    def fit(self) -> TrainSummary:
        cfg = self.config
        self.device = device = rank_device(cfg.device)
        self.dist = init_distributed(device)
        self.amp = cfg.amp and device.type == "cuda"
        if cfg.amp and not self.amp:
            log.warning("amp applies on CUDA only; ignored on %s", device)
        seed_everything(cfg.seed + self.dist.rank)
        model = self.model.to(device)
        find_unused = self._probe(model)
        self.weighting = build_weighting(cfg.weighting, self.names, **cfg.weighting_args).to(device)
        self.optimizer = build_optimizer(
            cfg.optimizer, self._param_groups(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
        )
        self.scheduler = build_scheduler(
            cfg.scheduler, self.optimizer, epochs=cfg.epochs, step_size=cfg.step_size, gamma=cfg.gamma
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        logger = RunLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=cfg.tensorboard)
        if cfg.resume:
            state = self._resume(model, logger)
        else:  # a fresh run: records a killed earlier attempt logged in run_dir are not this run's
            logger.drop_after(0)
            state = RunState(reference=cfg.reference)
        net = wrap_model(model, device, find_unused)
        sampler = train_sampler(self.train_data, cfg.seed, cfg.drop_last)
        generator = torch.Generator()
        loader = DataLoader(
            self.train_data, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
            generator=generator, drop_last=cfg.drop_last, pin_memory=device.type == "cuda", collate_fn=collate,
        )
        first = state.epoch + 1
        try:
            for epoch in range(first, cfg.epochs + 1):
                sampler.set_epoch(epoch)
                set_data_epoch(self.train_data, epoch)
                generator.manual_seed((cfg.seed * 1_000_003 + epoch) * 1024 + self.dist.rank)
                self._run_epoch(net, model, loader, epoch, state, logger)
        finally:
            logger.close()
            set_data_epoch(self.train_data, 0)  # later readers (pruning statistics) see the same data as after a
            # resume that skipped this training
        return TrainSummary(
            best_epoch=state.best_epoch,
            best_score=state.best_score,
            best_metrics=state.best_metrics,
            final_metrics=state.last_metrics,
            best_checkpoint=self.best_path if state.best_epoch else None,
            last_checkpoint=self.last_path if state.epoch else None,
            epochs_run=max(0, cfg.epochs - first + 1),
        )

    def _run_epoch(
        self, net: nn.Module, model: nn.Module, loader: DataLoader, epoch: int, state: RunState,
        logger: RunLogger,
    ) -> None:
        cfg, start = self.config, time.perf_counter()
        lr, weights = self.optimizer.param_groups[0]["lr"], self.weighting.weights()
        train_loss = self._train_epoch(net, loader, epoch)
        self.weighting.epoch_end(train_loss)
        self.scheduler.step()
        val = evaluate(
            model, self.val_data, self.tasks, device=self.device, batch_size=cfg.eval_batch_size or cfg.batch_size,
            amp=self.amp, with_loss=True, num_workers=cfg.num_workers,
        )
        score, improved = state.update(epoch, val, self.tasks)
        rng = all_gather_objects(capture_rng(self.device))
        if self.dist.is_main:
            logger.log_epoch({
                "epoch": epoch, "train_loss": train_loss, "val": val, "lr": lr, "weights": weights,
                "score": score, "best_epoch": state.best_epoch, "time": time.perf_counter() - start,
            })
            payload = self._payload(model, epoch, state, rng)
            if improved:  # best first: a kill between the two writes leaves last.pt one epoch behind, which a
                save_checkpoint(self.best_path, payload)  # resume redoes exactly, never a best.pt older than
            save_checkpoint(self.last_path, payload)  # the best epoch recorded in last.pt
        barrier()

    def _train_epoch(self, net: nn.Module, loader: DataLoader, epoch: int) -> dict[str, float]:
        """One pass over the data; returns each task's mean (unweighted) loss over all ranks' samples."""
        net.train()
        sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=self.device)  # loss·n, then n
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        show = progress_enabled(self.config.quiet) and self.dist.is_main
        with progress_bar(len(loader), f"epoch {epoch}/{self.config.epochs}", show) as advance:
            for step, batch in enumerate(loader, start=1):
                images, targets = unpack_batch(batch, self.names, self.device)
                with torch.autocast(self.device.type, enabled=self.amp):
                    outputs = task_outputs(call_model(net, images), self.names)
                    check_targets(self.tasks, outputs, targets)
                    losses = {t: self.tasks[t].loss(outputs[t], targets[t]) for t in self.names}
                stacked = torch.stack([losses[t].detach().double().reshape(()) for t in self.names])
                self._check_finite(stacked, epoch, step, outputs)
                total = self.weighting.combine(losses)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(total).backward()
                average_gradients(self.weighting.parameters())
                if self.config.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                n = batch_size(images)
                sums[:-1] += stacked * n
                sums[-1] += n
                advance(f"loss {total.item():.4f}")
        sums = all_reduce_sum(sums).cpu()
        return {t: float(sums[i] / max(float(sums[-1]), 1.0)) for i, t in enumerate(self.names)}

    def _check_finite(self, stacked: Tensor, epoch: int, step: int, outputs: Mapping[str, Tensor]) -> None:
        """Stop every rank together when any rank sees a non-finite task loss (no step, no checkpoint)."""
        bad = all_reduce_sum((~torch.isfinite(stacked)).double())
        if bool(bad.any()):
            names = [t for t, b in zip(self.names, bad.tolist(), strict=True) if b]
            diverged = [t for t in names if not bool(torch.isfinite(outputs[t].detach()).all())]
            why = f"; the model's outputs for {diverged} are already non-finite (diverged)" if diverged else ""
            last = self.last_path if self.last_path.exists() else "none (no epoch completed)"
            raise NonFiniteLossError(
                f"the training loss of task(s) {names} is NaN or Inf (epoch {epoch}, step {step}){why}; "
                f"stopped before the update; the last good checkpoint is {last}"
            )

    def _probe(self, model: nn.Module) -> bool:
        """Check the data and the model output on one training sample (eval mode, no grad).

        Returns whether the model also outputs tasks not being trained: their heads get no gradient, so DDP
        must look for unused parameters.
        """
        if len(self.train_data) == 0:
            raise MTPruneInputError("the training data is empty")
        if hasattr(self.val_data, "__len__") and len(self.val_data) == 0:
            raise MTPruneInputError("the validation data is empty (model selection needs it)")
        images, targets = unpack_batch(default_collate([self.train_data[0]]), self.names, self.device)
        with eval_mode(model, self.device), torch.no_grad():
            try:
                out = call_model(model, images)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                what = (f"of shape {list(images.shape)}, {images.dtype}" if isinstance(images, Tensor)
                        else f"{input_spec(images)}")  # a model with several inputs (utils/inputs.py)
                raise MTPruneInputError(f"the model cannot run on the training images (one sample {what}): "
                                        f"{one_line(err, 1)}") from err
            check_targets(self.tasks, task_outputs(out, self.names), targets)
        return bool(set(out) - set(self.names))

    def _param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The model's trainable parameters; a weighting's own parameters without weight decay."""
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        extra = list(self.weighting.parameters())
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        return groups

    def _payload(self, model: nn.Module, epoch: int, state: RunState, rng: list[Any]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "tasks": self.names,
            "model": unwrap(model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "run": asdict(state),
            "config": asdict(self.config),
        }

    def _resume(self, model: nn.Module, logger: RunLogger) -> RunState:
        """Load ``last.pt`` into every component; a run without a checkpoint starts from epoch 1."""
        if self.dist.is_main:  # temporaries of checkpoint writes that a kill interrupted
            remove_stale_temporaries(self.last_path.parent, recursive=False)
        if not self.last_path.exists():
            log.warning("resume: no checkpoint at %s; starting from epoch 1", self.last_path)
            logger.drop_after(0)
            return RunState(reference=self.config.reference)
        ckpt = load_checkpoint(self.last_path)
        try:
            if ckpt["tasks"] != self.names:
                raise MTPruneInputError(f"{self.last_path}: the checkpoint's tasks {ckpt['tasks']} are not "
                                        f"{self.names}; cannot resume")
            model.load_state_dict(ckpt["model"])
            self.weighting.load_state_dict(ckpt["weighting"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt["scaler"]:
                self.scaler.load_state_dict(ckpt["scaler"])
            rng = ckpt["rng"]
            if self.dist.rank < len(rng):
                restore_rng(rng[self.dist.rank], self.device)
            else:
                log.warning("resume: the checkpoint has no RNG state for rank %d; it keeps its seed", self.dist.rank)
            epoch, run = int(ckpt["epoch"]), RunState(**ckpt["run"])
        except MTPruneInputError:
            raise
        except (KeyError, RuntimeError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise MTPruneInputError(f"{self.last_path}: a damaged or foreign checkpoint; cannot resume from it "
                                    f"({type(err).__name__}: {one_line(err)})") from err
        logger.drop_after(epoch)
        return run


def train(
    model: nn.Module,
    tasks: Mapping[str, Task],
    train_data: Dataset,
    val_data: Dataset,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    **options: Any,
) -> TrainSummary:
    """Train ``model`` in place; ``options`` override fields of ``config`` (e.g. ``epochs=3``)."""
    unknown = sorted(set(options) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise MTPruneInputError(f"unknown train options {unknown}")
    cfg = TrainConfig(**{**asdict(config or TrainConfig()), **options})
    return Trainer(model, tasks, train_data, val_data, run_dir, cfg).fit()
