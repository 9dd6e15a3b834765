"""PAGCP: performance-aware global channel pruning as a budget allocator.

Ye, Zhang, Chen, Fan, Wang: "Performance-aware Approximation of Global Channel Pruning for Multitask CNNs",
TPAMI 2023 (arXiv 2303.11923); METHODS.md §5. Not a better filter score: a layer-by-layer allocation of the
pruning budget under a constraint on **every task's** loss, on top of any registered criterion.

One round:

1. The candidate groups (scored by the criterion, with room above ``min_channels``) are ordered by the MACs
   saved when ``probe_ratio`` of their channels (the lowest-scoring ones) is removed, largest first.
2. In that order, on the model with every earlier group of the round masked at its kept ratio, group ``i`` is
   masked at the trial ratios (0.05 … 0.95): its lowest-scoring channels are zeroed at the output of its gates
   (forward hooks; no surgery, weights untouched), and every task's mean loss is measured on a fixed held-out
   set of batches. The search stops at the first ratio where some task's loss ratio (masked / the reference,
   i.e. the same model without group ``i``'s mask) exceeds ``1 + θ_i`` and keeps the previous ratio (0 when the
   first ratio already violates).
3. ``θ_i = θ_0 λ^i``, with λ solved so that ``Π_i (1 + θ_i) = budget``: in a round, each task's loss may grow by
   at most the factor ``budget``.
4. The top-``P`` fraction of the groups that kept a nonzero ratio, by Δloss / ΔMACs (lowest first), are pruned
   physically (:meth:`PruningGraph.prune`); an optional callback fine-tunes between rounds. Rounds repeat
   ``rounds`` times or until ``target_macs`` is reached; the round that would overshoot removes only a
   prefix of its planned channels (spread in proportion across its groups, lowest scores first), the one that
   lands the MACs closest to the target.

Our choices where the paper is silent:

- Δloss of a group is the largest relative loss increase over the tasks, ``max_t (ratio_t - 1)``, at its kept
  ratio (the worst-hit task, as in the constraint); ΔMACs is what the group alone saves at that ratio.
- ``theta0=None`` (default) takes half the uniform per-layer allowance, ``(budget^(1/n) - 1) / 2``, so the
  thresholds grow along the order (λ > 1). With a single candidate group, ``θ_0 = budget - 1``.
- The greedy bound ``Π(1 + θ_i)`` holds for the whole masked sequence; the top-P subset is checked again
  (masked, against the round's start): while some task exceeds ``budget``, the selected group with the
  largest Δloss / ΔMACs is dropped.
- Scores are computed once per round, on the model physically pruned so far.
- Masking after the gate (the producer's norm, else the producer) equals removal when the activation maps 0
  to 0 (ReLU family) and the channel is not read before its gate; otherwise (e.g. GroupNorm statistics) the
  trial approximates the removal.
- MACs are computed analytically (:class:`MacsModel`): each conv/linear layer's MACs measured once per round by
  ``mtprune.measure.layer_macs``, scaled by the kept fraction of its output and input channels (depthwise
  convs by the output fraction only). This is exact for the conv/linear MACs mtprune counts; each round's
  estimate is recorded next to the measured value.

What trials cache (so that a trial is cheap):

- the held-out batches: drawn once, moved to the device once, reused by every trial of every round;
- upstream activations: the reference forward of each probed group (needed anyway) records the outputs of
  the outermost module calls that finish before the first of the group's gates starts; in the trials those
  calls return a copy of the recorded output instead of recomputing (their inputs cannot depend on the masked
  channels). Probing a group deep in the network thus skips the stem and the earlier blocks. Recorded and
  replayed outputs are copies, so in-place operations downstream cannot corrupt the cache;
- repeated widths: a trial ratio that removes as many channels as the previous one is not re-evaluated;
- MACs from :class:`MacsModel`: no surgery and no re-tracing per trial.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.batch import unpack_batch
from ..engine.checkpoint import load_model_state
from ..measure import layer_macs
from ..utils.atomic import atomic_write_json
from ..utils.errors import MTPruneInputError
from ..utils.runtime import eval_mode
from .criteria import Criterion, get_criterion
from .graph import ChannelGroup, PruningGraph

Plan = dict[int, list[int]]
Losses = dict[str, float]
DEFAULT_RATIOS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))

__all__ = [
    "DEFAULT_RATIOS", "LayerProbe", "LossProbe", "MacsModel", "PAGCPReport", "PAGCPSettings", "RatioSearch",
    "RoundRecord", "UpstreamCache", "fit_to_target", "loss_ratios", "masked", "pagcp", "pagcp_markdown",
    "pagcp_schedule", "probe_round", "prune_pagcp", "search_ratio", "select_top", "solve_lambda", "theta_schedule",
]


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class PAGCPSettings:
    """PAGCP's knobs (Ye et al. 2023); ``budget`` is the per-round product ``Π(1 + θ_i)``, a loss factor > 1."""

    theta0: float | None = None  # None: half the uniform per-layer allowance (θ grows along the order)
    budget: float = 1.1
    probe_ratio: float = 0.3
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    top_p: float = 0.5
    rounds: int = 5
    held_out_batches: int = 4
    tolerance: float = 0.02  # MACs target: relative window around target_macs
    cache: bool = True  # replay upstream activations in trials

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


