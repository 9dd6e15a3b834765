"""Unstructured multi-task sparsification: DiSparse (Sun et al., CVPR 2022) static, pretrained and dynamic;
SNIP, random, magnitude, IMP/LTH and RigL baselines; ERK; mask analysis (task agreement per layer); storage.

Entry point: :func:`sparsify` (``mtprune.sparsify``). Masks are ``torch.nn.utils.prune`` masks (see ``masks.py``).
"""

from .api import METHODS, SparsityResult, sparsify
from .dynamic import DynamicSchedule
from .masks import apply_masks, get_masks, remove_masks
from .training import SparseTrainConfig

__all__ = ["METHODS", "DynamicSchedule", "SparseTrainConfig", "SparsityResult", "apply_masks", "get_masks",
           "remove_masks", "sparsify"]
