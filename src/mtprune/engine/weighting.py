"""Multi-task loss weighting: one small class per method behind one abstract base, and a registry.

Every method turns the per-task losses into one scalar, ``Σ_t w_t L_t + r``, where ``w`` is a weight
vector (which may carry gradients) and ``r`` an optional regulariser. A weighting is an ``nn.Module`` so
that its learnable parameters go into the optimizer and its state (parameters, loss history) into
``state_dict()`` for checkpoints and resume.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..utils.errors import MTPruneInputError


class Weighting(nn.Module, ABC):
    """Base class. Subclasses implement ``weight_vector()``; ``regulariser()`` defaults to 0."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise MTPruneInputError("loss weighting needs at least one task")
        self.tasks: list[str] = list(tasks)

    @abstractmethod
    def weight_vector(self) -> Tensor:
        """The weights ``[T]`` in the order of ``self.tasks`` (may require grad)."""

    def regulariser(self) -> Tensor | float:
        return 0.0

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """One scalar loss from ``{task: scalar loss}``; the keys must be exactly ``self.tasks``."""
        if set(losses) != set(self.tasks):
            raise MTPruneInputError(
                f"loss weighting expects losses for {sorted(self.tasks)}, got {sorted(losses)}"
            )
        stacked = torch.stack([losses[t].float().reshape(()) for t in self.tasks])
        weights = self.weight_vector().to(device=stacked.device, dtype=stacked.dtype)
        return (weights * stacked).sum() + self.regulariser()

    def weights(self) -> dict[str, float]:
        """The current weights by task, for logging."""
        return dict(zip(self.tasks, self.weight_vector().detach().double().cpu().tolist(), strict=True))

    def epoch_end(self, avg_losses: Mapping[str, float]) -> None:  # noqa: B027 - optional hook
        """Called once per epoch with each task's average (unweighted) training loss."""


class EqualWeighting(Weighting):
    """Σ_t L_t."""

    def weight_vector(self) -> Tensor:
        return torch.ones(len(self.tasks))


class FixedWeighting(Weighting):
    """Σ_t w_t L_t with user-given weights by task name."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(tasks)
        if set(weights) != set(self.tasks):
            raise MTPruneInputError(
                f"fixed weighting: 'weights' must name exactly the tasks {sorted(self.tasks)}, "
                f"got {sorted(weights)}"
            )
        self.register_buffer("fixed", torch.tensor([float(weights[t]) for t in self.tasks]))

    def weight_vector(self) -> Tensor:
        return self.fixed


class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty (Kendall, Gal & Cipolla, CVPR 2018): ``Σ_t exp(−s_t) L_t + s_t``.

    ``s_t = log σ_t²`` is learned; its parameters must be given to the optimizer.
    """

    def __init__(self, tasks: Sequence[str], init: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def weight_vector(self) -> Tensor:
        return torch.exp(-self.log_vars)

    def regulariser(self) -> Tensor:
        return self.log_vars.sum()


class DWAWeighting(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, MTAN).

    ``w_t = T · softmax_t(r_t / τ)`` with ``r_t = L_t(e−1) / L_t(e−2)`` from per-epoch average losses;
    equal weights (1) until two epochs have been seen.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise MTPruneInputError(f"dwa: 'temperature' must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("history", torch.ones(2, len(self.tasks), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def weight_vector(self) -> Tensor:
        if int(self.seen) < 2:
            return torch.ones(len(self.tasks))
        ratio = self.history[1] / self.history[0]
        return (len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)).float()

    def epoch_end(self, avg_losses: Mapping[str, float]) -> None:
        latest = torch.tensor([float(avg_losses[t]) for t in self.tasks], dtype=torch.float64)
        self.history.copy_(torch.stack([self.history[1], latest.to(self.history.device)]))
        self.seen += 1


WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWAWeighting,
}


def build_weighting(name: str, tasks: Sequence[str], **kwargs) -> Weighting:
    """``build_weighting("dwa", ["seg", "depth"], temperature=2.0)``; bad names or arguments are named."""
    if name not in WEIGHTINGS:
        raise MTPruneInputError(f"unknown loss weighting {name!r}; choose from {', '.join(WEIGHTINGS)}")
    cls = WEIGHTINGS[name]
    try:
        inspect.signature(cls).bind(list(tasks), **kwargs)
    except TypeError as err:
        raise MTPruneInputError(f"loss weighting {name!r}: {err}") from None
    return cls(list(tasks), **kwargs)
