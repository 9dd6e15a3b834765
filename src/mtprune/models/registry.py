"""Name -> builder registries for backbones, heads and whole models, and :func:`build_model`.

In the style of timm's registry: builders register themselves with a decorator and are looked up by name in
a dict. A registered backbone is also a model name: ``build_model("vgg16", tasks)`` puts one head per task on
it, of the backbone's default head type unless ``head=`` says otherwise. ``timm:<name>`` builds any timm model
as a backbone (optional extra). ``register_model`` adds a whole-model builder under a new name.

Every built model carries ``model.mtprune_spec = {"builder": name, "kwargs": {...}}``, JSON-serialisable, such
that ``build_model(spec["builder"], **spec["kwargs"])`` rebuilds the same architecture (same state_dict keys
and shapes). Saved models rebuild themselves this way.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from mtprune.utils.errors import MTPruneInputError

from .layers import check_width
from .multitask import MultiTaskModel

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone builder ``fn(width=..., **kwargs) -> nn.Module`` (with ``out_channels``) and its default head.

    A *family* entry (e.g. ``timm``) is reached as ``family:<model_name>``; the part after the colon is
    passed to the builder as ``model_name``.
    """

    fn: Callable[..., nn.Module]
    default_head: str
    family: bool = False


_BACKBONES: dict[str, BackboneEntry] = {}
_HEADS: dict[str, Callable[..., nn.Module]] = {}
_MODELS: dict[str, Callable[..., MultiTaskModel]] = {}


def _add(table: dict[str, Any], kind: str, name: str, value: Any) -> None:
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"{kind} name must be a non-empty string without ':', got {name!r}")
    if name in table or (table is not _HEADS and name in (_BACKBONES.keys() | _MODELS.keys())):
        raise ValueError(f"a {kind} or model named {name!r} is already registered")
    table[name] = value


def register_backbone(name: str, *, default_head: str, family: bool = False) -> Callable[[F], F]:
    """Decorator: register ``fn(width: float = 1.0, **kwargs) -> nn.Module`` as backbone ``name``."""

    def deco(fn: F) -> F:
        _add(_BACKBONES, "backbone", name, BackboneEntry(fn, default_head, family))
        return fn

    return deco


