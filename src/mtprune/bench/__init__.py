"""Benchmark suites behind ``mtprune bench SUITE``: each writes JSON, PNG and a Markdown summary under
``benchmarks/results/<suite>/``. Ratios are always measured side by side in one process."""

from __future__ import annotations

from collections.abc import Callable

from ..utils.errors import MTPruneInputError


def _speed(**kw):
    from .speed import run

    return run(**kw)


def _disparse(scale: str = "cpu", out=None, threads: int | None = 1, **_):
    """DiSparse and its baselines at 50/70/90 % sparsity, 3 seeds (``mtprune.sparsity.benchmark``)."""
    from ..sparsity.benchmark import main

    argv = ["--threads", str(threads or 1)] + (["--out", str(out)] if out else [])
    if scale == "small":
        argv += ["--seeds", "0", "--sparsities", "0.9"]
    main(argv)
    return {"suite": "disparse2022", "scale": scale}


SUITES: dict[str, Callable[..., dict]] = {"speed": _speed, "disparse2022": _disparse}


def run_suite(name: str, **kw) -> dict:
    if name not in SUITES:
        raise MTPruneInputError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name](**kw)
