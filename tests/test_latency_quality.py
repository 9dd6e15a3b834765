"""The ``latency_quality`` suite runs at ``--scale small`` (a timed table of tiny layers; nothing asserted on times)."""

from __future__ import annotations

import json
import math

import pytest

from mtprune.bench import run_suite


@pytest.mark.slow
def test_latency_quality_small(tmp_path):
    result = run_suite("latency_quality", scale="small", out=str(tmp_path), threads=1, resume=False)
    (row,) = result["rows"]
    a, b = row["equal_macs"], row["equal_latency"]
    assert row["target_macs"] == 0.5 and abs(a["macs_kept"] - 0.5) <= 0.01
    assert 0 < a["latency_ratio"] < 1.5  # measured beside the dense model
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "At equal latency" in (tmp_path / "results.md").read_text()
    if "refused" in b:  # the tiny model is mostly per-call overhead: its floor can lie above the MACs model
        assert ("latency floor" in b["refused"] or "target_latency must be in (0, 1)" in b["refused"])
        assert row["latency_no_worse"] is None
        assert saved["of"] == 0 and saved["refused"] == 1
        return
    # the latency target of the second model is the first one's latency ratio
    assert b["prediction"]["goal_ms"] == pytest.approx(a["latency_ratio"] * b["prediction"]["dense_measured_ms"])
    for v in (a, b):
        assert math.isfinite(v["delta_m"]) and v["measured_ms"] > 0 and set(v["metrics"]) == {"seg", "depth", "normal"}
    assert row["latency_no_worse"] == (b["delta_m"] >= a["delta_m"])
    assert saved["of"] == 1
    assert list((tmp_path / "latency_tables").glob("*.json"))
