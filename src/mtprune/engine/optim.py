"""Optimizer and learning-rate scheduler factories, one registry each (schedulers step once per epoch)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, StepLR

from ..utils.errors import MTPruneInputError

ParamGroups = Iterable[dict[str, Any]]

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adam": lambda groups, lr, weight_decay, momentum: torch.optim.Adam(
        groups, lr=lr, weight_decay=weight_decay
    ),
    "adamw": lambda groups, lr, weight_decay, momentum: torch.optim.AdamW(
        groups, lr=lr, weight_decay=weight_decay
    ),
    "sgd": lambda groups, lr, weight_decay, momentum: torch.optim.SGD(
        groups, lr=lr, weight_decay=weight_decay, momentum=momentum
    ),
}

SCHEDULERS: dict[str, Callable[..., LRScheduler]] = {
    "none": lambda opt, epochs, step_size, gamma: ConstantLR(opt, factor=1.0, total_iters=0),
    "step": lambda opt, epochs, step_size, gamma: StepLR(opt, step_size=step_size, gamma=gamma),
    "cosine": lambda opt, epochs, step_size, gamma: CosineAnnealingLR(opt, T_max=max(epochs, 1)),
}


def _pick(registry: dict[str, Callable[..., Any]], name: str, what: str) -> Callable[..., Any]:
    if name not in registry:
        raise MTPruneInputError(f"unknown {what} {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def build_optimizer(
    name: str, groups: ParamGroups, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> Optimizer:
    """``adam``, ``adamw`` or ``sgd`` over parameter groups (a group may override ``weight_decay``)."""
    return _pick(OPTIMIZERS, name, "optimizer")(list(groups), lr, weight_decay, momentum)


def build_scheduler(
    name: str, optimizer: Optimizer, *, epochs: int, step_size: int = 30, gamma: float = 0.1
) -> LRScheduler:
    """``none`` (constant), ``step`` (×gamma every step_size epochs) or ``cosine`` (to 0 over ``epochs``)."""
    return _pick(SCHEDULERS, name, "scheduler")(optimizer, epochs, step_size, gamma)
