"""``MultiTaskModel``: one shared backbone, one head per task, ``forward -> dict[task, Tensor]``.

The typed container of Vandenhende et al.'s MTL-PyTorch design: the heads are checked against the task names
when the model is built, and ``forward(x, tasks=[...])`` runs the backbone once and only the requested heads
(the cost of serving a task subset, as in PAM, He et al. 2021).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError

from .validate import check_task_names, find_predictors


def _module_dict(heads: Mapping[str, nn.Module] | nn.ModuleDict) -> nn.ModuleDict:
    if not isinstance(heads, Mapping | nn.ModuleDict):
        raise MTPruneInputError(f"heads must be a mapping of task name to nn.Module, got {type(heads).__name__}")
    if len(heads) == 0:
        raise MTPruneInputError("a multi-task model needs at least one head")
    out = nn.ModuleDict()
    for name, head in heads.items():
        if not isinstance(name, str) or not name or "." in name:
            raise MTPruneInputError(f"task names must be non-empty strings without '.', got {name!r}")
        if not isinstance(head, nn.Module):
            raise MTPruneInputError(f"head for task {name!r} must be an nn.Module, got {type(head).__name__}")
        try:
            out[name] = head
        except KeyError as exc:  # a name that clashes with a ModuleDict attribute, e.g. "keys"
            raise MTPruneInputError(f"{name!r} cannot be used as a task name: {exc}") from None
    return out


class MultiTaskModel(nn.Module):
    """A shared ``backbone`` followed by one head per task.

    Args:
        backbone: maps the input to a feature tensor ``[N, C, h, w]`` (or ``[N, C]``).
        heads: task name -> head module; each head maps the features to that task's output.
        tasks: if given, the head names must be exactly these (missing and extra names are reported).
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module] | nn.ModuleDict,
        tasks: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise MTPruneInputError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        heads = _module_dict(heads)
        if tasks is not None:
            tasks = [tasks] if isinstance(tasks, str) else list(tasks)
            check_task_names(heads.keys(), tasks, what="the heads")
        self.backbone = backbone
        self.heads = heads

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in head order."""
        return tuple(self.heads.keys())

    def _select(self, tasks: Sequence[str] | str | None) -> list[str]:
        if tasks is None:
            return list(self.heads.keys())
        names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise MTPruneInputError(f"unknown task(s) {unknown}; this model has {list(self.heads.keys())}")
        if not names:
            raise MTPruneInputError("tasks= selects no task; pass None to run all heads")
        return names

    def forward(self, x: Tensor, tasks: Sequence[str] | str | None = None) -> dict[str, Tensor]:
        """Run the backbone once, then the heads of ``tasks`` (all heads when ``None``)."""
        names = self._select(tasks)
        features = self.backbone(x)
        return {name: self.heads[name](features) for name in names}

    def predictors(self) -> dict[str, list[nn.Module]]:
        """Each task's output layers (see :func:`mtprune.models.validate.find_predictors`)."""
        return {name: find_predictors(head) for name, head in self.heads.items()}