# ---------------------------------------------------------------- θ schedule
def _softplus(z: float) -> float:
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def solve_lambda(theta0: float, n_layers: int, budget: float) -> float:
    """λ > 0 with ``Π_{i<n} (1 + θ0 λ^i) = budget`` (Ye et al. 2023): bisection on log λ, then Newton.

    A solution exists iff ``n_layers >= 2`` and ``1 + theta0 < budget``; otherwise ``ValueError``.
    """
    if n_layers < 2:
        raise ValueError(f"λ is free with fewer than 2 layers (got {n_layers}): use theta_schedule")
    if not (theta0 > 0 and budget > 1 and 1 + theta0 < budget):
        raise ValueError(f"need 0 < theta0 and 1 + theta0 < budget, got theta0={theta0}, budget={budget}")
    goal, log_t = math.log(budget), math.log(theta0)

    def f(mu: float) -> float:  # Σ log(1 + θ0 e^{iμ}) - log(budget), increasing in μ = log λ
        return sum(_softplus(log_t + i * mu) for i in range(n_layers)) - goal

    lo, hi = -1.0, 1.0
    while f(lo) > 0:
        lo *= 2
    while f(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(mid)):
            break
    mu = (lo + hi) / 2
    for _ in range(3):  # Newton polish: f'(μ) = Σ i·σ(log θ0 + iμ)
        slope = sum(i / (1 + math.exp(-(log_t + i * mu))) for i in range(1, n_layers))
        if slope <= 0:
            break
        mu -= f(mu) / slope
    return math.exp(mu)


def theta_schedule(theta0: float | None, n_layers: int, budget: float) -> tuple[list[float], float]:
    """``([θ_0 … θ_{n-1}], λ)`` with ``θ_i = θ0 λ^i`` and ``Π(1 + θ_i) = budget``.

    ``theta0=None`` takes half the uniform allowance ``budget^(1/n) - 1``; one layer gets ``budget - 1``.
    """
    if n_layers <= 0:
        return [], 1.0
    if n_layers == 1:
        return [budget - 1.0], 1.0
    t0 = (budget ** (1.0 / n_layers) - 1.0) / 2 if theta0 is None else float(theta0)
    lam = solve_lambda(t0, n_layers, budget)
    return [t0 * lam**i for i in range(n_layers)], lam


# ---------------------------------------------------------------- the stopping rule
@dataclass
class RatioSearch:
    """The outcome of one group's ratio search."""

    ratio: float  # the kept trial ratio (0.0 when the first ratio already violates)
    removed: int  # channels removed at that ratio
    losses: Losses  # task losses at the kept ratio (the reference when nothing is kept)
    trials: list[dict[str, Any]] = field(default_factory=list)  # evaluated trials: ratio, removed, loss_ratio
    stopped: str = "end"  # "violation", "min_channels" (the next ratio leaves too few channels) or "end"


def loss_ratios(losses: Mapping[str, float], reference: Mapping[str, float]) -> Losses:
    return {t: losses[t] / reference[t] for t in reference}


def search_ratio(ratios: Sequence[float], channels: int, cap: int, trial: Callable[[int], Losses],
                 reference: Mapping[str, float], bound: float) -> RatioSearch:
    """Ye et al. 2023's stopping rule: try ``ratios`` in order; stop at the first one where some task's loss
    ratio ``trial(k)[t] / reference[t]`` exceeds ``bound`` (= 1 + θ_i) and keep the previous one.

    ``k = floor(ratio · channels)`` channels are removed; a ratio needing more than ``cap`` stops the search;
    a ratio removing as many channels as the previous one is not re-evaluated.
    """
    kept = RatioSearch(0.0, 0, dict(reference))
    last_k, last = 0, dict(reference)
    for r in ratios:
        k = math.floor(r * channels + 1e-9)
        if k > cap:
            kept.stopped = "min_channels"
            break
        if k != last_k:
            last = trial(k)
            kept.trials.append({"ratio": r, "removed": k, "loss_ratio": loss_ratios(last, reference)})
            last_k = k
        if any(v > bound for v in loss_ratios(last, reference).values()):
            kept.stopped = "violation"
            break
        kept.ratio, kept.removed, kept.losses = r, k, last
    return kept


# ---------------------------------------------------------------- MACs without surgery
def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups == module.in_channels == \
        module.out_channels


