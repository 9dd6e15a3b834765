"""mtprune: compress multi-task neural networks and measure what it cost, task by task.

Public API (stable): ``build_model``, ``prune``, ``sparsify``, ``save``, ``load``, ``profile``, ``evaluate``,
``extract_tasks``, ``export_onnx``, ``tasks.preset``, ``data.load``.
"""

from __future__ import annotations

from . import data, tasks
from .engine.evaluate import evaluate
from .export import export_onnx, extract_tasks
from .io import load, save
from .measure import profile
from .models import build_model
from .pruning.prune import prune
from .sparsity import sparsify

__version__ = "0.1.0"

__all__ = ["build_model", "data", "evaluate", "export_onnx", "extract_tasks", "load", "profile", "prune", "save",
           "sparsify", "tasks"]
