"""MFIS as a pymoo problem: boolean keep sets in, T + 2 objectives and one constraint out.

Reconstruction of Cheng et al. (Cognitive Computation 2021), METHODS.md §4; the objectives are in
:mod:`.objectives`. The constraint is the number of (layer, task) pairs the wiring rule leaves without a
slot (≤ 0 is feasible). A pre-specified pruning rate is kept by the operators, not by a constraint.
"""

from __future__ import annotations

import numpy as np
from pymoo.core.problem import Problem

from .encoding import decode
from .objectives import Landscape, evaluate

__all__ = ["MFISProblem"]


class MFISProblem(Problem):
    """Vectorised over the population (a loop of cheap numpy evaluations)."""

    def __init__(self, landscape: Landscape) -> None:
        self.landscape = landscape
        self.layout = landscape.layout()
        super().__init__(n_var=self.layout.n_var, n_obj=landscape.num_tasks + 2, n_ieq_constr=1, xl=0, xu=1,
                         vtype=bool)

    def _evaluate(self, X, out, *args, **kwargs):
        F = np.empty((len(X), self.n_obj))
        G = np.empty((len(X), 1))
        for i, x in enumerate(X):
            ev = evaluate(decode(x, self.layout), self.landscape)
            F[i], G[i, 0] = ev.objectives, ev.violation
        out["F"], out["G"] = F, G
