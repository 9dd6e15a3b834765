"""Suite ``quick``: a smoke test of the benchmark harness in about a minute, run by CI under pytest.

It runs the ``criteria`` suite at its ``small`` scale for three methods (l1, taylor and the Torch-Pruning
baseline) and the ``speed`` suite at its ``small`` scale, each into a sub-folder, and records how long each took.
The numbers mean nothing at this size; the point is that every stage of the full suites still runs end to end.
"""

from __future__ import annotations

import time

from ..utils.atomic import atomic_write_json
from .common import machine, results_dir

CRITERIA_METHODS = ["l1", "taylor", "Torch-Pruning magnitude"]


def run(scale: str = "small", out=None, threads: int | None = 1, resume: bool = False, **_) -> dict:
    from . import criteria, speed

    folder = results_dir("quick", out)
    seconds = {}
    start = time.perf_counter()
    crit = criteria.run(scale="small", out=folder / "criteria", threads=threads, resume=resume,
                        methods=CRITERIA_METHODS)
    seconds["criteria"] = time.perf_counter() - start
    start = time.perf_counter()
    spd = speed.run(scale="small", out=folder / "speed", threads=threads, resume=resume)
    seconds["speed"] = time.perf_counter() - start
    result = {"suite": "quick", "machine": machine(), "seconds": seconds,
              "criteria": crit["summary"], "speed": {k: v for k, v in spd.items() if k != "machine"}}
    atomic_write_json(folder / "results.json", result)
    return result
