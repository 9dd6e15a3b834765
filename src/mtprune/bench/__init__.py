"""Benchmark suites behind ``mtprune bench SUITE``: each writes JSON, PNG and a Markdown summary under
``benchmarks/results/<suite>/``. Ratios are always measured side by side in one process.

Each suite is a module of this package with ``run(scale, out, threads, resume, **kw) -> dict``; ``SUITES`` maps
the suite name to its module, imported only when the suite runs.
"""

from __future__ import annotations

import importlib

from ..utils.errors import MTPruneInputError

SUITES: dict[str, str] = {
    "quick": "quick",
    "criteria": "criteria",
    "garg2023": "garg2023",
    "disparse2022": "disparse2022",
    "speed": "speed",
    "pam": "merge_suites",
    "mfis": "merge_suites",
}


def run_suite(name: str, **kw) -> dict:
    if name not in SUITES:
        raise MTPruneInputError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}")
    module = importlib.import_module(f"{__name__}.{SUITES[name]}")
    runner = getattr(module, f"run_{name}", None) or module.run
    return runner(**kw)
