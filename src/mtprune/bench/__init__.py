"""Benchmark suites behind ``mtprune bench SUITE``: each writes JSON, PNG and a Markdown summary under
``benchmarks/results/<suite>/``. Ratios are always measured side by side in one process."""

from __future__ import annotations

from collections.abc import Callable

from ..utils.errors import MTPruneInputError


def _speed(**kw):
    from .speed import run

    return run(**kw)


SUITES: dict[str, Callable[..., dict]] = {"speed": _speed}


def run_suite(name: str, **kw) -> dict:
    if name not in SUITES:
        raise MTPruneInputError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name](**kw)
