"""The multi-task score Δm (Maninis et al., CVPR 2019; LibMTL ``count_improvement``).

Δm = (1/T) Σ_t (1/M_t) Σ_m s_m (N_tm − B_tm) / B_tm, in percent, with s_m = +1 when higher is better.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..utils.errors import MTPruneInputError
from .base import Task

Scores = Mapping[str, Mapping[str, float]]


def task_deltas(scores: Scores, reference: Scores, tasks: Mapping[str, Task]) -> dict[str, float]:
    """Each task's term of Δm, in percent: its mean signed relative change over its declared metrics."""
    out = {}
    for name, task in tasks.items():
        if name not in scores or name not in reference:
            raise MTPruneInputError(f"Δm: task {name!r} is missing from the scores or the reference")
        terms = []
        for metric, higher in task.metrics.items():
            base = reference[name][metric]
            if base == 0:
                raise MTPruneInputError(f"Δm: reference {name}/{metric} is 0, the relative change is undefined")
            sign = 1.0 if higher else -1.0
            terms.append(sign * (scores[name][metric] - base) / abs(base))
        out[name] = 100.0 * sum(terms) / len(terms)
    return out


def delta_m(scores: Scores, reference: Scores, tasks: Mapping[str, Task]) -> float:
    """Δm of ``scores`` against an explicit ``reference``, over each task's declared metrics."""
    per_task = task_deltas(scores, reference, tasks)
    return sum(per_task.values()) / len(per_task)


def delta_m_or_none(scores: Scores, reference: Scores | None, tasks: Mapping[str, Task]) -> float | None:
    """:func:`delta_m`, or ``None`` where it is undefined (no reference, or a reference metric of 0): for reports
    that show every row whether or not Δm can be computed."""
    if reference is None:
        return None
    try:
        return delta_m(scores, reference, tasks)
    except MTPruneInputError:
        return None