class MacsModel:
    """Per-sample conv/linear MACs of the model after removing channels, computed without surgery.

    Each layer's MACs (``mtprune.measure.layer_macs``, measured once) are scaled by the kept fraction of its
    output channels (as a producer) and of its input channels (as a consumer); a depthwise conv by its output
    fraction only. Exact for the MACs mtprune counts: spatial sizes do not change when channels are removed.
    """

    def __init__(self, model: nn.Module, example_inputs: Tensor) -> None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.base, _ = layer_macs(model, example_inputs[:1])
        finally:
            model.train(was)
        modules = dict(model.named_modules())
        self.layers = {n: modules[n] for n in self.base}
        self.total = sum(self.base.values())

    def after(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> int:
        """MACs once ``plan`` (group index → channels to remove) is applied."""
        out_rm: dict[str, set[int]] = {}
        in_rm: dict[str, set[int]] = {}
        for gi, idxs in plan.items():
            g, drop = groups[gi], set(idxs)
            for name in g.producers:
                m = g.out_maps[name]
                out_rm.setdefault(name, set()).update(lc for r, lc in zip(m.root, m.local, strict=True) if r in drop)
            for name in g.consumers:
                m = g.in_maps[name]
                in_rm.setdefault(name, set()).update(lc for r, lc in zip(m.root, m.local, strict=True) if r in drop)
        total = 0.0
        for name, macs in self.base.items():
            if name not in out_rm and name not in in_rm:
                total += macs
                continue
            module = self.layers[name]
            cin, cout = _widths(module)
            keep_out = 1 - len(out_rm.get(name, ())) / cout
            keep_in = 1.0 if _is_depthwise(module) else 1 - len(in_rm.get(name, ())) / cin
            total += macs * keep_out * keep_in
        return round(total)

    def saved(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> int:
        return self.total - self.after(groups, plan)


# ---------------------------------------------------------------- masks and the upstream cache
def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear | nn.LayerNorm) else 1


def _gate_channels(groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> dict[str, list[int]]:
    zero: dict[str, set[int]] = {}
    for gi, idxs in plan.items():
        g, drop = groups[gi], set(idxs)
        for gate in g.gates:
            m = g.out_maps[gate]
            zero.setdefault(gate, set()).update(lc for r, lc in zip(m.root, m.local, strict=True) if r in drop)
    return {n: sorted(c) for n, c in zero.items() if c}


@contextmanager
def masked(model: nn.Module, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> Iterator[None]:
    """Zero the planned channels at the output of their groups' gates (forward hooks; weights untouched)."""
    modules = dict(model.named_modules())
    handles = []

    def hook_for(idx: list[int], dim: int):
        cache: dict[torch.device, Tensor] = {}

        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if not isinstance(out, Tensor):
                return out
            index = cache.get(out.device)
            if index is None:
                index = cache[out.device] = torch.tensor(idx, device=out.device)
            return out.index_fill(dim % out.dim(), index, 0)

        return hook

    try:
        for name, idx in _gate_channels(groups, plan).items():
            module = modules[name]
            handles.append(module.register_forward_hook(hook_for(idx, _channel_dim(module))))
        yield
    finally:
        for h in handles:
            h.remove()


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_copy(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


Store = dict[str, dict[int, Any]]  # module name → {call index within one forward: recorded output}


class UpstreamCache:
    """Record, in one forward, the outputs of the outermost module calls that finish before any of a set of
    modules starts; replay them in later forwards instead of recomputing.

    A call that ends before the first probed gate starts cannot depend on the gate's mask, so its output is the
    same in every trial of that gate. Calls are keyed by (module, call index), so a module called several times
    in a forward (a shared ReLU) is replayed only for the calls that were recorded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = {n: m for n, m in model.named_modules() if n}

    @contextmanager
    def recording(self, stop_at: set[str]) -> Iterator[Store]:
        store: Store = {}
        counts: dict[str, int] = {}
        open_calls: list[tuple[str, int]] = []
        frames: list[list[tuple[str, int, Any]]] = [[]]  # per open call: its completed child calls
        hit = [False]

        def pre(name: str):
            def hook(module: nn.Module, args: Any) -> None:
                if hit[0]:
                    return
                if name in stop_at:
                    hit[0] = True
                    for frame in frames:
                        for n, i, out in frame:
                            store.setdefault(n, {})[i] = out
                    return
                idx = counts.get(name, 0)
                counts[name] = idx + 1
                open_calls.append((name, idx))
                frames.append([])

            return hook

        def post(name: str):
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if hit[0] or not open_calls or open_calls[-1][0] != name:
                    return
                _, idx = open_calls.pop()
                frames.pop()  # the children are subsumed by this call
                frames[-1].append((name, idx, _copy(out)))

            return hook

        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(pre(name), prepend=True))
                handles.append(module.register_forward_hook(post(name), prepend=True))
            yield store
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self, store: Store) -> Iterator[None]:
        patched: list[tuple[nn.Module, Any]] = []

        def replay(outs: dict[int, Any], forward: Callable) -> Callable:
            calls = [0]

            def fn(*args: Any, **kwargs: Any) -> Any:
                i = calls[0]
                calls[0] += 1
                return _copy(outs[i]) if i in outs else forward(*args, **kwargs)

            return fn

        try:
            for name, outs in store.items():
                module = self.modules[name]
                own = module.__dict__.get("forward")
                module.forward = replay(outs, own if own is not None else module.forward)
                patched.append((module, own))
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own


# ---------------------------------------------------------------- losses on the held-out set
class LossProbe:
    """Each task's mean loss on fixed held-out batches under channel masks (eval mode, no_grad; every module's
    ``training`` flag is restored afterwards, so BatchNorm statistics never move).

    The batches are taken once (the first ``held_out_batches`` of ``data``) and kept on the model's device.
    """

    def __init__(self, model: nn.Module, data: Iterable, losses: Mapping[str, Callable], batches: int,
                 cache: bool = True) -> None:
        self.model = model
        self.losses = {t: getattr(fn, "loss", fn) for t, fn in losses.items()}
        device = next(model.parameters()).device
        self.batches: list[tuple[Tensor, dict[str, Tensor]]] = []
        for i, batch in enumerate(data):
            if i >= batches:
                break
            self.batches.append(unpack_batch(batch, list(self.losses), device))
        if not self.batches:
            raise MTPruneInputError("pagcp: the held-out data is empty")
        self.cache = UpstreamCache(model) if cache else None
        self.forwards = 0

    def refresh(self) -> None:
        """Re-read the model's modules (after physical pruning or fine-tuning)."""
        if self.cache is not None:
            self.cache = UpstreamCache(self.model)

    def _run(self, images: Tensor, targets: Mapping[str, Tensor], sums: dict[str, float]) -> None:
        out = self.model(images)
        if not isinstance(out, Mapping):
            raise MTPruneInputError(f"the model must return dict[str, Tensor], got {type(out).__name__}")
        missing = sorted(set(self.losses) - set(out))
        if missing:
            raise MTPruneInputError(f"losses given for tasks the model does not output: {missing}")
        n = images.shape[0]
        for t, fn in self.losses.items():
            value = float(fn(out[t].float(), targets[t]))
            sums[t] += (value if math.isfinite(value) else math.inf) * n
        self.forwards += 1

    def losses_under(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]],
                     stores: list[Store] | None = None) -> Losses:
        """Mean task losses with ``plan`` masked; ``stores`` (from :meth:`reference`) replays upstream calls."""
        sums = dict.fromkeys(self.losses, 0.0)
        count = 0
        with torch.no_grad(), eval_mode(self.model), masked(self.model, groups, plan):
            for b, (images, targets) in enumerate(self.batches):
                if stores is not None and self.cache is not None and stores[b]:
                    with self.cache.replaying(stores[b]):
                        self._run(images, targets, sums)
                else:
                    self._run(images, targets, sums)
                count += images.shape[0]
        return {t: s / count for t, s in sums.items()}

    def reference(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]],
                  stop_at: set[str]) -> tuple[Losses, list[Store] | None]:
        """Losses with ``plan`` masked, recording (when caching) what finishes before ``stop_at`` starts."""
        if self.cache is None:
            return self.losses_under(groups, plan), None
        sums = dict.fromkeys(self.losses, 0.0)
        count, stores = 0, []
        with torch.no_grad(), eval_mode(self.model), masked(self.model, groups, plan):
            for images, targets in self.batches:
                with self.cache.recording(stop_at) as store:
                    self._run(images, targets, sums)
                stores.append(store)
                count += images.shape[0]
        return {t: s / count for t, s in sums.items()}, stores


