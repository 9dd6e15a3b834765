"""Benchmark suites behind ``mtprune bench SUITE``: each writes JSON, PNG and a Markdown summary under
``benchmarks/results/<suite>/``. Ratios are always measured side by side in one process.

Each suite is a module of this package with ``run(scale, out, threads, resume, **kw) -> dict``; ``SUITES`` maps
the suite name to its module, imported only when the suite runs.
"""

from __future__ import annotations

import importlib
import inspect

from ..utils.errors import MTPruneInputError

SUITES: dict[str, str] = {
    "quick": "quick",
    "criteria": "criteria",
    "garg2023": "garg2023",
    "disparse2022": "disparse2022",
    "speed": "speed",
    "pam": "merge_suites",
    "mfis": "merge_suites",
    "vit": "vit",
    "latency_quality": "latency_quality",
    "conformance": "conformance",
}
# One line per suite for ``mtprune bench --help``.
DESCRIPTIONS: dict[str, str] = {
    "quick": "smoke test of the harness (criteria and speed at small scale), about a minute",
    "criteria": "every structured-pruning criterion side by side on synthetic_scenes, Δm against MACs",
    "garg2023": "Garg et al. 2023: metric against parameters, iterative pruning against retraining from scratch",
    "disparse2022": "DiSparse (Sun et al. 2022) against its baselines at 50/70/90 % sparsity",
    "speed": "latency bought by removed MACs, sparse storage, and the statistics engine's time and memory",
    "pam": "PAM merging (He et al. 2021): presence testbeds (digits + LeNet-5, scene objects + VGG-16-BN; 3 seeds) "
           "and the left/right multidigits stress test",
    "mfis": "MFIS merging (Cheng et al. 2021) against PAM and no merging on the same networks",
    "latency_quality": "Δm at equal latency (latency target) against equal MACs, fine-tuned alike, criteria testbed",
    "conformance": "every criterion on every torchvision/timm model of the conformance list, against Torch-Pruning",
    "vit": "head-aware ViT pruning (l1, taylor) against Torch-Pruning's ViT recipe at equal MACs, on multidigits",
}
SCALES = ("small", "cpu", "gpu")  # every suite's --scale choices


def run_suite(name: str, **kw) -> dict:
    if name not in SUITES:
        raise MTPruneInputError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}")
    module = importlib.import_module(f"{__name__}.{SUITES[name]}")
    runner = getattr(module, f"run_{name}", None) or module.run
    for option in ("seeds", "gather", "pools"):
        if option in kw and option not in inspect.signature(runner).parameters:
            raise MTPruneInputError(f"bench {name}: this suite has no --{option} option")
    return runner(**kw)
