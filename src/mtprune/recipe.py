"""From a validated ``RunConfig`` to the objects a run needs: tasks, datasets, model, train options, run dir."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import data as data_mod
from .config import RunConfig
from .engine.trainer import TrainConfig
from .models import build_model
from .tasks import Task, preset
from .utils.bounds import check_model_size
from .utils.errors import MTPruneInputError
from .utils.runtime import resolve_device


def build_tasks(cfg: RunConfig) -> dict[str, Task]:
    tasks = preset(cfg.tasks.preset, **cfg.tasks.kwargs)
    if cfg.tasks.names:
        unknown = sorted(set(cfg.tasks.names) - set(tasks))
        if unknown:
            raise MTPruneInputError(f"tasks.names: {unknown} are not in preset {cfg.tasks.preset!r} ({sorted(tasks)})")
        tasks = {n: tasks[n] for n in cfg.tasks.names}
    return tasks


def augmentation(cfg: RunConfig):
    if not cfg.data.augment:
        return None
    from .data.transforms import Compose, RandomHorizontalFlip, RandomScaleCrop

    return Compose([RandomScaleCrop(), RandomHorizontalFlip()])


def build_datasets(cfg: RunConfig, tasks: dict[str, Task]):
    """(train, val) datasets restricted to the configured tasks; augmentation on the training split only."""
    kw = dict(cfg.data.kwargs)
    names = list(tasks)
    train = data_mod.load(cfg.data.name, root=cfg.data.root, split=cfg.data.train_split, tasks=names,
                          transform=augmentation(cfg), **kw)
    val = data_mod.load(cfg.data.name, root=cfg.data.root, split=cfg.data.val_split, tasks=names, **kw)
    return train, val


def build_configured_model(cfg: RunConfig, tasks: dict[str, Task]) -> nn.Module:
    """The configured model, initialised from ``cfg.seed``: the same config gives the same initial weights in
    every process (a run, and its resumption, are reproducible). The global RNG state is left untouched."""
    kwargs = {"width": cfg.model.width, "head": cfg.model.head, "head_kwargs": cfg.model.head_kwargs or None,
              **cfg.model.kwargs}
    heads = {n: t.out_channels for n, t in tasks.items()}
    check_model_size(lambda: build_model(cfg.model.name, heads, **kwargs), "config key 'model'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model.name, heads, **kwargs)


def train_options(cfg: RunConfig, *, quiet: bool = False, resume: bool = False) -> TrainConfig:
    t = cfg.train
    weighting_args = {"weights": t.weights} if t.weighting == "fixed" else (
        {"temperature": t.dwa_temperature} if t.weighting == "dwa" else {})
    return TrainConfig(
        epochs=t.epochs, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, lr=t.lr,
        weight_decay=t.weight_decay, optimizer=t.optimizer, momentum=t.momentum, scheduler=t.scheduler,
        step_size=t.step_size, gamma=t.gamma, weighting=t.weighting, weighting_args=weighting_args,
        device=cfg.device, amp=t.amp and resolve_device(cfg.device).type == "cuda", seed=cfg.seed,
        num_workers=t.num_workers, grad_clip=t.grad_clip,
        quiet=quiet, resume=resume,
    )


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False,
                    config=None) -> Path:
    """A run directory, locked for this process (``mtprune.utils.rundir.prepare_run_dir``): an existing one is
    refused unless resuming (with unchanged settings) or ``overwrite`` of a directory mtprune made."""
    from .utils.rundir import prepare_run_dir as prepare

    return prepare(path, overwrite=overwrite, resume=resume, config=config)