def _check_reference(losses: Losses) -> None:
    bad = {t: v for t, v in losses.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise MTPruneInputError(f"pagcp constrains loss ratios: every task's held-out loss must be finite and > 0, "
                                f"got {bad}")


# ---------------------------------------------------------------- one round
@dataclass
class LayerProbe:
    """One group's probe in a round (Ye et al. 2023, sequential greedy step)."""

    root: str
    part: str
    channels: int
    order: int  # position in the round's order (by MACs saved at probe_ratio)
    probe_macs_saved: int
    theta: float
    ratio: float  # kept trial ratio
    removed: int  # channels removed at that ratio (before top-P selection and target fitting)
    loss_ratio: Losses  # per task, at the kept ratio, against the group's reference
    delta_loss: float  # max_t (loss_ratio_t - 1)
    delta_macs: int  # MACs this group alone saves at its kept ratio
    trials: int
    stopped: str
    selected: bool = False
    index: int = field(default=-1, repr=False)  # group index in the round's graph
    order_of_removal: list[int] = field(default_factory=list, repr=False)  # channels, lowest score first

    @property
    def efficiency(self) -> float:
        """Δloss / ΔMACs: the loss paid per MAC saved (lower is better)."""
        return self.delta_loss / max(self.delta_macs, 1)


def _order(graph: PruningGraph, scores: Mapping[int, Tensor], macs: MacsModel, probe_ratio: float,
           min_channels: int) -> list[tuple[ChannelGroup, list[int], int]]:
    """Candidate groups, their channels by ascending score, and MACs saved at ``probe_ratio``; largest first."""
    out = []
    for g in graph.groups:
        if g.index not in scores or g.channels - min_channels < 1:
            continue
        lowest = torch.argsort(scores[g.index], stable=True).tolist()
        k = max(1, math.floor(probe_ratio * g.channels + 1e-9))
        out.append((g, lowest, macs.saved(graph.groups, {g.index: lowest[:k]})))
    return sorted(out, key=lambda item: (-item[2], item[0].index))


def probe_round(graph: PruningGraph, scores: Mapping[int, Tensor], probe: LossProbe, macs: MacsModel,
                settings: PAGCPSettings, min_channels: int) -> tuple[list[LayerProbe], Losses, float]:
    """Steps 1–3 of a round (Ye et al. 2023): order, then masked ratio search group by group on the model with
    the earlier groups' masks. Only masks are used: the model's weights are not modified.

    Returns the per-group probes, the round's reference losses (no mask) and λ.
    """
    order = _order(graph, scores, macs, settings.probe_ratio, min_channels)
    thetas, lam = theta_schedule(settings.theta0, len(order), settings.budget)
    so_far: Plan = {}
    records: list[LayerProbe] = []
    start: Losses | None = None
    kept: Losses | None = None  # the losses of the model with the masks so far, from the previous search
    for i, (g, lowest, probe_saved) in enumerate(order):
        if probe.cache is None and kept is not None:
            reference, stores = kept, None  # nothing to record: the previous search measured this model
        else:
            reference, stores = probe.reference(graph.groups, so_far, set(g.gates))
        _check_reference(reference)
        start = start or reference

        def trial(k: int, g: ChannelGroup = g, lowest: list[int] = lowest, stores=stores) -> Losses:
            return probe.losses_under(graph.groups, {**so_far, g.index: lowest[:k]}, stores)

        found = search_ratio(settings.ratios, g.channels, g.channels - min_channels, trial, reference,
                             1 + thetas[i])
        if found.removed:
            so_far[g.index] = lowest[:found.removed]
        kept = found.losses
        ratios = loss_ratios(found.losses, reference)
        records.append(LayerProbe(
            root=g.root, part=g.part, channels=g.channels, order=i, probe_macs_saved=probe_saved, theta=thetas[i],
            ratio=found.ratio, removed=found.removed, loss_ratio=ratios,
            delta_loss=max(v - 1 for v in ratios.values()),
            delta_macs=macs.saved(graph.groups, {g.index: lowest[:found.removed]}), trials=len(found.trials),
            stopped=found.stopped, index=g.index, order_of_removal=lowest))
    if start is None:
        start, _ = probe.reference(graph.groups, {}, set())
        _check_reference(start)
    return records, start, lam


def select_top(records: Sequence[LayerProbe], top_p: float) -> list[LayerProbe]:
    """The top-P fraction (rounded up) of the groups with a nonzero ratio, by Δloss/ΔMACs, lowest first."""
    pruned = [r for r in records if r.removed > 0]
    keep = math.ceil(top_p * len(pruned))
    return sorted(pruned, key=lambda r: (r.efficiency, -r.delta_macs, r.order))[:keep]


def fit_to_target(groups: Sequence[ChannelGroup], plan: Mapping[int, list[int]], macs: MacsModel,
                  goal: float) -> Plan:
    """The prefix of ``plan`` (each list ordered lowest score first) whose MACs land closest to ``goal``.

    Removals are interleaved in proportion across the groups (the j-th of k channels at ``j / k``), so a
    prefix scales every group's ratio down by about the same factor. MACs fall with every removal: bisection.
    """
    steps = sorted(((j + 1) / len(idx), gi, j) for gi, idx in plan.items() for j in range(len(idx)))

    def prefix(m: int) -> Plan:
        out: Plan = {}
        for _, gi, j in steps[:m]:
            out.setdefault(gi, []).append(plan[gi][j])
        return out

    value = lambda m: macs.after(groups, prefix(m))  # noqa: E731
    if value(len(steps)) > goal:
        return {gi: list(idx) for gi, idx in plan.items()}
    lo, hi = 0, len(steps)  # value(lo) > goal >= value(hi) once lo moves; value(0) is the current MACs
    if value(0) <= goal:
        return {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if value(mid) > goal:
            lo = mid
        else:
            hi = mid
    best = lo if abs(value(lo) - goal) < abs(value(hi) - goal) else hi
    return prefix(best)


# ---------------------------------------------------------------- the report
@dataclass
class RoundRecord:
    """One PAGCP round: what was probed, kept, and what it cost."""

    round: int
    theta0: float
    lam: float
    budget: float
    reference_loss: Losses  # the round's start, on the held-out set
    layers: list[LayerProbe]
    removed: dict[str, int]  # group root → channels removed in this round
    ratios: dict[str, float]  # group root → fraction of its channels removed in this round
    loss_ratio: Losses  # per task: the pruned selection (masked) against the round's start
    dropped: list[str]  # selected groups dropped by the budget check
    fitted: bool  # the selection was cut to land on target_macs
    macs_before: int
    macs_after: int
    macs_estimated: int  # MacsModel's estimate of macs_after
    params_before: int
    params_after: int
    forwards: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [{k: v for k, v in asdict(r).items() if k not in ("index", "order_of_removal")}
                         for r in self.layers]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        """The inverse of :meth:`to_dict` (the layers lose their round-local ``index``/``order_of_removal``)."""
        return cls(**{**d, "layers": [LayerProbe(**layer) for layer in d["layers"]]})


@dataclass
class PAGCPReport:
    criterion: str
    settings: dict[str, Any]
    target_macs: float | None
    macs_before: int
    params_before: int
    macs_after: int = 0
    params_after: int = 0
    reached: bool | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "rounds"}
        out["rounds"] = [r.to_dict() for r in self.rounds]
        out["macs_ratio"] = self.macs_after / self.macs_before if self.macs_before else None
        out["params_ratio"] = self.params_after / self.params_before if self.params_before else None
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PAGCPReport:
        """The inverse of :meth:`to_dict`."""
        kw = {k: v for k, v in d.items() if k not in ("rounds", "macs_ratio", "params_ratio")}
        return cls(**kw, rounds=[RoundRecord.from_dict(r) for r in d["rounds"]])


# ---------------------------------------------------------------- the allocator
def _count(model: nn.Module, example_inputs: Tensor) -> tuple[int, int]:
    from .prune import count

    return count(model, example_inputs)


def _round_scores(model: nn.Module, graph: PruningGraph, crit: Criterion, data: Iterable | None,
                  losses: Mapping, stats_batches: int | None, engine: Any) -> dict[int, Tensor]:
    from .prune import criterion_scores

    return criterion_scores(model, graph, crit, data=data, losses=losses, batches=stats_batches, engine=engine)


def _select_within_budget(probe: LossProbe, graph: PruningGraph, selected: list[LayerProbe], start: Losses,
                          budget: float, macs: MacsModel, goal: float | None) -> tuple[Plan, Losses, list, bool]:
    """Drop the least efficient selected group until the (fitted) selection keeps every task within budget."""
    dropped: list[str] = []
    chosen = list(selected)
    while True:
        plan = {r.index: r.order_of_removal[:r.removed] for r in chosen}
        fitted = False
        if goal is not None and plan and macs.after(graph.groups, plan) < goal:
            plan, fitted = fit_to_target(graph.groups, plan, macs, goal), True
        ratios = loss_ratios(probe.losses_under(graph.groups, plan), start) if plan else dict.fromkeys(start, 1.0)
        if not chosen or max(ratios.values()) <= budget * (1 + 1e-9):
            return plan, ratios, dropped, fitted
        worst = max(chosen, key=lambda r: (r.efficiency, r.order))
        chosen.remove(worst)
        dropped.append(worst.root)


def _finished(record: RoundRecord, goal: float | None, tolerance: float) -> bool:
    """No round follows ``record``: it removed nothing, or the MACs target is reached."""
    return not record.removed or (goal is not None and record.macs_after <= goal * (1 + tolerance))


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global torch RNG (CPU) seeded with ``seed`` inside, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pagcp(model: nn.Module, example_inputs: Tensor, criterion: str | Criterion = "l1", *, data: Iterable | None,
          losses: Mapping[str, Callable], target_macs: float | None = None,
          settings: PAGCPSettings | Mapping[str, Any] | None = None, probe_data: Iterable | None = None,
          min_channels: int = 5, stats_batches: int | None = 8, seed: int = 0, protected: Iterable[str] = (),
          parts: Mapping[str, str] | None = None, graph: PruningGraph | None = None, engine: Any = None,
          finetune: Callable[[nn.Module, int], None] | None = None,
          round_data: Callable[[int], Iterable] | None = None, prior: PAGCPReport | None = None,
          on_round: Callable[[nn.Module, PAGCPReport], None] | None = None) -> tuple[PAGCPReport, PruningGraph]:
    """Prune ``model`` in place with PAGCP (Ye et al., TPAMI 2023). Returns the report and the final graph.

    Args:
        data: batches ``(images, {task: target})`` for the criterion's statistics (if it needs any) and, unless
            ``probe_data`` is given, for the held-out probe set (its first ``held_out_batches`` batches).
        losses: task → loss callable (or ``Task``); every constrained task's loss must be positive.
        target_macs: stop once the MACs are at most this fraction of the original (within ``tolerance``);
            ``None`` runs ``settings.rounds`` rounds (or until no group can be pruned within the budget).
        finetune: called as ``finetune(model, round)`` after each round that is followed by another one.
        round_data: ``round_data(r)`` gives round ``r``'s statistics batches instead of ``data``.
        prior: the report of the rounds already run on ``model`` (a resumed run): continue with the next round,
            against the original MACs and params it recorded.
        on_round: called as ``on_round(model, report)`` after each round and the fine-tuning that follows it.
    Each round draws from the global torch RNG seeded by ``(seed, round)`` only (restored afterwards), so a run
    resumed at round ``k`` decides exactly as an uninterrupted one.
    Pruning replaces Parameter objects: rebuild optimizers afterwards.
    """
    start_time = time.perf_counter()
    cfg = PAGCPSettings.of(settings)
    if data is None and probe_data is None:
        raise ValueError("pagcp needs held-out data and losses: pass data= (or probe_data=) and losses=")
    if not losses:
        raise ValueError("pagcp needs losses= (task → loss): its constraint is on every task's loss")
    if target_macs is not None and not 0 < target_macs < 1:
        raise MTPruneInputError(f"target_macs must be in (0, 1), got {target_macs}")
    crit = get_criterion(criterion, seed=seed) if isinstance(criterion, str) else criterion
    losses = {t: getattr(fn, "loss", fn) for t, fn in losses.items()}
    graph = graph or PruningGraph(model, example_inputs, protected=tuple(protected), parts=parts, min_channels=1)
    if prior is None:
        params0, macs0 = _count(model, example_inputs)
        report = PAGCPReport(crit.name, asdict(cfg), target_macs, macs0, params0, macs0, params0)
    else:
        report = dataclasses.replace(prior, rounds=list(prior.rounds))
        if report.target_macs != target_macs or _plain(report.settings) != _plain(asdict(cfg)):
            raise MTPruneInputError("pagcp: cannot resume with other settings or another target_macs")
    macs0, seconds0 = report.macs_before, report.seconds
    goal = None if target_macs is None else target_macs * macs0
    with _seeded(seed):
        probe = LossProbe(model, probe_data if probe_data is not None else data, losses, cfg.held_out_batches,
                          cfg.cache)
    first = len(report.rounds)
    if report.rounds and _finished(report.rounds[-1], goal, cfg.tolerance):
        first = cfg.rounds  # the prior run ended
    for r in range(first, cfg.rounds):
        with _seeded(seed * 1_000_003 + r):
            record = _one_round(model, example_inputs, graph, crit, probe, cfg, r,
                                data if round_data is None else round_data(r), losses, stats_batches,
                                engine if r == 0 else None, min_channels, goal)
        report.rounds.append(record)
        report.macs_after, report.params_after = record.macs_after, record.params_after
        last = _finished(record, goal, cfg.tolerance) or r == cfg.rounds - 1
        if not last and finetune is not None:
            finetune(model, r)
        report.seconds = seconds0 + time.perf_counter() - start_time
        if on_round is not None:
            on_round(model, report)
        if last:
            break
    if goal is not None:
        report.reached = abs(report.macs_after - goal) <= cfg.tolerance * goal
        if not report.reached:
            warnings.warn(f"pagcp: target_macs={target_macs} was not reached: the model keeps "
                          f"{report.macs_after / macs0:.4f} of the original MACs after {len(report.rounds)} "
                          f"round(s) (budget={cfg.budget} per round, rounds={cfg.rounds}, min_channels="
                          f"{min_channels})", stacklevel=2)
    report.seconds = seconds0 + time.perf_counter() - start_time
    return report, graph


def _one_round(model: nn.Module, example_inputs: Tensor, graph: PruningGraph, crit: Criterion, probe: LossProbe,
               cfg: PAGCPSettings, r: int, data: Iterable | None, losses: Mapping, stats_batches: int | None,
               engine: Any, min_channels: int, goal: float | None) -> RoundRecord:
    t0, forwards0 = time.perf_counter(), probe.forwards
    probe.refresh()
    params_before, macs_before = _count(model, example_inputs)
    with eval_mode(model):
        scores = _round_scores(model, graph, crit, data, losses, stats_batches, engine)
        macs = MacsModel(model, example_inputs)
        layers, start, lam = probe_round(graph, scores, probe, macs, cfg, min_channels)
        selected = select_top(layers, cfg.top_p)
        plan, ratios, dropped, fitted = _select_within_budget(probe, graph, selected, start, cfg.budget, macs, goal)
    chosen = set(plan)
    for layer in layers:
        layer.selected = layer.index in chosen
    estimated = macs.after(graph.groups, plan)
    removed = {graph.groups[gi].root: len(idx) for gi, idx in plan.items()}
    fractions = {graph.groups[gi].root: len(idx) / graph.groups[gi].channels for gi, idx in plan.items()}
    graph.prune({gi: sorted(idx) for gi, idx in plan.items()})
    params_after, macs_after = _count(model, example_inputs)
    return RoundRecord(
        round=r, theta0=layers[0].theta if layers else cfg.budget - 1, lam=lam, budget=cfg.budget,
        reference_loss=start, layers=layers, removed=removed, ratios=fractions, loss_ratio=ratios, dropped=dropped,
        fitted=fitted, macs_before=macs_before, macs_after=macs_after, macs_estimated=estimated,
        params_before=params_before, params_after=params_after, forwards=probe.forwards - forwards0,
        seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------- entry points: mtprune.prune and the pipeline
def prune_pagcp(model: nn.Module, example_inputs: Tensor, criterion: Criterion, *, target: Mapping[str, float],
                data: Iterable | None, losses: Mapping | None, batches: int | None = 8, min_channels: int = 5,
                round_to: int = 1, part_ratios: Mapping[str, float] | None = None, seed: int = 0,
                graph: PruningGraph | None = None, engine: Any = None, settings: Any = None,
                probe_data: Iterable | None = None):
    """``mtprune.prune(..., allocator="pagcp")``: PAGCP to ``target_macs``; the report is in ``extra["pagcp"]``."""
    from .prune import PruneReport

    start = time.perf_counter()
    if set(target) != {"target_macs"}:
        raise MTPruneInputError(f"allocator 'pagcp' prunes to a MACs target: give target_macs (got {sorted(target)})")
    if round_to != 1 or part_ratios:
        raise MTPruneInputError("allocator 'pagcp' allocates per layer itself: round_to and part_ratios do not apply")
    if data is None or losses is None:
        raise ValueError("allocator 'pagcp' measures every task's loss: pass data= and losses= to mtprune.prune")
    graph = graph or PruningGraph(model, example_inputs, min_channels=1)
    widths0 = graph.widths()
    report, graph = pagcp(model, example_inputs, criterion, data=data, losses=losses,
                          target_macs=target["target_macs"], settings=settings, probe_data=probe_data,
                          min_channels=min_channels, stats_batches=batches, seed=seed, graph=graph, engine=engine)
    model.mtprune_input_shape = list(example_inputs.shape[1:])
    return PruneReport(
        criterion=criterion.name, target=dict(target), params_before=report.params_before,
        params_after=report.params_after, macs_before=report.macs_before, macs_after=report.macs_after,
        widths_before=widths0, widths_after=graph.widths(),
        removed=sum(sum(r.removed.values()) for r in report.rounds), seconds=time.perf_counter() - start,
        batches=engine.batches if engine is not None else 0,
        extra={"allocator": "pagcp", "pagcp": report.to_dict()})


def _write_state(path: Path, records: list, report: PAGCPReport | None) -> None:
    atomic_write_json(path, {"records": [asdict(r) for r in records],
                             "report": None if report is None else report.to_dict()})


def _read_state(path: Path) -> tuple[list, PAGCPReport | None] | None:
    """``(step records, report of the completed rounds)`` from a schedule's state file; ``None`` if absent."""
    from .schedule import StepRecord

    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        report = None if state["report"] is None else PAGCPReport.from_dict(state["report"])
        return [StepRecord(**r) for r in state["records"]], report
    except (ValueError, KeyError, TypeError) as err:
        raise MTPruneInputError(f"{path}: corrupt PAGCP state ({err})") from None


def pagcp_schedule(model: nn.Module, example_inputs: Tensor, tasks: Mapping[str, Any], train_set: Any,
                   val_set: Any, run_dir: str | Path, *, criterion: str | Criterion = "l1",
                   target_macs: float | None = None, settings: Any = None, finetune: Any = None,
                   stats_batches: int = 8, stats_batch_size: int = 8, min_channels: int = 5,
                   seed: int = 0, resume: bool = False,
                   rebuild: Callable[[], nn.Module] | None = None) -> tuple[nn.Module, list, dict[str, Any]]:
    """The pipeline's PAGCP: rounds with fine-tuning in between (``finetune``: a ``TrainConfig``), then a final
    fine-tune. The probe set is a seeded draw of ``held_out_batches`` batches of ``val_set``; round ``r``'s
    statistics come from ``train_set`` shuffled by ``seed + r``. Returns the model, one ``StepRecord`` per
    round, and the PAGCP report as a dict.

    After each round (and its fine-tuning) the model is saved as ``rounds/<r>/model.mtp`` (``r`` counts from 1)
    and the records as ``pagcp.json``; ``resume=True`` continues after the last saved round, and each
    fine-tuning from its own checkpoint. ``rebuild`` makes the unpruned model to load into (default: zoo models
    from the file's metadata).
    """
    from torch.utils.data import DataLoader

    from ..engine.evaluate import evaluate
    from ..engine.trainer import TrainConfig, Trainer
    from ..io import load as load_model
    from ..io import save as save_model
    from ..utils.runtime import resolve_device
    from .schedule import StepRecord

    run_dir = Path(run_dir)
    state_path = run_dir / "pagcp.json"
    finetune = finetune or TrainConfig(epochs=0)
    device = resolve_device(finetune.device)
    home = next(model.parameters()).device
    state = _read_state(state_path) if resume else None
    prior = state[1] if state else None
    if prior is not None and prior.rounds:
        saved = run_dir / "rounds" / str(len(prior.rounds)) / "model.mtp"
        model = load_model(saved, base=rebuild() if rebuild is not None else None)
    model.to(device)
    x = example_inputs.to(device)
    loader = lambda ds, s: DataLoader(ds, batch_size=stats_batch_size, shuffle=True,  # noqa: E731
                                      generator=torch.Generator().manual_seed(s))
    eval_bs = finetune.eval_batch_size or finetune.batch_size

    def record(step: int) -> StepRecord:
        params, macs = _count(model, x)
        metrics = evaluate(model, val_set, tasks, device=device, batch_size=eval_bs)
        return StepRecord(step, params, macs, metrics, PruningGraph(model, x).widths())

    def train(step_dir: Path) -> None:
        if finetune.epochs <= 0:
            return
        cfg = dataclasses.replace(finetune, resume=resume and (step_dir / "checkpoints").is_dir())
        summary = Trainer(model, tasks, train_set, val_set, step_dir, cfg).fit()
        if summary.best_checkpoint:
            load_model_state(model, summary.best_checkpoint)
        model.to(device)

    if state:
        records = state[0]
    else:
        records = [record(0)]
        _write_state(state_path, records, None)

    def between(m: nn.Module, r: int) -> None:
        train(run_dir / "rounds" / str(r + 1))
        records.append(record(r + 1))

    def save_round(m: nn.Module, report: PAGCPReport) -> None:
        save_model(m, run_dir / "rounds" / str(len(report.rounds)) / "model.mtp", example_inputs=example_inputs)
        _write_state(state_path, records, report)

    report, _ = pagcp(model, x, criterion, data=None, round_data=lambda r: loader(train_set, seed + r),
                      losses=tasks, target_macs=target_macs, settings=settings, probe_data=loader(val_set, seed + 1),
                      min_channels=min_channels, stats_batches=stats_batches, seed=seed, finetune=between,
                      prior=prior, on_round=save_round)
    train(run_dir / "finetune")
    records.append(record(len(report.rounds)))
    model.to(home)
    model.mtprune_input_shape = list(example_inputs.shape[1:])
    return model, records, report.to_dict()


def pagcp_markdown(report: Mapping[str, Any]) -> str:
    """A report section: per round, MACs and each task's loss ratio; per group, the ratio removed per round."""
    rounds = report.get("rounds", [])
    if not rounds:
        return "PAGCP ran no round."
    tasks = list(rounds[0]["reference_loss"])
    head = ["round", "λ", "MMACs after", "groups pruned", *(f"loss ratio {t}" for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        lines.append("| " + " | ".join([str(r["round"] + 1), f"{r['lam']:.4g}", f"{r['macs_after'] / 1e6:.2f}",
                                        str(len(r["removed"])), *(f"{r['loss_ratio'][t]:.4f}" for t in tasks)]) + " |")
    roots = sorted({root for r in rounds for root in r["ratios"]})
    table = ["| group | " + " | ".join(f"round {r['round'] + 1}" for r in rounds) + " |",
             "|---|" + "---|" * len(rounds)]
    for root in roots:
        table.append(f"| {root} | " + " | ".join(f"{r['ratios'][root]:.2f}" if root in r["ratios"] else "–"
                                                 for r in rounds) + " |")
    reached = report.get("reached")
    target = "" if reached is None else f" (target {report['target_macs']}: {'' if reached else 'NOT '}reached)"
    note = (f"Criterion {report['criterion']}; per-round loss budget {report['settings']['budget']} "
            f"(Π(1+θ_i), Ye et al. 2023); MMACs {report['macs_before'] / 1e6:.2f} → "
            f"{report['macs_after'] / 1e6:.2f}{target}. Loss ratios are on the held-out probe set, against each "
            "round's start.")
    return note + "\n\n" + "\n".join(lines) + "\n\nFraction of each group's channels removed per round:\n\n" + \
        "\n".join(table)
