"""Training and evaluation: loss weighting, the trainer, checkpoints, DDP and logging."""

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate
from .optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler
from .selection import RunState, selection_score
from .trainer import NonFiniteLossError, TrainConfig, Trainer, TrainSummary, train
from .weighting import (
    WEIGHTINGS,
    DWAWeighting,
    EqualWeighting,
    FixedWeighting,
    UncertaintyWeighting,
    Weighting,
    build_weighting,
)

__all__ = [
    "OPTIMIZERS", "SCHEDULERS", "WEIGHTINGS", "DWAWeighting", "EqualWeighting", "FixedWeighting",
    "NonFiniteLossError", "RunState", "TrainConfig", "TrainSummary", "Trainer", "UncertaintyWeighting",
    "Weighting", "build_optimizer", "build_scheduler", "build_weighting", "evaluate", "load_checkpoint",
    "save_checkpoint", "selection_score", "train",
]
