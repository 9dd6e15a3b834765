"""The criterion registry: a name → class, one line each."""

from __future__ import annotations

from ...utils.errors import MTPruneInputError
from .base import Criterion
from .bn_scale import BNScale
from .cosprune import CosPrune, mean_pairwise_cosine
from .disparse_structured import DiSparseStructured
from .magnitude import L1, L2
from .random_scores import Random
from .task_taylor import TaskTaylor
from .taylor import Taylor

CRITERIA: dict[str, type[Criterion]] = {
    "random": Random,
    "l1": L1,
    "l2": L2,
    "bn_scale": BNScale,
    "taylor": Taylor,
    "task_taylor": TaskTaylor,
    "cosprune": CosPrune,
    "disparse_structured": DiSparseStructured,
}


def get_criterion(criterion: str | Criterion, **kwargs) -> Criterion:
    """A registry name or a ``Criterion`` instance."""
    if isinstance(criterion, Criterion):
        return criterion
    if criterion not in CRITERIA:
        raise MTPruneInputError(f"unknown criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    return CRITERIA[criterion](**kwargs)


__all__ = ["CRITERIA", "Criterion", "get_criterion", "mean_pairwise_cosine"]
