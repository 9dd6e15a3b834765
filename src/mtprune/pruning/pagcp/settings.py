"""PAGCP's knobs (Ye et al., TPAMI 2023, arXiv 2303.11923), validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...utils.errors import MTPruneInputError

DEFAULT_RATIOS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95, as the code
RANKINGS = ("worst_task", "total_loss")

#: The settings of the authors' README command (HankYe/PAGCP: ``--initial_rate 0.06 --initial_thres 6. --topk 0.8
#: --exp``), with their code's top-P ranking. Their code also probes on the whole validation set and fine-tunes
#: fully between rounds (one round per invocation of ``compress.py``).
README_SETTINGS: dict[str, Any] = {"theta0": 0.06, "budget": 6.0, "top_p": 0.8, "ranking": "total_loss",
                                   "probe_ratio": 0.3, "ratios": DEFAULT_RATIOS}


@dataclass(frozen=True)
class PAGCPSettings:
    """PAGCP's knobs (Ye et al. 2023).

    - ``theta0``: θ of the first layer pruned in a round (the code's ``initial_rate``; README 0.06). ``None``
      takes half the uniform per-layer allowance, ``(budget^(1/n) - 1) / 2``, so that λ > 1.
    - ``budget``: ``Π(1 + θ_i)`` per round, the factor each task's loss may grow by (``initial_thres``; README 6).
    - ``probe_ratio``: the fraction removed to order the layers by the MACs it saves (the code: 0.3).
    - ``ratios``: the trial ratios of each layer's search (the code: 0.05 … 0.95 in 19 steps).
    - ``top_p``: the fraction of layers pruned per round (``topk``; README 0.8).
    - ``ranking``: how top-P ranks the layers. ``"worst_task"`` (default, ours): the worst task's relative loss
      increase ÷ the MACs the layer alone saves, keeping ``ceil(top_p × layers with a nonzero ratio)``.
      ``"total_loss"`` (the authors' ``get_ratio``): the increase of the summed task losses (absolute) ÷ the MACs
      saved with the kept ratios applied in sequence, keeping ``int(top_p × layers probed)``.
    - ``rounds``, ``held_out_batches``, ``tolerance`` (relative window around ``target_macs``), ``cache``
      (replay upstream activations in trials).
    """

    theta0: float | None = None
    budget: float = 1.1
    probe_ratio: float = 0.3
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    top_p: float = 0.5
    ranking: str = "worst_task"
    rounds: int = 5
    held_out_batches: int = 4
    tolerance: float = 0.02
    cache: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        problems = []
        if not self.budget > 1:
            problems.append(f"budget must be > 1 (a factor on each task's loss), got {self.budget}")
        elif self.theta0 is not None and not 0 < self.theta0 < self.budget - 1:
            problems.append(f"theta0 must be in (0, budget - 1) = (0, {self.budget - 1:g}), got {self.theta0}")
        if not 0 < self.probe_ratio < 1:
            problems.append(f"probe_ratio must be in (0, 1), got {self.probe_ratio}")
        r = self.ratios
        if not r or any(not 0 < x < 1 for x in r) or any(a >= b for a, b in zip(r, r[1:], strict=False)):
            problems.append(f"ratios must be increasing values in (0, 1), got {list(r)}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.ranking not in RANKINGS:
            problems.append(f"ranking must be one of {list(RANKINGS)}, got {self.ranking!r}")
        if self.rounds < 1 or self.held_out_batches < 1:
            problems.append(f"rounds and held_out_batches must be >= 1, got {self.rounds}, {self.held_out_batches}")
        if not 0 < self.tolerance < 1:
            problems.append(f"tolerance must be in (0, 1), got {self.tolerance}")
        if problems:
            raise MTPruneInputError("pagcp: " + "; ".join(problems))

    @classmethod
    def of(cls, value: PAGCPSettings | Mapping[str, Any] | None) -> PAGCPSettings:
        """Settings from an instance, a mapping (unknown keys are an input error) or ``None`` (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise MTPruneInputError(f"pagcp: unknown settings {unknown}; known: {sorted(known)}")
        kw = {k: v for k, v in value.items() if v is not None or k == "theta0"}
        return cls(**kw)