def register_head(name: str) -> Callable[[F], F]:
    """Decorator: register ``fn(in_channels: int, out_channels: int, **kwargs) -> nn.Module`` as head ``name``."""

    def deco(fn: F) -> F:
        _add(_HEADS, "head", name, fn)
        return fn

    return deco


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register a whole-model builder under ``name``.

    The builder is called as ``fn(tasks, width=..., head=..., head_kwargs=..., **kwargs)`` with ``tasks`` a
    ``dict[str, int]`` (name -> output channels) and must return a :class:`MultiTaskModel`.
    """

    def deco(fn: F) -> F:
        _add(_MODELS, "model", name, fn)
        return fn

    return deco


def list_backbones() -> list[str]:
    """Registered backbone names (family backbones shown as ``family:<name>``)."""
    return sorted(f"{k}:<name>" if e.family else k for k, e in _BACKBONES.items())


def list_heads() -> list[str]:
    """Registered head names."""
    return sorted(_HEADS)


def list_models() -> list[str]:
    """Every name :func:`build_model` accepts: registered models and backbones (``timm:<name>`` for timm)."""
    return sorted(set(_MODELS) | set(list_backbones()))


def _call(kind: str, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a builder after checking its arguments, so a wrong keyword is a clear input error."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as exc:
        raise MTPruneInputError(f"{kind} {name!r}: {exc}") from None
    return fn(*args, **kwargs)


def _accepts(fn: Callable[..., Any] | None, argument: str) -> bool:
    if fn is None:
        return False
    params = inspect.signature(fn).parameters.values()
    return any(p.name == argument or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _lookup_backbone(name: str) -> tuple[BackboneEntry, dict[str, Any]]:
    family, sep, member = name.partition(":")
    entry = _BACKBONES.get(family)
    if entry is not None and entry.family == bool(sep) and (member or not sep):
        return entry, ({"model_name": member} if sep else {})
    raise MTPruneInputError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")


def build_backbone(name: str, width: float = 1.0, **kwargs: Any) -> nn.Module:
    """Build backbone ``name``; the result has ``out_channels``."""
    entry, extra = _lookup_backbone(name)
    if extra.keys() & kwargs.keys():
        raise MTPruneInputError(f"backbone {name!r}: give the model name only after the colon")
    backbone = _call("backbone", name, entry.fn, width=check_width(width), **extra, **kwargs)
    if not isinstance(getattr(backbone, "out_channels", None), int):
        raise TypeError(f"backbone {name!r} does not expose an integer out_channels")
    return backbone


def build_head(name: str, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """Build head ``name`` mapping ``in_channels`` features to ``out_channels`` outputs."""
    fn = _HEADS.get(name)
    if fn is None:
        raise MTPruneInputError(f"unknown head {name!r}; available: {', '.join(list_heads())}")
    return _call("head", name, fn, in_channels, out_channels, **kwargs)


def _check_tasks(tasks: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise MTPruneInputError(
            f"tasks must be a non-empty mapping of task name to output channels, e.g. {{'seg': 13}}, got {tasks!r}"
        )
    for name, channels in tasks.items():
        if not isinstance(name, str) or not name:
            raise MTPruneInputError(f"task names must be non-empty strings, got {name!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise MTPruneInputError(f"task {name!r}: output channels must be a positive int, got {channels!r}")
    return dict(tasks)


def _json_roundtrip(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(spec, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise MTPruneInputError(f"model arguments must be JSON-serialisable (they are saved with it): {exc}") from None


def compose(
    backbone: str,
    tasks: Mapping[str, int],
    *,
    width: float = 1.0,
    head: str | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> MultiTaskModel:
    """Backbone ``backbone`` plus one head of type ``head`` per task (no ``mtprune_spec``; see build_model).

    The heads receive ``width`` too (when they take it), unless ``head_kwargs`` sets its own.
    """
    entry, _ = _lookup_backbone(backbone)
    tasks = _check_tasks(tasks)
    net = build_backbone(backbone, width, **backbone_kwargs)
    head_name = head if head is not None else entry.default_head
    hkw = dict(head_kwargs or {})
    if _accepts(_HEADS.get(head_name), "width"):
        hkw.setdefault("width", width)
    heads = {t: build_head(head_name, net.out_channels, c, **hkw) for t, c in tasks.items()}
    return MultiTaskModel(net, heads, tasks=list(tasks))


def build_model(
    name: str,
    tasks: Mapping[str, int],
    *,
    width: float = 1.0,
    head: str | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> MultiTaskModel:
    """Build zoo model ``name`` with one output head per task.

    Args:
        name: a name from :func:`list_models`: a backbone (``deeplab_resnet34``, ``vgg16``, ...), a registered
            model, or ``timm:<timm model name>``.
        tasks: task name -> output channels, e.g. ``{"seg": 13, "depth": 1, "normal": 3}``.
        width: channel multiplier for backbone and heads; ``1.0`` gives the papers' sizes.
        head: head type (see :func:`list_heads`); ``None`` takes the backbone's default.
        head_kwargs: extra arguments for every head (e.g. ``hidden``, ``dilations``, ``width``).
        **backbone_kwargs: extra arguments for the backbone (e.g. ``in_channels``, ``output_stride``).

    The returned model carries ``mtprune_spec`` (see the module docstring).
    """
    if not isinstance(name, str):
        raise MTPruneInputError(f"model name must be a string, got {type(name).__name__}")
    tasks = _check_tasks(tasks)
    width = check_width(width)
    if head_kwargs is not None and not isinstance(head_kwargs, Mapping):
        raise MTPruneInputError(f"head_kwargs must be a mapping, got {type(head_kwargs).__name__}")
    if head is not None and head not in _HEADS:
        raise MTPruneInputError(f"unknown head {head!r}; available: {', '.join(list_heads())}")
    custom = _MODELS.get(name)
    if custom is None:
        try:
            entry, _ = _lookup_backbone(name)
        except MTPruneInputError:
            raise MTPruneInputError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
        head = head if head is not None else entry.default_head
    kwargs = {"tasks": tasks, "width": width, "head": head, "head_kwargs": dict(head_kwargs or {}), **backbone_kwargs}
    spec = _json_roundtrip({"builder": name, "kwargs": kwargs})
    if custom is None:
        model = compose(name, **kwargs)
    else:
        model = _call("model", name, custom, **kwargs)
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model builder {name!r} returned {type(model).__name__}, not a MultiTaskModel")
    model.mtprune_spec = spec
    return model
