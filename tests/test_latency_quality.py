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
    # the latency target of the second model is the measured latency of the first
    assert b["prediction"]["goal_ms"] == pytest.approx(a["latency_ms"])
    assert b["prediction"]["predicted_ms"] <= b["prediction"]["goal_ms"] * 1.05
    for v in (a, b):
        assert math.isfinite(v["delta_m"]) and v["measured_ms"] > 0 and set(v["metrics"]) == {"seg", "depth", "normal"}
    assert row["latency_no_worse"] == (b["delta_m"] >= a["delta_m"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["of"] == 1 and "At equal latency" in (tmp_path / "results.md").read_text()
    assert list((tmp_path / "latency_tables").glob("*.json"))
