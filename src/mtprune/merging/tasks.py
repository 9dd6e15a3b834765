"""The loss of PAM's presence testbeds: tanh outputs against ±1 targets with a mean-squared error.

PAM's code (He et al., KDD 2021; MrDavidG/PruneFramework, ``rdnet``) trains its LeNet-5 and VGG-16 networks on
±1 presence / attribute labels with ``tanh`` outputs and an MSE loss. The network still outputs raw scores (so
merging, pruning and the MAC counts see a plain linear output layer); the tanh is part of the loss, and an
output counts as "present" when it is positive, so the accuracy is the ordinary multi-label sign accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtprune.tasks import MultiLabelTask

__all__ = ["PresenceTask"]


class PresenceTask(MultiLabelTask):
    """Multi-label presence with targets in {-1, +1}: loss ``mean((tanh(pred) - target)²)``; accuracy in %."""

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return (torch.tanh(pred) - target.to(pred.dtype)).square().mean()
