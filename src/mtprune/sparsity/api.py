"""``mtprune.sparsify``: unstructured sparsification of a multi-task model, in place, with a per-layer report.

Methods (``METHODS``): DiSparse ``disparse_static``, ``disparse_pretrained``, ``disparse_dynamic`` (Sun et al.,
CVPR 2022) and the baselines ``snip`` (Lee et al. 2019), ``random``, ``magnitude`` and ``imp`` (Han et al. 2015;
with ``rewind``: the lottery ticket, Frankle & Carbin 2019) and ``rigl`` (Evci et al. 2020). Only Conv and
Linear weights are masked, heads included; biases and normalisation layers never.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields

from torch import Tensor, nn

from ..utils.errors import MTPruneInputError
from . import baselines, disparse
from .analysis import mean_pairwise_iou, sparsity_report, watershed
from .context import Context, Outcome
from .dynamic import DynamicSchedule
from .masks import get_masks
from .parts import BACKBONE, layer_parts
from .scores import VARIANTS, as_losses
from .storage import SPEED_NOTE, stored_size
from .training import SparseTrainConfig

METHODS: dict[str, Callable[[Context], Outcome]] = {
    "disparse_static": disparse.disparse_static,
    "disparse_pretrained": disparse.disparse_pretrained,
    "disparse_dynamic": disparse.disparse_dynamic,
    "snip": baselines.snip,
    "random": baselines.random,
    "magnitude": baselines.magnitude,
    "imp": baselines.imp,
    "rigl": baselines.rigl,
}
TRAINING_METHODS = frozenset({"disparse_dynamic", "imp", "rigl"})  # they train while they sparsify


@dataclass
class SparsityResult:
    """What ``sparsify`` did. ``masks``: {"<layer>.weight": bool}; ``sparsity``: achieved, overall."""

    method: str
    target: float
    sparsity: float
    masks: dict[str, Tensor]
    layers: list[dict]  # per layer: name, part, shape, numel, kept, sparsity
    parts: dict[str, dict]  # "backbone", each task's head, "overall": numel, kept, sparsity
    storage: dict[str, float]
    seconds: float
    keep_ratio: float | None = None  # DiSparse's searched per-task keep ratio
    task_masks: dict[str, dict[str, Tensor]] | None = None  # B_t (DiSparse static/pretrained)
    agreement: dict[str, float] | None = None  # shared layer → mean pairwise IoU of the B_t
    watershed: str | None = None
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    speed_note: str = SPEED_NOTE

    def to_dict(self) -> dict:
        """JSON-ready (no tensors)."""
        skip = {"masks", "task_masks"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def _config(value, cls, defaults: Mapping | None = None):
    if isinstance(value, cls):
        return value
    try:
        return cls(**{**(defaults or {}), **dict(value or {})})
    except TypeError as err:
        raise MTPruneInputError(f"{cls.__name__}: {err}") from None


def sparsify(model: nn.Module, example_inputs: Tensor | tuple | Mapping | None = None, method: str = "disparse_static",
             sparsity: float = 0.9, *, data: Iterable | None = None, losses: Mapping | None = None,
             batches: int | None = 50, score: str | None = None, tolerance: float = 1e-3, seed: int = 0,
             train: SparseTrainConfig | Mapping | None = None, schedule: DynamicSchedule | Mapping | None = None,
             rounds: int = 3, rewind: bool | int = False, on_update: Callable | None = None,
             score_init: str = "model") -> SparsityResult:
    """Mask ``model``'s conv/linear weights in place to the overall ``sparsity``; returns the masks and a report.

    Args:
        example_inputs: a batch (its first sample is used; a tensor, a tuple or a dict of tensors) to tell heads
            from shared layers in models that are not ``MultiTaskModel`` (autograd reachability); ``None`` uses
            names only (``heads.<task>.``).
        data, losses: batches of ``(images, {task: target})`` and ``{task: loss fn or Task}``. Every method but
            ``random``, ``magnitude`` and ``disparse_pretrained`` with ``score="magnitude"`` needs both
            (``ValueError`` otherwise).
        batches: batches of statistics for the scores (50 in the paper).
        score: override the score of DiSparse static/pretrained or SNIP: ``snip``, ``pretrained``, ``magnitude``.
        tolerance: DiSparse's keep-ratio search stops within tolerance/4 of the target (default 0.1 pp).
        train: for the methods that train (``disparse_dynamic``, ``rigl``, ``imp`` per round):
            ``SparseTrainConfig`` or its fields (steps, lr, optimizer, weight_decay, momentum, grad_clip).
        schedule: dynamic methods: ``DynamicSchedule`` or its fields (delta_t=50, t_end=75 % of the steps,
            alpha=0.5, erk_power=1.0 (the released DiSparse code: 0.9), regrowth="rank_union" (the released
            code: "per_task_union")).
        score_init: ``disparse_static`` only: ``"model"`` (default) scores the model as it is,
            ``"xavier_normal"`` a copy with Xavier-normal weights, as the released DiSparse code does.
        rounds, rewind: IMP: the number of rounds; rewinding to initialisation (True) or to iteration ``rewind``.
    """
    if method not in METHODS:
        raise MTPruneInputError(f"unknown sparsification method {method!r}; choose from {', '.join(METHODS)}")
    if not 0 < sparsity < 1:
        raise MTPruneInputError(f"sparsity must be in (0, 1), got {sparsity}")
    if score is not None and score not in VARIANTS:
        raise MTPruneInputError(f"unknown score {score!r}; choose from {', '.join(VARIANTS)}")
    if not 0 < tolerance < 0.05:
        raise MTPruneInputError(f"tolerance must be in (0, 0.05), got {tolerance}")
    if score_init not in disparse.SCORE_INITS or (score_init != "model" and method != "disparse_static"):
        raise MTPruneInputError(f"score_init must be one of {list(disparse.SCORE_INITS)}, and other than 'model' "
                                f"only with disparse_static (got {score_init!r} with {method})")
    fns = as_losses(losses) if losses else None
    tasks = list(fns) if fns else list(getattr(model, "task_names", None) or [])
    train = _config(train, SparseTrainConfig)
    schedule = _config(schedule, DynamicSchedule, {"t_end": max(1, round(0.75 * train.steps))})
    parts = layer_parts(model, example_inputs, tasks or None)
    tasks = tasks or [p for p in dict.fromkeys(parts.values()) if p != BACKBONE]
    ctx = Context(model, method, float(sparsity), tasks, parts, data, fns, batches, score, tolerance, seed, train,
                  schedule, rounds, rewind, on_update, score_init)
    start = time.perf_counter()
    outcome = METHODS[method](ctx)
    seconds = time.perf_counter() - start
    masks = get_masks(model)
    layers, per_part = sparsity_report(masks, parts)
    agreement = None
    if outcome.task_masks and len(outcome.task_masks) > 1:
        shared = [p for p, part in parts.items() if part == BACKBONE]
        agreement = mean_pairwise_iou({t: {p: m[p] for p in shared if p in m} for t, m in outcome.task_masks.items()})
    return SparsityResult(
        method=method, target=float(sparsity), sparsity=per_part["overall"]["sparsity"], masks=masks, layers=layers,
        parts=per_part, storage=stored_size(model), seconds=seconds, keep_ratio=outcome.keep_ratio,
        task_masks=outcome.task_masks, agreement=agreement, watershed=watershed(agreement) if agreement else None,
        history=outcome.history, extra=outcome.extra)
