"""What MFIS measures on the T task networks before the search: filter importance, index alignment and the
per-layer statistics of the objectives. Reconstruction of Cheng et al. (Cognitive Computation 2021),
METHODS.md §4; the choices below are ours and documented as such.

- **Importance** of filter f to task t, on task t's own original network: Taylor-FO (Molchanov et al., CVPR
  2019), ``(Σ_{w ∈ filter f} w · ∂L_t/∂w)²`` over the filter's weights and bias, averaged over mini-batches;
  or ``"l1"``, the L1 norm of the filter's weights (no data needed).
- **Alignment** (our addition, ``align="activations"``): independently trained networks number their
  filters arbitrarily, and MFIS can only share a slot between filters of the same index. Before the search,
  each network's filters are permuted, layer by layer, to match the first network's: the assignment that
  maximises the summed correlation of activations on the batch (Hungarian algorithm; the matching of Li et
  al., ICLR 2016, "Convergent learning", and Ainsworth et al., ICLR 2023, "Git Re-Basin"). A permutation
  changes no network's function. ``align="none"`` keeps the indices as trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError

from ..chain import Chain, Stage
from .objectives import Landscape, LayerStats, fidelity_table, merge_cost_table

__all__ = ["activation_alignment", "build_landscape", "default_loss", "filter_importance", "permute_chain"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def default_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for class indices; binary cross-entropy for float targets shaped like the output."""
    if target.is_floating_point() and target.shape == pred.shape:
        return F.binary_cross_entropy_with_logits(pred, target)
    return F.cross_entropy(pred, target.long(), ignore_index=-1)


def _forward(chain: Chain, x: Tensor) -> Tensor:
    for stage in chain.stages:
        x = stage.run(x)
    return x


def filter_importance(chain: Chain, x: Tensor, target: Tensor | None = None, *, method: str = "taylor",
                      loss: LossFn | None = None, batch_size: int = 32) -> list[np.ndarray]:
    """Per hidden layer, ``[F_l]`` importance of each filter to the chain's task (see the module docstring)."""
    hidden = chain.hidden
    if method == "l1":
        return [s.layer.weight.detach().abs().flatten(1).sum(1).double().cpu().numpy() for s in hidden]
    if method != "taylor":
        raise MTPruneInputError(f"unknown importance {method!r}; known: taylor, l1")
    if target is None:
        raise MTPruneInputError("Taylor-FO importance needs targets; pass data with targets or importance='l1'")
    loss = loss or default_loss
    params: list[Tensor] = []
    for s in hidden:
        params += [s.layer.weight] + ([s.layer.bias] if s.layer.bias is not None else [])
    sums = [torch.zeros(s.width, dtype=torch.float64, device=x.device) for s in hidden]
    batches = 0
    with torch.enable_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], target[start:start + batch_size]
            grads = iter(torch.autograd.grad(loss(_forward(chain, xb), yb), params, allow_unused=True))
            for k, s in enumerate(hidden):
                gw = next(grads)
                contrib = (s.layer.weight * (gw if gw is not None else 0.0)).flatten(1).sum(1)
                if s.layer.bias is not None:
                    gb = next(grads)
                    contrib = contrib + s.layer.bias * (gb if gb is not None else 0.0)
                sums[k] += contrib.detach().double() ** 2
            batches += 1
    return [(v / max(batches, 1)).cpu().numpy() for v in sums]


def _standardised(a: Tensor) -> Tensor:
    """``[N, F, ...]`` activations → ``[F, N·…]`` rows of zero mean and unit norm (constant rows stay 0)."""
    rows = a.transpose(0, 1).reshape(a.shape[1], -1).double()
    rows = rows - rows.mean(dim=1, keepdim=True)
    norm = rows.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, rows / norm.clamp_min(1e-30), torch.zeros_like(rows))


def activation_alignment(chains: Mapping[str, Chain], x: Tensor) -> tuple[dict[str, list[np.ndarray]],
                                                                          list[float]]:
    """Per task, per hidden layer, the permutation ``perm`` (slot i ← the task's filter ``perm[i]``) that
    matches its filters to the first task's; and per layer the mean matched correlation over the other tasks."""
    from scipy.optimize import linear_sum_assignment

    names = list(chains)
    with torch.no_grad():
        acts = {t: chains[t].activations(x)[0] for t in names}
    ref = acts[names[0]]
    perms = {names[0]: [np.arange(a.shape[1]) for a in ref]}
    quality = [0.0] * len(ref)
    for t in names[1:]:
        perms[t] = []
        for k, (a_ref, a_t) in enumerate(zip(ref, acts[t], strict=True)):
            corr = (_standardised(a_ref) @ _standardised(a_t).T).cpu().numpy()
            rows, cols = linear_sum_assignment(-corr)
            perm = cols[np.argsort(rows)]
            perms[t].append(perm)
            quality[k] += float(corr[np.arange(len(perm)), perm].mean()) / (len(names) - 1)
    return perms, quality


