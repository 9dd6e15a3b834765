"""Mutual information between layer activations and task labels, by kernel density estimation.

PAM (He et al., KDD 2021, §3.2) measures how much a set of neurons X tells about a task's labels Y with
``I(X; Y) = H(X) - Σ_y p(y) H(X | Y = y)``, where every entropy is that of a mixture of Gaussians centred on
the samples (covariance ``noise_var · I``) and is bounded from above with the pairwise-distance estimator of
Kolchinsky & Tracey (Entropy 19(7), 2017, §4), using the KL divergence ``‖x_i - x_j‖² / (2 σ²)`` between
components:

    Ĥ(X) = d/2 + d/2 · log(2π σ²) - 1/N Σ_i log( 1/N Σ_j exp(-‖x_i - x_j‖² / 2σ²) ).

The constant terms cancel in the difference, so the estimate for one discrete label is

    Î(X; Y) = 1/N Σ_i [ LSE_{j: y_j = y_i}(-D_ij / 2σ²) - log N_{y_i} - LSE_j(-D_ij / 2σ²) + log N ],

with empirical class probabilities ``p(y) = N_y / N``. Multi-label targets (attributes) are handled as PAM
does: one binary label per attribute, and the estimates are summed. Values are in nats.

Everything is vectorised over *candidate sets*: squared distances add over dimensions, so the distances of
``R ∪ {j}`` for every candidate ``j`` are ``D_R + D_j`` and one batched log-sum-exp scores them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mtprune.utils.errors import MTPruneInputError

__all__ = ["LabelMasks", "label_masks", "mi_from_distances", "mutual_information", "pairwise_sq_dists"]

_CHUNK_ELEMENTS = 1 << 24  # at most this many [B, N, N] elements in flight


@dataclass(frozen=True)
class LabelMasks:
    """The same-label structure of one task's targets: one ``[N, N]`` mask per binary attribute (or one for a
    discrete label) and, per attribute, the size of each sample's class."""

    same: Tensor  # [A, N, N] bool: y_a[i] == y_a[j]
    log_counts: Tensor  # [A, N]: log N_{y_a[i]}

    @property
    def num_samples(self) -> int:
        return int(self.same.shape[-1])


def _as_label_columns(y: Tensor) -> Tensor:
    """Targets as ``[N, A]`` integer codes: a discrete label is one column, multi-label targets one per attribute."""
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    if y.dim() == 1:
        if y.dtype.is_floating_point:
            if not torch.equal(y, y.round()):
                raise MTPruneInputError("mutual information needs discrete targets; got non-integer values")
            y = y.round()
        return y.long()[:, None]
    if y.dim() == 2:
        if y.dtype.is_floating_point:  # attributes: {0, 1} probabilities or {-1, +1} signs
            return (y > (0.0 if bool((y < 0).any()) else 0.5)).long()
        return y.long()
    raise MTPruneInputError(f"targets must be [N] class indices or [N, A] attributes, got shape {tuple(y.shape)}")


def label_masks(y: Tensor, device: torch.device | None = None) -> LabelMasks:
    """Precompute the same-label masks of discrete ``[N]`` or multi-label ``[N, A]`` targets."""
    cols = _as_label_columns(y).to(device if device is not None else torch.device("cpu"))
    same = cols.T[:, :, None] == cols.T[:, None, :]  # [A, N, N]
    counts = same.sum(-1).to(torch.float32)
    return LabelMasks(same=same, log_counts=counts.log())


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """Per-dimension squared distances ``[d, N, N]`` of ``x`` ``[N, d]`` (sum over dim 0 for the full distance)."""
    if x.dim() != 2:
        raise MTPruneInputError(f"activations must be [N, d], got shape {tuple(x.shape)}")
    return (x.T[:, :, None] - x.T[:, None, :]).square()


def mi_from_distances(dists: Tensor, labels: LabelMasks, noise_var: float = 0.1) -> Tensor:
    """``Î(X; Y)`` for each of a batch of squared-distance matrices ``[B, N, N]`` (or one ``[N, N]``)."""
    if noise_var <= 0:
        raise MTPruneInputError(f"noise_var must be > 0, got {noise_var}")
    single = dists.dim() == 2
    d = dists[None] if single else dists
    n = d.shape[-1]
    if labels.num_samples != n:
        raise MTPruneInputError(f"{n} activation samples but {labels.num_samples} targets")
    same = labels.same.to(d.device)
    log_counts = labels.log_counts.to(device=d.device, dtype=d.dtype)
    step = max(1, _CHUNK_ELEMENTS // (n * n * (1 + same.shape[0])))
    out = []
    for start in range(0, d.shape[0], step):
        logits = d[start:start + step] * (-0.5 / noise_var)  # [b, N, N]
        marginal = torch.logsumexp(logits, -1) - math.log(n)  # [b, N]
        total = logits.new_zeros(logits.shape[0])
        for a in range(same.shape[0]):
            within = torch.logsumexp(logits.masked_fill(~same[a], float("-inf")), -1) - log_counts[a]
            total = total + (within - marginal).mean(-1)
        out.append(total)
    mi = torch.cat(out)
    return mi[0] if single else mi


def mutual_information(x: Tensor, y: Tensor, noise_var: float = 0.1) -> float:
    """KDE estimate of ``I(X; Y)`` in nats, with the Kolchinsky–Tracey upper bound on each mixture entropy.

    Args:
        x: activations ``[N, d]`` (pool conv maps first, e.g. a global max over H and W, as PAM does).
        y: ``[N]`` class indices, or ``[N, A]`` binary attributes ({0, 1} or ±1): the sum over attributes.
        noise_var: the variance of the Gaussian noise added to the activations (PAM: 0.1).
    """
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x[:, None]
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return float(mi_from_distances(pairwise_sq_dists(x).sum(0), label_masks(y, x.device), noise_var))
