"""DiSparse (Sun et al., CVPR 2022, arXiv 2206.04662): disentangled, unanimous multi-task sparsification.

- ``disparse_static``: per-task SNIP scores S_t = Σ |g_t ⊙ w| at initialisation (train-mode forwards; BatchNorm
  statistics restored afterwards), per-task top-k over backbone + head t, unanimous decision, keep ratio searched
  to the overall target. The sparse network is then trained from scratch (``mtprune sparsify``: the Trainer).
  ``score_init="xavier_normal"`` takes the scores on a copy whose conv/linear weights are re-drawn Xavier-normal,
  as the released code does (``disparse_prune_static`` in SHI-Labs/DiSparse-Multitask-Model-Compression
  ``prune_utils.py``); the masks then apply to the model's own initialisation.
- ``disparse_pretrained``: the same on a trained model with S_t = w² · Σ |g_t| (eval-mode forwards), or plain |w|
  with ``score="magnitude"`` (the released code's choice on NYUv2/Cityscapes); then fine-tuned.
- ``disparse_dynamic``: sparse training with per-task regrowth (``dynamic.py``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .context import Context, Outcome
from .decision import search_keep_ratio
from .dynamic import dynamic_sparse_training
from .masks import apply_masks, get_masks, maskable_layers, trainable_weight
from .scores import require_data, task_scores

SCORE_INITS = ("model", "xavier_normal")


def xavier_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every conv/linear weight re-drawn Xavier-normal (gain 1) from a generator seeded
    by ``seed``; ``model`` is untouched. The released DiSparse static code scores such a copy."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in maskable_layers(out).values():
            weight = trainable_weight(module)
            weight.copy_(nn.init.xavier_normal_(torch.empty(weight.shape), generator=gen))
    return out


def _unanimous(ctx: Context, variant: str, train_mode: bool, scored: nn.Module | None = None) -> Outcome:
    if variant != "magnitude":
        require_data(ctx.method, ctx.data, ctx.losses)
    scores = task_scores(scored or ctx.model, variant, ctx.tasks, ctx.data, ctx.losses, ctx.batches,
                         train_mode=train_mode)
    decision = search_keep_ratio(scores, ctx.parts, ctx.sparsity, ctx.tolerance)
    apply_masks(ctx.model, decision.masks)
    return Outcome(decision.masks, task_masks=decision.task_masks, keep_ratio=decision.keep_ratio,
                   extra={"score": variant, "search_trials": decision.trials})


def disparse_static(ctx: Context) -> Outcome:
    scored = xavier_copy(ctx.model, ctx.seed) if ctx.score_init == "xavier_normal" else None
    outcome = _unanimous(ctx, ctx.score or "snip", train_mode=True, scored=scored)
    outcome.extra["score_init"] = ctx.score_init
    return outcome


def disparse_pretrained(ctx: Context) -> Outcome:
    return _unanimous(ctx, ctx.score or "pretrained", train_mode=False)


def disparse_dynamic(ctx: Context) -> Outcome:
    require_data(ctx.method, ctx.data, ctx.losses)
    run = dynamic_sparse_training(ctx.model, ctx.parts, ctx.sparsity, ctx.data, ctx.losses, ctx.train, ctx.schedule,
                                  per_task=True, seed=ctx.seed, on_update=ctx.on_update)
    return Outcome(get_masks(ctx.model), history=run.updater.history,
                   extra={"erk_densities": run.densities, "steps": run.loop.step,
                          "schedule": vars(ctx.schedule).copy()})
