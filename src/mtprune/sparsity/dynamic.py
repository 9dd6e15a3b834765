"""Dynamic sparse training: RigL (Evci et al., ICML 2020) and DiSparse dynamic (Sun et al., CVPR 2022).

Both start from ERK layer densities (the first conv dense) and random masks, then every ΔT iterations until
T_end, in every sparse layer:

1. drop the n = round(f(t) · active) active weights of smallest magnitude, with the cosine-decaying fraction
   f(t) = α/2 · (1 + cos(π t / T_end)) (α = 0.5: from 0.5 down to 0 at T_end);
2. regrow n weights among the inactive ones (those just dropped included) with the largest gradient magnitude:
   - RigL: |∂(Σ_t L_t)/∂w|;
   - DiSparse: per task, |∂L_t/∂w|. Head t uses task t's; a shared layer takes the union over tasks, i.e. the
     candidates in order of their best per-task rank (ties: the larger sum-normalised gradient), so exactly n
     (``regrowth="rank_union"``, the default). ``regrowth="per_task_union"`` is the released code's
     (``dynamic_disparse`` in SHI-Labs/DiSparse-Multitask-Model-Compression ``dynamic_prune.py``): each task
     regrows its own top-n and a shared layer takes the union, so it is temporarily denser (up to T·n new
     weights); the next update drops back to ``(1 - f) · K`` active weights (K: the layer's ERK count) before it
     regrows, and at T_end a last drop (no regrowth) restores exactly K (the released code stops at T_end);
3. newly grown weights start at 0 (as in RigL; the released DiSparse code revives stale values) and the
   optimizer state of every changed entry (dropped or grown) is reset.

With ``rank_union`` (and RigL) the number of active weights per layer never changes. After T_end the masks stay
fixed and training goes on to the last iteration (the released DiSparse dynamic code crashes at T_end).
``erk_power`` raises the ERK ratio to a power (``erk.py``; the released code: 0.9).

With ``train.checkpoint`` and ``train.checkpoint_every`` (``mtprune sparsify``: one epoch), every that many
iterations the loop (masks, optimizer, update history, RNG states) is saved; ``train.resume`` continues from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..utils.errors import MTPruneInputError
from .erk import erk_counts, erk_densities, random_masks
from .masks import apply_masks, effective_weight, is_masked, maskable_layers, maskable_params, param_name, set_mask
from .parts import BACKBONE
from .scores import as_losses, batch_gradients, scoring_mode
from .training import SparseLoop, SparseTrainConfig, reset_optimizer_state

CHECKPOINT_KIND = "dynamic-sparse-training"


REGROWTH = ("rank_union", "per_task_union")


@dataclass
class DynamicSchedule:
    """When and how much to update (every ``delta_t`` iterations while ``0 < t < t_end``), and how: ``erk_power``
    of the initial ERK densities (1: RigL; 0.9: the released DiSparse code) and DiSparse's ``regrowth``
    (``"rank_union"``: exactly n per layer; ``"per_task_union"``: each task's own top-n, united in shared layers,
    as the released code)."""

    delta_t: int = 50
    t_end: int = 15000
    alpha: float = 0.5
    erk_power: float = 1.0
    regrowth: str = "rank_union"

    def __post_init__(self) -> None:
        if self.delta_t < 1 or self.t_end < 1 or not 0 < self.alpha <= 1:
            raise MTPruneInputError(f"invalid dynamic schedule {self}: need delta_t ≥ 1, t_end ≥ 1, 0 < alpha ≤ 1")
        if self.regrowth not in REGROWTH:
            raise MTPruneInputError(f"regrowth must be one of {list(REGROWTH)}, got {self.regrowth!r}")

    def fraction(self, step: int) -> float:
        """f(t) = α/2 · (1 + cos(π t / T_end)), and 0 from T_end on."""
        if step >= self.t_end:
            return 0.0
        return self.alpha / 2 * (1 + math.cos(math.pi * step / self.t_end))

    def updates_at(self, step: int) -> bool:
        return 0 < step < self.t_end and step % self.delta_t == 0


def first_conv(model: nn.Module) -> str | None:
    """The weight of the first convolution in module order (kept dense by ERK here)."""
    for name, m in maskable_layers(model).items():
        if isinstance(m, nn.modules.conv._ConvNd):
            return param_name(name)
    return None


def regrowth_order(candidates: Tensor, grads: list[Tensor]) -> Tensor:
    """Indices of the flat ``candidates`` (bool) in regrowth order: by |g| for one gradient; for several, the
    union of per-task top-k as k grows (best per-task rank first; ties by the largest sum-normalised |g_t|)."""
    idx = candidates.nonzero().flatten()
    mags = [g.reshape(-1)[idx].abs().double() for g in grads]
    mags = [m for m in mags if m.sum() > 0] or mags[:1]
    if len(mags) == 1:
        return idx[torch.sort(mags[0], descending=True, stable=True).indices]
    ranks = []
    for m in mags:
        order = torch.sort(m, descending=True, stable=True).indices
        r = torch.empty_like(order)
        r[order] = torch.arange(m.numel(), device=m.device)
        ranks.append(r)
    best_rank = torch.stack(ranks).min(0).values
    tie = torch.stack([m / m.sum() for m in mags]).max(0).values
    by_tie = torch.sort(tie, descending=True, stable=True).indices
    order = by_tie[torch.sort(best_rank[by_tie], stable=True).indices]
    return idx[order]


@dataclass
class Update:
    """One mask update: the drop fraction and, per layer, the entries dropped and grown (bool masks)."""

    step: int
    fraction: float
    dropped: dict[str, Tensor] = field(default_factory=dict)
    grown: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"step": self.step, "fraction": self.fraction,
                "changed": sum(int((self.dropped[p] ^ self.grown[p]).sum()) for p in self.dropped),
                "moved": sum(int(self.grown[p].sum()) for p in self.grown)}


def own_top_union(candidates: Tensor, grads: list[Tensor], n: int) -> Tensor:
    """Indices of the flat ``candidates`` (bool) in the union of each gradient's own top-``n`` by |g| (the
    released DiSparse code's regrowth: up to ``len(grads) · n`` indices)."""
    idx = candidates.nonzero().flatten()
    chosen = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
    for g in grads:
        top = torch.sort(g.reshape(-1)[idx].abs().double(), descending=True, stable=True).indices[:n]
        chosen[top] = True
    return idx[chosen]