def _permute_bn(op: nn.Module, idx: Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        v = getattr(op, attr, None)
        if v is not None:
            v.data = v.data[idx].clone()


def permute_chain(chain: Chain, perms: Sequence[np.ndarray]) -> None:
    """Reorder the filters of every hidden layer in place (and the inputs of the layer after it): the
    chain computes exactly the same function."""
    if len(perms) != len(chain.hidden):
        raise MTPruneInputError(f"{len(perms)} permutations for {len(chain.hidden)} hidden layers")
    with torch.no_grad():
        for k, (stage, perm) in enumerate(zip(chain.hidden, perms, strict=True)):
            idx = torch.as_tensor(np.asarray(perm), dtype=torch.long, device=stage.layer.weight.device)
            if sorted(idx.tolist()) != list(range(stage.width)):
                raise MTPruneInputError(f"{stage.name}: not a permutation of {stage.width} filters")
            stage.layer.weight.data = stage.layer.weight.data[idx].clone()
            if stage.layer.bias is not None:
                stage.layer.bias.data = stage.layer.bias.data[idx].clone()
            for op in stage.post:
                if isinstance(op, nn.BatchNorm1d | nn.BatchNorm2d):
                    _permute_bn(op, idx)
            nxt = chain.stages[k + 1]
            m = nxt.in_per_channel
            cols = (idx[:, None] * m + torch.arange(m, device=idx.device)).flatten()
            nxt.layer.weight.data = nxt.layer.weight.data[:, cols].clone()


def _link_macs(chain: Chain, example: Tensor) -> tuple[list[int], int]:
    """Per stage, the MACs of one (filter, input channel) link per sample; and the first layer's fan-in."""
    links = []
    y = example[:1]
    with torch.no_grad():
        for k, stage in enumerate(chain.stages):
            z = y
            for op in stage.pre:
                z = op(z)
            out = stage.layer(z)
            if isinstance(stage.layer, nn.Conv2d):
                kh, kw = stage.layer.kernel_size
                links.append(int(out[0, 0].numel()) * kh * kw)
            else:
                links.append(1 if k == 0 else stage.in_per_channel)
            for op in stage.post:
                out = op(out)
            y = out
    first = chain.stages[0].layer
    fan_in = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    return links, int(fan_in)


def _input_mass(stage: Stage, width_prev: int) -> np.ndarray:
    w = stage.layer.weight.detach().abs().double()
    if isinstance(stage.layer, nn.Conv2d):
        return w.sum(dim=(2, 3)).cpu().numpy()
    return w.reshape(w.shape[0], width_prev, -1).sum(dim=2).cpu().numpy()


def build_landscape(chains: Mapping[str, Chain], importance: Mapping[str, Sequence[np.ndarray]],
                    example: Tensor) -> Landscape:
    """The statistics of the objectives, from aligned chains of one architecture and equal widths."""
    names = list(chains)
    ref = chains[names[0]]
    for t in names[1:]:
        widths = [s.width for s in chains[t].hidden]
        if widths != [s.width for s in ref.hidden]:
            raise MTPruneInputError(f"MFIS shares filter indices, so the networks need equal widths; "
                                    f"{names[0]!r} has {[s.width for s in ref.hidden]}, {t!r} has {widths}")
    links, fan_in = _link_macs(ref, example)
    layers = []
    for k, stage in enumerate(ref.hidden):
        filters = np.stack([chains[t].stages[k].layer.weight.detach().flatten(1).double().cpu().numpy()
                            for t in names])
        mass = None if k == 0 else np.stack([_input_mass(chains[t].stages[k], ref.stages[k - 1].width)
                                             for t in names])
        imp = np.stack([np.asarray(importance[t][k], dtype=np.float64) for t in names])
        layers.append(LayerStats(stage.name, stage.width, links[k], imp, merge_cost_table(filters), mass,
                                 fan_in if k == 0 else 0, fidelity_table(filters)))
    heads = np.array([chains[t].stages[-1].width for t in names])
    return Landscape(tuple(names), layers, heads, links[-1])
