"""PAGCP: performance-aware global channel pruning as a budget allocator.

Ye, Zhang, Chen, Fan, Wang: "Performance-aware Approximation of Global Channel Pruning for Multitask CNNs",
TPAMI 2023 (arXiv 2303.11923); code: github HankYe/PAGCP (``prune/sensitivity.py``, ``compress.py``); METHODS.md
§5. Not a better filter score: a layer-by-layer allocation of the pruning budget under a constraint on **every
task's** loss, on top of any registered criterion. One round:

1. order the candidate layers by the MACs a probe removal saves: ascending when λ > 1, so the layers saving
   the most MACs get the largest θ (``theta.py``);
2. on the model masked so far, search each layer's ratio: the last trial ratio before some task's loss ratio
   exceeds ``1 + θ`` (``allocation.py``, with the masked loss probe of ``probe.py``); θ advances (×λ) only
   after a layer is pruned, and ``Π(1 + θ_j) = budget``;
3. keep the top-P layers (``ranking``: ours, or the authors' total loss increase ÷ MACs saved in sequence),
   prune them physically, fine-tune, repeat (``rounds.py``; ``report.py`` records each round).

The authors' README command (``compress.py --initial_rate 0.06 --initial_thres 6. --topk 0.8 --exp``) maps to
``PAGCPSettings(theta0=0.06, budget=6.0, top_p=0.8, ranking="total_loss")`` (``README_SETTINGS``), with the
19 trial ratios 0.05 … 0.95, L1 filter scores (``criterion="l1"``), the whole validation set as the probe set
(``held_out_batches`` = its number of batches) and full fine-tuning between rounds. mtprune's defaults are
smaller (``budget=1.1``, ``top_p=0.5``, θ_0 half the uniform per-layer allowance) because its models and
probe sets are small; see docs/pruning.md.

Modules: ``settings`` (the knobs), ``theta`` (θ schedule and pairing), ``macs`` (MACs without surgery), ``probe``
(masked loss probe and upstream cache), ``allocation`` (ratio search, top-P, target fitting), ``rounds`` (the
rounds, resumable), ``report`` (records and Markdown).
"""

from .allocation import LayerProbe, RatioSearch, fit_to_target, loss_ratios, probe_round, search_ratio, select_top
from .macs import MacsModel
from .probe import LossProbe, UpstreamCache, masked
from .report import PAGCPReport, RoundRecord, pagcp_markdown
from .rounds import pagcp, pagcp_schedule, prune_pagcp
from .settings import DEFAULT_RATIOS, RANKINGS, README_SETTINGS, PAGCPSettings
from .theta import Thresholds, probe_order, solve_lambda, theta_schedule

__all__ = [
    "DEFAULT_RATIOS", "RANKINGS", "README_SETTINGS", "LayerProbe", "LossProbe", "MacsModel", "PAGCPReport",
    "PAGCPSettings", "RatioSearch", "RoundRecord", "Thresholds", "UpstreamCache", "fit_to_target", "loss_ratios",
    "masked", "pagcp", "pagcp_markdown", "pagcp_schedule", "probe_order", "probe_round", "prune_pagcp",
    "search_ratio", "select_top", "solve_lambda", "theta_schedule",
]