class DropRegrow:
    """Mask updates of a masked model (see the module docstring); ``per_task=False`` is RigL. ``counts``: each
    layer's ERK count K, needed by ``regrowth="per_task_union"`` (whose shared layers may exceed it)."""

    def __init__(self, model: nn.Module, parts: Mapping[str, str], optimizer: torch.optim.Optimizer, *,
                 per_task: bool, dense: Iterable[str] = (), regrowth: str = "rank_union",
                 counts: Mapping[str, int] | None = None) -> None:
        self.model, self.parts, self.optimizer, self.per_task = model, dict(parts), optimizer, per_task
        self.dense = set(dense)
        self.regrowth, self.counts = regrowth, dict(counts or {})
        if regrowth == "per_task_union" and not per_task:
            raise MTPruneInputError("regrowth 'per_task_union' is DiSparse dynamic's; RigL regrows by the summed "
                                    "gradient")
        self.history: list[dict] = []

    def _grads(self, param: str, grads: Mapping[str, Mapping[str, Tensor]]) -> list[Tensor]:
        if not self.per_task:
            return [torch.stack([g[param] for g in grads.values()]).sum(0)]
        part = self.parts[param]
        if part == BACKBONE:
            return [g[param] for g in grads.values()]
        return [grads[part][param]]

    @torch.no_grad()
    def update(self, step: int, fraction: float, grads: Mapping[str, Mapping[str, Tensor]] | None) -> Update:
        """Drop and regrow in every sparse layer; ``grads``: {task: {param: ∂L_t/∂w_eff}} on one batch, or
        ``None`` for a last drop back to each layer's count (``per_task_union`` at T_end)."""
        record = Update(step, fraction)
        for name, module in maskable_layers(self.model).items():
            param = param_name(name)
            if param in self.dense or not is_masked(module):
                continue
            mask = module.weight_mask.bool().reshape(-1)
            active = int(mask.sum())
            union = self.regrowth == "per_task_union"
            count = self.counts.get(param, active) if union else active
            n = round(fraction * count)
            drop = active - (count - n) if union else n
            if (n == 0 and drop <= 0) if union else (n == 0 or active == mask.numel()):
                continue
            magnitude = effective_weight(module).abs().reshape(-1).double()
            drop_order = torch.sort(torch.where(mask, magnitude, torch.inf), stable=True).indices
            after = mask.clone()
            after[drop_order[:max(drop, 0)]] = False
            layer_grads = [] if grads is None or n == 0 else [g.to(mask.device) for g in self._grads(param, grads)]
            if not layer_grads:
                grow = drop_order[:0]
            elif union:
                grow = own_top_union(~after, layer_grads, n)
            else:
                grow = regrowth_order(~after, layer_grads)[:n]
            new = after.clone()
            new[grow] = True
            shape = module.weight_mask.shape
            grown, dropped = (new & ~mask).reshape(shape), (mask & ~new).reshape(shape)
            module.weight_orig[grown] = 0  # new connections start at zero (RigL)
            set_mask(module, new.reshape(shape))  # zeroes the dropped entries
            reset_optimizer_state(self.optimizer, module.weight_orig, grown | dropped)
            record.dropped[param], record.grown[param] = dropped.cpu(), grown.cpu()
        self.history.append(record.summary())
        return record

    def over_count(self) -> bool:
        """Some layer holds more active weights than its count (``per_task_union`` between updates)."""
        if self.regrowth != "per_task_union":
            return False
        return any(int(m.weight_mask.sum()) > self.counts.get(param_name(n), math.inf)
                   for n, m in maskable_layers(self.model).items() if is_masked(m))


