"""MFIS by the accuracy budget (issue 16): the cheapest front point tried that meets the budget, not the knee."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from mtprune.merging.mfis.budget import budget_candidates, select_within_budget
from mtprune.merging.mfis.solve import ParetoFront, select_solution
from mtprune.utils.errors import MTPruneInputError


def _front() -> ParetoFront:
    # columns: loss a, loss b, MACs (fraction of no merging), dissimilarity; MACs deliberately out of order
    macs = np.array([0.9, 0.2, 0.5, 0.35, 0.7, 0.6])
    F = np.stack([1 - macs, 1 - macs, macs, np.zeros(6)], 1)
    return ParetoFront(np.zeros((6, 3)), F, ["loss_a", "loss_b", "macs", "dissimilarity"], 0.0, {}, [])


def _run(acc_of_macs, drop=2.0, candidates=6):
    front = _front()
    tuned: list[int] = []

    def build(i: int) -> nn.Module:
        net = nn.Linear(1, 1)
        net.macs = float(front.F[i, 2])
        return net

    def finetune(net: nn.Module, trial: int) -> None:
        tuned.append(trial)

    def score(net: nn.Module) -> dict[str, float]:
        return acc_of_macs(net.macs)

    return select_within_budget(front, build, score, finetune, {"a": 90.0, "b": 80.0}, drop, candidates), tuned


def test_candidates_are_the_front_sorted_by_macs():
    assert budget_candidates(_front(), 6) == [1, 3, 2, 5, 4, 0]
    assert budget_candidates(_front(), 2) == [2, 0]  # strata [0.2, 0.35, 0.5] and [0.6, 0.7, 0.9]: least loss
    with pytest.raises(MTPruneInputError, match="candidates"):
        budget_candidates(_front(), 0)


def test_each_stratum_offers_its_point_whose_worst_task_loses_least():
    # the dearest point (MACs 0.46) gives task a up; in its stratum, 0.44 keeps both tasks within 0.19
    F = np.array([[0.34, 0.34, 0.10, 0.0], [0.35, 0.12, 0.46, 0.2], [0.19, 0.19, 0.44, 0.1],
                  [0.30, 0.30, 0.12, 0.0], [0.19, 0.19, 0.45, 0.1], [0.40, 0.40, 0.08, 0.0]])
    front = ParetoFront(np.zeros((6, 3)), F, ["loss_a", "loss_b", "macs", "dissimilarity"], 0.0, {}, [])
    assert budget_candidates(front, 2) == [3, 2]  # strata [5, 0, 3] and [2, 4, 1]; ties go to the cheaper point


def test_the_cheapest_point_within_the_budget_is_chosen():
    choice, tuned = _run(lambda m: {"a": 80.0 + 20 * m, "b": 70.0 + 20 * m})  # needs MACs >= 0.5 for a and b
    assert choice.within_budget and choice.index == 2 and float(_front().F[choice.index, 2]) == 0.5
    assert tuned == [0, 1, 2]  # stopped at the first success, cheapest first
    assert [t["within_budget"] for t in choice.trials] == [False, False, True]


def test_without_a_point_in_budget_the_most_accurate_tried_is_kept():
    choice, tuned = _run(lambda m: {"a": 50.0 - 50 * (m - 0.7) ** 2, "b": 80.0})
    assert not choice.within_budget and len(choice.trials) == 6 and len(tuned) == 6
    best = max(choice.trials, key=lambda t: t["margin"])
    assert choice.index == best["index"] == 4  # MACs 0.7: the peak of the accuracy curve


def test_the_knee_selector_refuses_budget_outside_the_pipeline():
    with pytest.raises(MTPruneInputError, match="budget"):
        select_solution(_front(), "budget")
