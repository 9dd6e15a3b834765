"""The ``latency_quality`` suite runs at ``--scale small`` (a timed table of tiny layers; nothing asserted on times)."""

from __future__ import annotations

import json
import math

import pytest

from mtprune.bench import run_suite
from mtprune.bench.latency_quality import LATENCY_MATCH, judge, markdown


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
    # judged on the two pruned models' own per-round ratio, timed in the same rotation as the speed-ups
    assert row["latency_vs_macs"] > 0 and row["rounds"] >= 10
    assert row["latency_matched"] == (abs(1 / row["latency_vs_macs"] - 1) <= LATENCY_MATCH)
    assert row["latency_no_worse"] == ((b["delta_m"] >= a["delta_m"]) if row["latency_matched"] else None)
    assert saved["of"] + saved["unmatched"] == 1
    assert list((tmp_path / "latency_tables").glob("*.json"))


def _row(speedups: tuple[float, float], deltas: tuple[float, float], refused: bool = False) -> dict:
    a = {"measured_ms": 10.0, "speedup": speedups[0], "macs_kept": 0.25, "delta_m": deltas[0]}
    b = ({"refused": "latency target: below the latency floor"} if refused else
         {"measured_ms": 10.0, "speedup": speedups[1], "macs_kept": 0.4, "delta_m": deltas[1]})
    return {"target_macs": 0.25, "seed": 0, "dense_ms": 20.0, "equal_macs": a, "equal_latency": b}


def test_a_latency_model_off_its_target_gets_no_verdict():
    """Better Δm bought with latency is no evidence, nor worse Δm paid for with extra speed: a row counts only when
    the latency-targeted model runs within LATENCY_MATCH of the equal-MACs model's speed, either way."""
    slow = judge(_row((2.0, 2.0 * (1 - LATENCY_MATCH) - 0.01), (-3.0, -1.0)))
    assert slow["latency_matched"] is False and slow["latency_no_worse"] is None
    fair = judge(_row((2.0, 1.95), (-3.0, -1.0)))
    fair["equal_latency"]["prediction"] = {"candidates": {"chosen": "macs"}}  # the plan the target kept is named
    assert fair["latency_matched"] is True and fair["latency_no_worse"] is True
    worse = judge(_row((2.0, 2.08), (-1.0, -3.0)))
    assert worse["latency_matched"] is True and worse["latency_no_worse"] is False
    fast = judge(_row((2.0, 2.0 * (1 + LATENCY_MATCH) + 0.01), (-1.0, -3.0)))
    assert fast["latency_matched"] is False and fast["latency_no_worse"] is None
    refused = judge(_row((2.0, 0.0), (-1.0, 0.0), refused=True))
    assert refused["latency_matched"] is None and refused["latency_no_worse"] is None
    # with the direct ratio of the two pruned models (timed in one rotation) the verdict rests on it, not on the
    # quotient of their two speed-ups over dense
    direct = judge({**_row((2.0, 2.0), (-3.0, -1.0)), "latency_vs_macs": 1 + 2 * LATENCY_MATCH})
    assert direct["latency_matched"] is False and direct["latency_no_worse"] is None
    direct_fair = judge({**_row((2.0, 1.7), (-3.0, -1.0)), "latency_vs_macs": 1.02})
    assert direct_fair["latency_matched"] is True and direct_fair["latency_no_worse"] is True
    rows = [slow, fair, worse, refused, direct_fair]
    text = markdown({"scale": "cpu", "criterion": "task_taylor", "finetune_epochs": 6, "rows": rows,
                     "machine": {"threads": 2, "device": "cpu", "torch": "x", "date": "d"},
                     "no_worse": 1, "of": 2, "unmatched": 1, "refused": 1, "latency_match": LATENCY_MATCH})
    assert "in 1 of 2 matched rows; 1 rows not matched" in text and "| no | – |" in text
    assert "-1.00 (MACs ranking) | yes | yes |" in text
    assert "| yes (1.020) | yes |" in text
