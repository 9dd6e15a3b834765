"""``pam``: Pruning-Aware Merging of single-task networks (He, Gao, Zhou, Tong, Thiele, KDD 2021).

1. Run every network on one batch (``batch`` samples) and take each hidden layer's outputs after its
   activation, global-max-pooled over H and W for conv layers (``pooling="max"``) or, as in the authors' code,
   as flattened maps (``pooling="none"``).
2. Per layer, pool the neurons of all networks; per task find the irrelevant set R_t:
   ``relevance="alpha"`` (the paper): grow R_t greedily while its KDE mutual information stays at or below α
   (0.01 for conv layers, 0.05 for linear ones; noise variance 0.1);
   ``relevance="permutation"``: every neuron whose mutual information does not exceed its permutation null
   (:mod:`.relevance`; this test holds at any activation scale, the fixed α does not).
3. Partition into D (dropped), E_t (exclusive) and C (shared), and build the merged network.

Prune and retrain the result with any structured pruner (``mtprune.prune(merged, x, "taylor", ...)``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mtprune.utils.errors import MTPruneInputError

from .chain import Chain, check_same_architecture, read_chain
from .grouping import Partition, irrelevant_set, partition
from .merged_net import MergedNet, build_merged, settle
from .mutual_info import label_masks
from .relevance import neuron_distances, permutation_relevance

__all__ = ["LayerReport", "PAMReport", "collect_batch", "layer_activations", "pam"]


@dataclass
class LayerReport:
    """How one hidden layer was split (counts; the indices are in ``partition``)."""

    name: str
    kind: str  # "conv" | "linear"
    alpha: float | None  # None: the permutation test decided
    widths: dict[str, int]  # original width per network
    dropped: int
    shared: int
    exclusive: dict[str, int]
    irrelevant: dict[str, int]
    moved_to_dropped: int  # partitions that read nothing, dropped by ``settle``
    partition: Partition
    relevance: dict[str, dict[str, float | int]] = field(default_factory=dict)  # per task: MI against the null

    def to_dict(self, indices: bool = False) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("name", "kind", "alpha", "widths", "dropped", "shared", "exclusive",
                                              "irrelevant", "moved_to_dropped", "relevance")}
        if indices:
            out["partition"] = self.partition.to_dict()
        return out


@dataclass
class PAMReport:
    """What :func:`pam` did: per-layer partitions, settings and time."""

    tasks: list[str]
    layers: list[LayerReport]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def partitions(self) -> list[Partition]:
        return [layer.partition for layer in self.layers]

    def to_dict(self, indices: bool = False) -> dict[str, Any]:
        return {"tasks": self.tasks, "settings": self.settings, "seconds": self.seconds,
                "layers": [layer.to_dict(indices) for layer in self.layers]}

    def table(self) -> str:
        """A Markdown table of partition sizes per layer."""
        head = f"| layer | widths | D | C | {' | '.join(f'E_{t}' for t in self.tasks)} |"
        rule = "|" + "---|" * (4 + len(self.tasks))
        rows = [f"| {r.name} | {'+'.join(str(w) for w in r.widths.values())} | {r.dropped} | {r.shared} | "
                + " | ".join(str(r.exclusive[t]) for t in self.tasks) + " |" for r in self.layers]
        return "\n".join([head, rule, *rows])


def collect_batch(data: Any, tasks: Iterable[str], batch: int = 128, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """``batch`` samples ``(x, {task: target})`` from a dataset (a seeded random subset), a loader or iterable of
    batches (its first samples), or one ``(x, targets)`` batch."""
    tasks = list(tasks)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, targets = data
        x, targets = x[:batch], {k: v[:batch] for k, v in dict(targets).items()}
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data)
        if n == 0:
            raise MTPruneInputError("PAM needs samples: the dataset is empty")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch].tolist()
        items = [data[i] for i in order]
        x = torch.stack([it[0] for it in items])
        targets = {t: torch.stack([torch.as_tensor(it[1][t]) for it in items]) for t in items[0][1] if t in tasks}
    else:
        xs, ys, seen = [], [], 0
        for images, tgts in data:
            xs.append(images)
            ys.append(tgts)
            seen += len(images)
            if seen >= batch:
                break
        if not xs:
            raise MTPruneInputError("PAM needs samples: the data yielded no batch")
        x = torch.cat(xs)[:batch]
        targets = {t: torch.cat([y[t] for y in ys])[:batch] for t in ys[0] if t in tasks}
    missing = [t for t in tasks if t not in targets]
    if missing:
        raise MTPruneInputError(f"the data has no targets for task(s) {missing}; it has {sorted(targets)}")
    if len(x) < 2:
        raise MTPruneInputError(f"PAM needs at least 2 samples to estimate mutual information, got {len(x)}")
    return x, {t: targets[t] for t in tasks}


def layer_activations(chains: Mapping[str, Chain], x: Tensor, pooling: str = "max") -> list[Tensor]:
    """Per hidden layer, every network's neurons: ``[N, Σ_t width_t]`` with conv maps global-max-pooled
    (``pooling="max"``), or ``[N, Σ_t width_t, H·W]`` with the maps flattened (``"none"``; linear: ``H·W = 1``)."""
    if pooling not in ("max", "none"):
        raise MTPruneInputError(f"unknown pooling {pooling!r}; known: max, none")
    per_net = []
    with torch.no_grad():
        for chain in chains.values():
            acts, _ = chain.activations(x)
            if pooling == "max":
                per_net.append([a.amax(dim=(2, 3)) if a.dim() == 4 else a.flatten(1) for a in acts])
            else:
                per_net.append([a.flatten(2) if a.dim() == 4 else a.flatten(1)[:, :, None] for a in acts])
    return [torch.cat(layer, dim=1) for layer in zip(*per_net, strict=True)]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def pam(models: Mapping[str, nn.Module], data: Any, *, alpha_conv: float = 0.01, alpha_linear: float = 0.05,
        noise_var: float = 0.1, batch: int = 128, seed: int = 0, relevance: str = "alpha", pooling: str = "max",
        scale: str = "raw", permutations: int = 30, quantile: float = 0.95) -> tuple[MergedNet, PAMReport]:
    """Merge single-task chain networks with PAM (He et al., KDD 2021); returns ``(merged_model, report)``.

    Args:
        models: task name → a single-task network (a one-head ``MultiTaskModel`` or an ``nn.Sequential``
            chain); all of one architecture (widths may differ). They are left unchanged.
        data: samples ``(image, {task: target})``: a dataset, a loader, or one ``(x, targets)`` batch. Targets
            are class indices or multi-label attributes (mutual information is summed over attributes).
        alpha_conv, alpha_linear: the thresholds α (nats) of the irrelevant sets, for conv and linear layers.
        noise_var: the noise variance of the KDE (Kolchinsky & Tracey 2017 bound).
        batch: how many samples the mutual information is estimated on.
        seed: which samples of a dataset are drawn (and the permutations of the null).
        relevance: ``"alpha"`` (the paper's greedy thresholds) or ``"permutation"`` (per-neuron permutation test
            against a per-layer null, :mod:`.relevance`; ``alpha_*`` are then unused).
        pooling: ``"max"`` (global max over H and W) or ``"none"`` (flattened conv maps, the authors' code).
        scale: ``"raw"`` distances, or ``"unit"``: each neuron's distances divided by their mean (scale-free).
        permutations, quantile: the null of ``relevance="permutation"`` (label permutations, the quantile a
            neuron's mutual information must exceed).

    The merged model returns ``{task: output}``; ``merged(x, tasks=[...])`` runs only what those tasks need.
    """
    start = time.perf_counter()
    if not isinstance(models, Mapping) or len(models) < 2:
        raise MTPruneInputError("pam needs a mapping of at least two task names to single-task networks")
    tasks = list(models)
    if relevance not in ("alpha", "permutation"):
        raise MTPruneInputError(f"unknown relevance test {relevance!r}; known: alpha, permutation")
    device = _device_of(next(iter(models.values())))
    x, targets = collect_batch(data, tasks, batch, seed)
    x = x.to(device)
    modes = {t: m.training for t, m in models.items()}
    try:
        for m in models.values():
            m.eval()
        chains = {t: read_chain(t, m, x) for t, m in models.items()}
        check_same_architecture(chains)
        acts = layer_activations(chains, x, pooling)
    finally:
        for t, m in models.items():
            m.train(modes[t])
    masks = {t: label_masks(targets[t], device) for t in tasks}
    parts: list[Partition] = []
    alphas: list[float | None] = []
    tests: list[dict[str, dict[str, float | int]]] = []
    ref = chains[tasks[0]]
    for k, a in enumerate(acts):
        alpha = alpha_conv if ref.stages[k].kind == "conv" else alpha_linear
        dists = neuron_distances(a, scale)
        if relevance == "alpha":
            irrelevant = {t: irrelevant_set(None, masks[t], alpha, noise_var, dists=dists) for t in tasks}
            tests.append({})
        else:
            found = {t: permutation_relevance(dists, targets[t].to(device), permutations=permutations,
                                              quantile=quantile, noise_var=noise_var, seed=seed + 1000 * k)
                     for t in tasks}
            irrelevant = {t: (~r.relevant).nonzero().flatten().tolist() for t, r in found.items()}
            tests.append({t: r.summary() for t, r in found.items()})
            alpha = None
        del dists
        parts.append(partition(irrelevant, a.shape[1]))
        alphas.append(alpha)
    try:
        moved = settle(parts)
    except MTPruneInputError as err:
        spread = float(acts[-1].std(0).max())
        raise MTPruneInputError(f"{err}. The last hidden layer's activations vary by at most {spread:.3g} (std) "
                                f"against a KDE noise variance of {noise_var}: are the networks trained?") from None
    merged = build_merged(chains, parts)
    merged.train(any(modes.values()))
    merged.mtprune_input_shape = list(x.shape[1:])
    layers = []
    for k, part in enumerate(parts):
        layers.append(LayerReport(
            name=ref.stages[k].name, kind=ref.stages[k].kind, alpha=alphas[k],
            widths={t: chains[t].stages[k].width for t in tasks}, dropped=len(part.dropped),
            shared=len(part.shared), exclusive={t: len(part.exclusive[t]) for t in tasks},
            irrelevant={t: len(part.irrelevant[t]) for t in tasks}, moved_to_dropped=moved.get(k, 0),
            partition=part, relevance=tests[k]))
    settings = {"alpha_conv": alpha_conv, "alpha_linear": alpha_linear, "noise_var": noise_var,
                "batch": int(len(x)), "seed": seed, "relevance": relevance, "pooling": pooling, "scale": scale}
    if relevance == "permutation":
        settings.update(permutations=permutations, quantile=quantile)
    return merged, PAMReport(tasks, layers, settings, time.perf_counter() - start)


def merge_with_partitions(models: Mapping[str, nn.Module], partitions: list[Partition], example: Tensor
                          ) -> MergedNet:
    """Build the merged network from given partitions (one per hidden layer), e.g. to test a wiring."""
    chains = {t: read_chain(t, m, example) for t, m in models.items()}
    check_same_architecture(chains)
    settle(partitions)
    return build_merged(chains, partitions)
