"""``allocator: pagcp`` with a latency target in a run config (PAGCP, Ye et al., TPAMI 2023, ranked by a
HALP-style latency table, Shen et al., NeurIPS 2022): accepted by the config and carried through the pipeline to
the rounds. The latency table is injected (a function of the widths): no timing decides anything here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import mtprune.pruning.latency as latency_module
from helpers import tiny_run
from mtprune.config import parse_config
from mtprune.pipeline import compress
from mtprune.pruning.cost import LayerShape
from mtprune.utils.errors import MTPruneInputError

PAGCP = {"criterion": "l1", "allocator": "pagcp", "target_latency": 0.6, "latency": {"calibrate": False},
         "stats_batches": 1, "stats_batch_size": 6, "finetune": {"epochs": 0, "batch_size": 6},
         "pagcp": {"rounds": 3, "held_out_batches": 1, "budget": 1.5, "ratios": [0.25, 0.5, 0.75]}}


def table(layer: LayerShape, cin: int, cout: int) -> float:
    """A memory-bound device: a layer costs its output activations, whatever its input width."""
    return 1e-6 * math.prod(layer.out_shape) / layer.cout * cout * math.prod(layer.kernel or (1,))


def config(**prune):
    raw = tiny_run(prune={**PAGCP, **prune})
    raw["train"]["epochs"] = 1
    return parse_config(raw)


@pytest.mark.parametrize("target", [{"target_latency": 0.6}, {"target_latency_ms": 2.0}, {"target_macs": 0.5}])
def test_config_accepts_pagcp_with_a_latency_or_macs_target(target):
    p = config(**{"target_latency": None, **target}).prune
    assert p.allocator == "pagcp" and next(k for k in target) in p.model_dump(exclude_none=True)


@pytest.mark.parametrize("change", [{"target_latency": None, "target_params": 0.5},
                                    {"target_latency": None, "channel_ratio": 0.5, "schedule": "one_shot"},
                                    {"schedule": "interleaved"}])
def test_config_still_refuses_pagcp_without_a_macs_or_latency_target(change):
    with pytest.raises(MTPruneInputError, match="allocator 'pagcp' needs target_macs, target_latency or "
                                                "target_latency_ms|latency target needs schedule"):
        config(**change)


def test_pipeline_runs_pagcp_to_a_latency_target(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latency_module, "LatencyTable", lambda setting: table)  # every table lookup: no timing
    summary = compress(config(), tmp_path / "run", quiet=True)
    lat = summary["pagcp"]["latency"]
    assert lat["target"] == {"target_latency": 0.6}
    assert lat["goal_ms"] == pytest.approx(0.6 * lat["dense_ms"])
    assert lat["predicted_ms"] < lat["dense_ms"]  # the rounds pruned by the table's milliseconds
    assert lat["predicted_ms"] <= lat["goal_ms"] * 1.02 or summary["pagcp"]["reached"] is False
    rows = {row["name"]: row for row in summary["models"]}
    assert rows["pruned"]["macs"] < rows["dense"]["macs"]