def initial_masks(model: nn.Module, sparsity: float, seed: int,
                  erk_power: float = 1.0) -> tuple[dict[str, Tensor], dict[str, float]]:
    """ERK densities (raw ratio to ``erk_power``) with the first conv dense, and random masks with exactly the ERK
    count per layer."""
    shapes = maskable_params(model)
    first = first_conv(model)
    densities = erk_densities(shapes, sparsity, dense=[first] if first else [], power=erk_power)
    counts = erk_counts(shapes, densities)
    masks = random_masks(shapes, counts, torch.Generator().manual_seed(seed))
    return masks, densities


@dataclass
class DynamicRun:
    updater: DropRegrow
    loop: SparseLoop
    densities: dict[str, float]  # ERK


def dynamic_sparse_training(model: nn.Module, parts: Mapping[str, str], sparsity: float, data: Iterable,
                            losses: Mapping, train: SparseTrainConfig, schedule: DynamicSchedule, *,
                            per_task: bool, seed: int = 0,
                            on_update: Callable[[Update, SparseLoop], None] | None = None) -> DynamicRun:
    """Mask the model (ERK, random), then train it for ``train.steps`` iterations with mask updates.

    ``on_update(update, loop)`` is called right after each update (before the next optimizer step).
    """
    masks, densities = initial_masks(model, sparsity, seed, schedule.erk_power)
    apply_masks(model, masks)
    dense = {p for p, d in densities.items() if d >= 1.0}
    loop = SparseLoop(model, data, losses, train)
    updater = DropRegrow(model, parts, loop.optimizer, per_task=per_task, dense=dense, regrowth=schedule.regrowth,
                         counts={p: int(m.sum()) for p, m in masks.items()})
    fns = as_losses(losses)
    saved = loop.resume(CHECKPOINT_KIND)
    if saved is not None:
        updater.history = list(saved["updates"])

    def hook(step: int, images: Tensor, targets: dict[str, Tensor]) -> None:
        if schedule.updates_at(step):
            with scoring_mode(model, train=True):
                _, grads = batch_gradients(model, images, targets, fns)
            record = updater.update(step, schedule.fraction(step), grads)
            if on_update is not None:
                on_update(record, loop)
        elif step >= schedule.t_end and updater.over_count():  # per_task_union: back to the ERK counts
            updater.update(step, 0.0, None)
        if train.checkpoint_every and step % train.checkpoint_every == 0:
            loop.save(CHECKPOINT_KIND, updates=updater.history)

    loop.run(max(0, train.steps - loop.step), hook)
    if updater.over_count():  # training ended before T_end
        updater.update(loop.step, 0.0, None)
    return DynamicRun(updater, loop, densities)
