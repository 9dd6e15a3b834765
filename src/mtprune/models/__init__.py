"""Multi-task models: ``MultiTaskModel`` (shared backbone + task heads), the zoo and its registry.

``build_model(name, tasks)`` builds a zoo model (see ``list_models()``); any user ``nn.Module`` whose forward
returns ``dict[str, Tensor]`` is accepted elsewhere too (``check_multitask_output`` / ``validate_model``).

Conventions of the zoo: ``width`` scales every channel count (1.0 = the papers' sizes); heads output at
feature resolution (losses and metrics upsample); each head names its output layers in ``predictor`` (pruning
protects them); activations are never in-place, so forward and backward hooks can read them safely.
"""

from . import backbones, heads  # noqa: F401  (registers the zoo)
from .multitask import MultiTaskModel
from .registry import (
    build_backbone,
    build_head,
    build_model,
    list_backbones,
    list_heads,
    list_models,
    register_backbone,
    register_head,
    register_model,
)
from .validate import check_multitask_output, find_predictors, validate_model

__all__ = [
    "MultiTaskModel",
    "build_backbone",
    "build_head",
    "build_model",
    "check_multitask_output",
    "find_predictors",
    "list_backbones",
    "list_heads",
    "list_models",
    "register_backbone",
    "register_head",
    "register_model",
    "validate_model",
]
