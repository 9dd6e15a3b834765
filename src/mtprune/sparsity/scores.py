"""Per-weight saliency scores, per task, from the one statistics engine (one forward, T backward per batch).

Variants (``VARIANTS``), each S ≥ 0 per weight:

- ``snip``: S_t = Σ_batches |∂L_t/∂w ⊙ w| (Lee et al., ICLR 2019; per task as in DiSparse static, Sun et al. 2022);
- ``pretrained``: S_t = w² · Σ_batches |∂L_t/∂w| (DiSparse on a trained model);
- ``magnitude``: S = |w| (Han et al., NeurIPS 2015; no data; the released DiSparse code's choice on NYUv2).

Gradients are taken with respect to the *effective* weight of each layer (``weight_orig * mask`` on a masked
layer), so pruned entries get a gradient too. ``summed`` scores use ∂(Σ_t L_t)/∂w = Σ_t ∂L_t/∂w: the SNIP baseline
costs no extra pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..engine.batch import unpack_batch
from ..pruning.stats import Loss, per_task_gradients
from ..utils.errors import MTPruneInputError
from .masks import effective_weight, maskable_layers, param_name

VARIANTS = ("snip", "pretrained", "magnitude")
PerTask = dict[str, dict[str, Tensor]]  # task → {param: tensor}


def as_losses(losses: Mapping) -> dict[str, Loss]:
    """Loss callables or ``Task`` objects (their ``.loss``)."""
    return {k: getattr(v, "loss", v) for k, v in losses.items()}


def require_data(method: str, data: Iterable | None, losses: Mapping | None) -> None:
    if data is None or not losses:
        raise MTPruneInputError(f"method {method!r} needs gradients: pass data= (batches of (images, "
                                "{task: target})) and losses= ({task: loss fn or Task})")


@contextmanager
def scoring_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Train-mode (batch statistics) or eval-mode forwards; modes and buffers (BN running stats) restored after."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = {k: v.detach().clone() for k, v in model.named_buffers() if not k.endswith("weight_mask")}
    model.train(train)
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])


def batches_of(data: Iterable, tasks: list[str], device: torch.device, limit: int | None) -> Iterator:
    count = 0
    for batch in data:
        if limit is not None and count >= limit:
            break
        yield unpack_batch(batch, tasks, device)
        count += 1
    if count == 0:
        raise MTPruneInputError("no batches were seen: the data is empty")


def batch_gradients(model: nn.Module, images: Tensor, targets: Mapping[str, Tensor],
                    losses: Mapping[str, Loss]) -> tuple[dict[str, float], PerTask]:
    """{task: {param: ∂L_t/∂w_eff}} for every maskable weight on one batch (one forward, T backward)."""
    layers = maskable_layers(model)
    params = [param_name(n) for n in layers]
    values, grads = per_task_gradients(model, images, targets, losses,
                                       lambda: [m.weight for m in layers.values()], checked=params)
    return values, {t: dict(zip(params, [g.detach() for g in gs], strict=True)) for t, gs in grads.items()}


@dataclass
class GradientSums:
    """Σ over batches of |g_t| and |g_t ⊙ w| per task, and |Σ_t g_t ⊙ w| and |Σ_t g_t| (summed loss)."""

    abs_grad: PerTask
    abs_grad_w: PerTask
    summed_abs_grad: dict[str, Tensor]
    summed_abs_grad_w: dict[str, Tensor]
    batches: int


def gradient_sums(model: nn.Module, data: Iterable, losses: Mapping, batches: int | None = 50, *,
                  train_mode: bool = False) -> GradientSums:
    """Accumulate the gradient statistics of every maskable weight over at most ``batches`` batches."""
    fns = as_losses(losses)
    device = next(model.parameters()).device
    layers = maskable_layers(model)
    weights = {param_name(n): effective_weight(m) for n, m in layers.items()}
    zero = lambda: {p: torch.zeros_like(w) for p, w in weights.items()}  # noqa: E731
    sums = GradientSums({t: zero() for t in fns}, {t: zero() for t in fns}, zero(), zero(), 0)
    with scoring_mode(model, train_mode):
        for images, targets in batches_of(data, list(fns), device, batches):
            _, grads = batch_gradients(model, images, targets, fns)
            summed = zero()
            for t, gs in grads.items():
                for p, g in gs.items():
                    sums.abs_grad[t][p] += g.abs()
                    sums.abs_grad_w[t][p] += (g * weights[p]).abs()
                    summed[p] += g
            for p, g in summed.items():
                sums.summed_abs_grad[p] += g.abs()
                sums.summed_abs_grad_w[p] += (g * weights[p]).abs()
            sums.batches += 1
    return sums


def task_scores(model: nn.Module, variant: str, tasks: list[str], data: Iterable | None = None,
                losses: Mapping | None = None, batches: int | None = 50, *, train_mode: bool = False) -> PerTask:
    """Per-task scores ``{task: {param: S_t}}`` of every maskable weight (see the module docstring)."""
    weights = {param_name(n): effective_weight(m) for n, m in maskable_layers(model).items()}
    if variant == "magnitude":
        return {t: {p: w.abs() for p, w in weights.items()} for t in tasks}
    if variant not in VARIANTS:
        raise MTPruneInputError(f"unknown score {variant!r}; choose from {', '.join(VARIANTS)}")
    require_data(f"score {variant}", data, losses)
    sums = gradient_sums(model, data, {t: losses[t] for t in tasks}, batches, train_mode=train_mode)
    if variant == "snip":
        return sums.abs_grad_w
    return {t: {p: weights[p].pow(2) * g for p, g in gs.items()} for t, gs in sums.abs_grad.items()}


def summed_scores(model: nn.Module, variant: str, data: Iterable | None = None, losses: Mapping | None = None,
                  batches: int | None = 50, *, train_mode: bool = False) -> dict[str, Tensor]:
    """Scores of the summed loss Σ_t L_t (the single-task baselines: SNIP on the sum, magnitude)."""
    weights = {param_name(n): effective_weight(m) for n, m in maskable_layers(model).items()}
    if variant == "magnitude":
        return {p: w.abs() for p, w in weights.items()}
    if variant not in VARIANTS:
        raise MTPruneInputError(f"unknown score {variant!r}; choose from {', '.join(VARIANTS)}")
    require_data(f"score {variant}", data, losses)
    sums = gradient_sums(model, data, losses, batches, train_mode=train_mode)
    if variant == "snip":
        return sums.summed_abs_grad_w
    return {p: weights[p].pow(2) * g for p, g in sums.summed_abs_grad.items()}
