"""Erdős–Rényi-Kernel (ERK) layer densities (Evci et al., ICML 2020, "Rigging the Lottery").

density_l = ε · (Σ of the weight's dimensions) / (Π of the dimensions), e.g. (c_out + c_in + k_h + k_w) /
(c_out · c_in · k_h · k_w) for a conv and (n_out + n_in) / (n_out · n_in) for a linear layer. ε is solved so
that Σ_l density_l · N_l equals the budget (1 − sparsity) · N exactly; layers that would exceed density 1, and
the layers asked to stay dense (the first conv, as in RigL and DiSparse dynamic), are dense and ε is solved
again for the rest.

``power`` raises the raw ratio to a power before ε is solved: density_l = ε · (Σ dims / Π dims)^power. The
released DiSparse code (``googleAI_ERK(..., erk_power_scale=0.9)`` in SHI-Labs/DiSparse-Multitask-Model-Compression
``dynamic_prune.py``) uses 0.9, which flattens the densities (small layers less dense, large ones denser); RigL's
ERK is power 1 (the default here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..utils.errors import MTPruneInputError


def erk_densities(shapes: Mapping[str, tuple[int, ...]], sparsity: float, dense: Iterable[str] = (),
                  power: float = 1.0) -> dict[str, float]:
    """Per-layer densities whose weighted sum is the budget: Σ density_l · N_l = (1 − sparsity) · Σ N_l; the raw
    ERK ratio is raised to ``power`` (0.9 in the released DiSparse code)."""
    if not 0 < sparsity < 1:
        raise MTPruneInputError(f"sparsity must be in (0, 1), got {sparsity}")
    if isinstance(power, bool) or not (isinstance(power, int | float) and 0 < power <= 2):
        raise MTPruneInputError(f"the ERK power must be in (0, 2], got {power!r}")
    numel = {p: math.prod(s) for p, s in shapes.items()}
    raw = {p: (sum(s) / math.prod(s)) ** power for p, s in shapes.items()}
    budget = (1 - sparsity) * sum(numel.values())
    dense = set(dense)
    unknown = dense - set(shapes)
    if unknown:
        raise MTPruneInputError(f"layers to keep dense are not maskable weights: {sorted(unknown)}")
    while True:
        rest = budget - sum(numel[p] for p in dense)
        sparse = [p for p in shapes if p not in dense]
        if rest <= 0 or not sparse:
            raise MTPruneInputError(f"sparsity {sparsity} leaves no budget for the sparse layers once "
                                    f"{sorted(dense)} are dense")
        eps = rest / sum(raw[p] * numel[p] for p in sparse)
        over = {p for p in sparse if eps * raw[p] > 1}
        if not over:
            return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}
        dense |= over


def erk_counts(shapes: Mapping[str, tuple[int, ...]], densities: Mapping[str, float]) -> dict[str, int]:
    """Active weights per layer: the densities rounded by largest remainder, so the total is the rounded budget."""
    numel = {p: math.prod(s) for p, s in shapes.items()}
    exact = {p: densities[p] * numel[p] for p in shapes}
    counts = {p: min(numel[p], math.floor(v)) for p, v in exact.items()}
    missing = round(sum(exact.values())) - sum(counts.values())
    for p in sorted(shapes, key=lambda p: exact[p] - counts[p], reverse=True):
        if missing <= 0:
            break
        if counts[p] < numel[p]:
            counts[p] += 1
            missing -= 1
    return counts


def random_masks(shapes: Mapping[str, tuple[int, ...]], counts: Mapping[str, int],
                 generator: torch.Generator) -> dict[str, Tensor]:
    """For each layer, exactly ``counts[p]`` active entries drawn uniformly at random."""
    out = {}
    for p, shape in shapes.items():
        n = math.prod(shape)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=generator)[:counts[p]]] = True
        out[p] = keep.reshape(shape)
    return out
