"""Single-ranking baselines in the same framework (masks, reports, files) as DiSparse.

- ``snip``: |∂(Σ_t L_t)/∂w ⊙ w| at initialisation, one global top-k (Lee et al., ICLR 2019);
- ``random``: i.i.d. uniform scores, one global top-k (≈ the same density in every layer);
- ``magnitude``: |w|, one global top-k, one shot (Han et al., NeurIPS 2015);
- ``imp``: iterative magnitude pruning (Han et al. 2015): R rounds of train → prune the smallest surviving
  weights globally to sparsity 1 − (1 − s)^{r/R}; with ``rewind`` the survivors are reset after each round to
  their values at initialisation (``rewind=True``/0) or after ``rewind`` iterations: the lottery ticket
  (Frankle & Carbin, ICLR 2019), which is then trained; without it the pruned model is fine-tuned;
- ``rigl``: dynamic sparse training with summed-loss gradient regrowth (Evci et al., ICML 2020).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .context import Context, Outcome
from .decision import global_masks
from .dynamic import dynamic_sparse_training
from .masks import (
    apply_masks,
    dense_copy_of_state,
    effective_weight,
    get_masks,
    is_masked,
    maskable_layers,
    param_name,
)
from .scores import require_data, summed_scores
from .training import SparseLoop, load_progress, save_progress

IMP_CHECKPOINT = "imp-round"


def _apply(ctx: Context, scores: dict[str, Tensor], **extra) -> Outcome:
    masks = global_masks(scores, ctx.sparsity)
    apply_masks(ctx.model, masks)
    return Outcome(masks, extra=extra)


def snip(ctx: Context) -> Outcome:
    require_data(ctx.method, ctx.data, ctx.losses)
    return _apply(ctx, summed_scores(ctx.model, ctx.score or "snip", ctx.data, ctx.losses, ctx.batches,
                                     train_mode=True), score=ctx.score or "snip")


def random(ctx: Context) -> Outcome:
    gen = torch.Generator().manual_seed(ctx.seed)
    shapes = {param_name(n): effective_weight(m).shape for n, m in maskable_layers(ctx.model).items()}
    return _apply(ctx, {p: torch.rand(s, generator=gen) for p, s in shapes.items()}, seed=ctx.seed)


def magnitude(ctx: Context) -> Outcome:
    return _apply(ctx, summed_scores(ctx.model, "magnitude"), score="magnitude")


def surviving_magnitudes(model: nn.Module) -> dict[str, Tensor]:
    """|w| of every maskable weight; entries already pruned score −1, so they stay pruned."""
    out = {}
    for n, m in maskable_layers(model).items():
        w = effective_weight(m).abs()
        out[param_name(n)] = torch.where(m.weight_mask.bool(), w, torch.full_like(w, -1.0)) if is_masked(m) else w
    return out


@torch.no_grad()
def rewind_to(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Reset every tensor to ``state`` (a dense state dict); a masked layer gets ``state[weight] * mask``."""
    masked = {param_name(n): m for n, m in maskable_layers(model).items() if is_masked(m)}
    own = model.state_dict(keep_vars=True)
    for key, value in state.items():
        if key in masked:
            m = masked[key]
            m.weight_orig.copy_(value.to(m.weight_orig.device) * m.weight_mask)
            m.weight = m.weight_orig * m.weight_mask
        elif key in own:
            own[key].data.copy_(value.to(own[key].device))


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in dense_copy_of_state(model).items()}


def imp(ctx: Context) -> Outcome:
    """IMP rounds; with ``ctx.train.checkpoint`` each finished round is saved, and ``resume`` continues after it."""
    require_data(ctx.method, ctx.data, ctx.losses)
    rounds, steps = max(1, ctx.rounds), ctx.train.steps
    rewind_at = None if ctx.rewind is False else (0 if ctx.rewind is True else min(int(ctx.rewind), steps))
    snapshot = _snapshot(ctx.model) if rewind_at == 0 else None
    history, done = [], 0
    saved = load_progress(ctx.train, IMP_CHECKPOINT, ctx.model, ctx.data)
    if saved is not None:
        done, history, snapshot = int(saved["round"]), list(saved["history"]), saved["snapshot"]
    for r in range(done + 1, rounds + 1):
        loop = SparseLoop(ctx.model, ctx.data, ctx.losses, ctx.train)  # a fresh optimizer each round
        if r == 1 and rewind_at:
            loop.run(rewind_at)
            snapshot = _snapshot(ctx.model)
            loop.run(steps - rewind_at)
        else:
            loop.run()
        target = 1 - (1 - ctx.sparsity) ** (r / rounds)
        apply_masks(ctx.model, global_masks(surviving_magnitudes(ctx.model), target))
        if snapshot is not None:
            rewind_to(ctx.model, snapshot)
        history.append({"round": r, "sparsity": target, "last_losses": loop.history[-1] if loop.history else None})
        save_progress(ctx.train, IMP_CHECKPOINT, ctx.model, ctx.data, round=r, history=history, snapshot=snapshot)
    return Outcome(get_masks(ctx.model), history=history,
                   extra={"rounds": rounds, "rewind": rewind_at, "steps_per_round": steps})


def rigl(ctx: Context) -> Outcome:
    require_data(ctx.method, ctx.data, ctx.losses)
    run = dynamic_sparse_training(ctx.model, ctx.parts, ctx.sparsity, ctx.data, ctx.losses, ctx.train, ctx.schedule,
                                  per_task=False, seed=ctx.seed, on_update=ctx.on_update)
    return Outcome(get_masks(ctx.model), history=run.updater.history,
                   extra={"erk_densities": run.densities, "steps": run.loop.step,
                          "schedule": vars(ctx.schedule).copy()})
