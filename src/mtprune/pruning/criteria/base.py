"""The criterion contract: ask for statistics, return one score per channel of a group (low = pruned first).

A criterion that needs data declares ``needs`` (see ``pruning.stats``) and implements ``batch_score``;
the engine averages batch scores over an interval. A weight-only criterion implements ``score``.
``finalize`` may combine groups (e.g. per-task normalisation); ``applies_to`` limits the candidate groups.
Adding a criterion is one file plus one line in ``criteria/__init__.py``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..graph import ChannelGroup
from ..stats import GroupStats


class Criterion:
    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # how global ranking compares groups: "none" ranks raw scores, "mean" divides each group's scores by their mean
    normalize: ClassVar[str] = "none"
    # which groups ``applies_to`` accepts, in words (for the refusal when it accepts none of a model's groups)
    requirement: ClassVar[str] = "any channel group"
    # samples per pruning decision at which two independent decisions agree (split-half rank correlation of the
    # scores >= 0.91 in the criteria benchmark, benchmarks/README.md): the default of ``prune.stats_batches``
    stable_samples: ClassVar[int] = 512

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    def applies_to(self, group: ChannelGroup) -> bool:
        return True

    def score(self, stats: GroupStats) -> Tensor:
        """Weight-only scores. Data-driven criteria use ``batch_score`` instead."""
        raise NotImplementedError

    def batch_score(self, stats: GroupStats) -> Tensor | dict[str, Tensor] | None:
        """Scores contributed by one batch (averaged over the interval by the engine)."""
        raise NotImplementedError

    def finalize(self, averaged: dict[int, Tensor | dict[str, Tensor]]) -> dict[int, Tensor]:
        """Turn averaged batch scores into one score per channel, per group index."""
        return averaged  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
