"""Which neurons are relevant to a task, by a test that holds at any activation scale (PAM, He et al., KDD 2021).

PAM's fixed thresholds (α = 0.01 nats for conv, 0.05 for linear layers) sit below the noise floor of the KDE
estimate of :mod:`.mutual_info`: for labels independent of the activations the estimate is not 0 but grows with
the activation scale (about 0.12 nats for a 10-class label at scale 1, 0.37 at scale 3, N = 128, σ² = 0.1), so
every neuron of a trained network looks relevant to every task. Two changes make the decision scale-free:

- **distances per neuron** ``D_j`` (``[n, N, N]``) are taken over the neuron's pooled value or, unpooled as in
  the authors' code (``rdnet``), over its whole flattened map; with ``scale="unit"`` every ``D_j`` is divided by
  its mean, so the estimate no longer depends on the neuron's scale or on its map size;
- **a permutation null per layer**: the labels are permuted ``permutations`` times (one set of permutations for
  the whole layer, seeded), ``Î(X_j; Y_π)`` is computed for every neuron, and neuron j is *relevant* to the
  task when ``Î(X_j; Y) > quantile_q(Î(X_j; Y_π))``: its own threshold, calibrated on its own scale.

The irrelevant set R_t is then every neuron that is not relevant to t, and D, E_t and C follow as in PAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtprune.utils.errors import MTPruneInputError

from .mutual_info import label_masks, mi_from_distances

__all__ = ["LayerRelevance", "neuron_distances", "permutation_relevance"]


def neuron_distances(acts: Tensor, scale: str = "raw") -> Tensor:
    """Squared distances ``[n, N, N]`` between samples, per neuron, from ``[N, n]`` values or ``[N, n, m]`` maps.

    ``scale="unit"`` divides each neuron's distances by their mean over sample pairs (a neuron constant on the
    batch keeps all-zero distances)."""
    if scale not in ("raw", "unit"):
        raise MTPruneInputError(f"unknown distance scale {scale!r}; known: raw, unit")
    if acts.dim() == 2:
        acts = acts[:, :, None]
    if acts.dim() != 3:
        raise MTPruneInputError(f"activations must be [N, n] or [N, n, m], got shape {tuple(acts.shape)}")
    x = acts.detach().transpose(0, 1)  # [n, N, m]
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.shape[-1] == 1:  # exact: a neuron constant on the batch has all-zero distances
        d = (x[:, :, None, 0] - x[:, None, :, 0]).square()
    else:
        x = x - x.mean(1, keepdim=True)  # smaller rounding error; a constant map becomes exactly 0
        sq = x.square().sum(-1)
        d = (sq[:, :, None] + sq[:, None, :] - 2.0 * x @ x.transpose(1, 2)).clamp_min_(0.0)
        d.diagonal(dim1=1, dim2=2).zero_()
    if scale == "unit":
        n = d.shape[-1]
        mean = d.sum((1, 2)) / max(n * (n - 1), 1)
        d = torch.where(mean[:, None, None] > 0, d / mean.clamp_min(1e-30)[:, None, None], d)
    return d


@dataclass
class LayerRelevance:
    """One task at one layer: each neuron's MI estimate, its null threshold, and whether it is relevant."""

    mi: Tensor  # [n] Î(X_j; Y)
    threshold: Tensor  # [n] the null quantile of Î(X_j; Y_π)
    relevant: Tensor  # [n] bool

    def summary(self) -> dict[str, float | int]:
        """Medians of MI and null threshold over the layer's neurons, and how many neurons are relevant."""
        return {"mi_median": float(self.mi.median()), "null_median": float(self.threshold.median()),
                "mi_max": float(self.mi.max()), "null_max": float(self.threshold.max()),
                "relevant": int(self.relevant.sum()), "neurons": int(self.mi.numel())}


def permutation_relevance(dists: Tensor, targets: Tensor, *, permutations: int = 30, quantile: float = 0.95,
                          noise_var: float = 0.1, seed: int = 0) -> LayerRelevance:
    """Per-neuron permutation test of ``Î(X_j; Y) > quantile(Î(X_j; Y_π))`` (see the module docstring).

    Args:
        dists: ``[n, N, N]`` per-neuron squared distances (:func:`neuron_distances`).
        targets: ``[N]`` class indices or ``[N, A]`` attributes; permuted along the samples (attributes together).
        permutations: how many label permutations form the null.
        quantile: the null quantile a neuron must exceed to be relevant (1.0: the null's maximum).
        noise_var: the KDE noise variance.
        seed: the permutations' seed.
    """
    if permutations < 1:
        raise MTPruneInputError(f"permutations must be >= 1, got {permutations}")
    if not 0.0 < quantile <= 1.0:
        raise MTPruneInputError(f"quantile must be in (0, 1], got {quantile}")
    n = dists.shape[-1]
    if len(targets) != n:
        raise MTPruneInputError(f"{n} activation samples but {len(targets)} targets")
    mi = mi_from_distances(dists, label_masks(targets, dists.device), noise_var)
    gen = torch.Generator().manual_seed(seed)
    null = torch.stack([mi_from_distances(dists, label_masks(targets[torch.randperm(n, generator=gen)],
                                                             dists.device), noise_var)
                        for _ in range(permutations)])  # [P, n]
    threshold = torch.quantile(null.double(), quantile, dim=0).to(mi.dtype)
    return LayerRelevance(mi=mi, threshold=threshold, relevant=mi > threshold)
