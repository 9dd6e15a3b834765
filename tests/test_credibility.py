"""The criteria suite's credibility numbers (issue 13): Spearman ρ, split-half score stability, and the keys of
``credibility.json`` recomputed from tiny generated entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

import mtprune
from helpers import nyu_batches, zoo_model
from mtprune.bench.common import Entries
from mtprune.bench.credibility import (
    CONTROL,
    KEYS,
    credibility,
    read_entries,
    spearman,
    split_half_rank_corr,
    write_credibility,
)

LOSSES = mtprune.tasks.preset("nyuv2", num_classes=5)


def test_spearman_matches_scipy_with_ties_and_is_undefined_when_constant():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=gen).float()  # many ties
    b = a + torch.randn(40, generator=gen)
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-9)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.ones(5), torch.arange(5.0)) is None
    assert spearman(torch.arange(2.0), torch.arange(2.0)) is None


def test_split_half_is_one_for_a_data_free_criterion_and_bounded_for_taylor():
    model, x = zoo_model(), torch.rand(1, 3, 32, 40)
    batches = nyu_batches(4)
    l1 = split_half_rank_corr(model, x, "l1", batches, LOSSES)
    assert l1["batches_per_half"] == 2 and l1["per_group"]
    assert l1["median"] == pytest.approx(1.0)  # magnitude scores do not depend on the data
    taylor = split_half_rank_corr(model, x, "taylor", batches, LOSSES)
    values = [v for v in taylor["per_group"].values() if v is not None]
    assert values and all(-1.0 <= v <= 1.0 + 1e-9 for v in values)
    assert taylor["median"] < 0.999  # gradient scores from different random batches differ
    with pytest.raises(ValueError, match="at least 2 batches"):
        split_half_rank_corr(model, x, "taylor", batches[:1], LOSSES)


def _row(method, target, seed, tasks, pool="all", macs_kept=None):
    dm = sum(tasks.values()) / len(tasks)
    return {"method": method, "pool": "control" if method == CONTROL else pool, "target_macs": target,
            "seed": seed, "delta_m": dm, "task_delta": tasks, "macs_kept": target if macs_kept is None else macs_kept}


ROWS = [
    _row(CONTROL, 1.0, 0, {"seg": 1.0, "depth": -2.0}), _row(CONTROL, 1.0, 1, {"seg": 0.0, "depth": -1.0}),
    _row("random", 0.25, 0, {"seg": -4.0, "depth": 0.5}), _row("random", 0.25, 1, {"seg": -6.0, "depth": 1.5}),
    _row("taylor", 0.25, 0, {"seg": -1.0, "depth": 0.0}, "backbone"),
    _row("taylor", 0.25, 1, {"seg": 0.0, "depth": -1.0}, "backbone"),
    _row("taylor", 0.1, 0, {"seg": -3.0, "depth": -5.0}), _row("taylor", 0.1, 1, {"seg": -5.0, "depth": -3.0}),
    _row("l1", 0.1, 0, {"seg": -9.0, "depth": -9.0}),  # one seed only
    # stopped at MACs 0.17 (PAGCP's loss bound): not a model at 0.1, so not the best at 0.1
    _row("taylor + PAGCP", 0.1, 0, {"seg": -1.0, "depth": -1.0}, macs_kept=0.17),
    _row("taylor + PAGCP", 0.1, 1, {"seg": -1.0, "depth": -1.0}, macs_kept=0.102),
]
HALVES = [{"kind": "split_half", "criterion": "taylor", "seed": s, "median": m} for s, m in enumerate([0.8, 0.9, 0.7])]


def test_credibility_keys_from_rows():
    c = credibility(ROWS, HALVES)
    assert tuple(c) == KEYS
    assert c["control_max_abs_task_change_pct"] == pytest.approx(1.5)  # depth: mean of −2 and −1
    assert c["random_0.25_max_task_gain_pct"] == pytest.approx(1.0)  # depth: mean of 0.5 and 1.5
    # control means: seg +0.5, depth −1.5; taylor (backbone) seg −0.5 (−1.0), depth −0.5 (+1.0); random depth +2.5
    assert c["max_task_gain_over_control_0.25_pct"] == pytest.approx(2.5)
    assert c["best_delta_m_0.1_pct"] == pytest.approx(-4.0)  # taylor beats l1's −9; PAGCP's −1 missed the target
    assert c["seeds_min"] == 1  # the l1 cell
    assert c["score_split_half_rank_corr"] == {"taylor": pytest.approx(0.8)}
    empty = credibility([], [])
    assert empty["control_max_abs_task_change_pct"] is None and empty["seeds_min"] == 0


def test_written_file_matches_a_recomputation_from_the_entries(tmp_path):
    entries = Entries(tmp_path, resume=False)
    for i, row in enumerate(ROWS):
        entries.get(f"row{i}", lambda r=row: r, fingerprint="fp")
    for i, half in enumerate(HALVES):
        entries.get(f"half{i}", lambda h=half: h)
    entries.get("dense_s0", lambda: {"metrics": {}, "params": 1, "macs": 1})  # not a method row: skipped
    rows, halves = read_entries(tmp_path)
    assert len(rows) == len(ROWS) and len(halves) == len(HALVES)
    written = write_credibility(tmp_path, rows, halves)
    stored = json.loads((tmp_path / "credibility.json").read_text())
    assert stored == json.loads(json.dumps(credibility(ROWS, HALVES))) == json.loads(json.dumps(written))


def test_committed_credibility_is_recomputed_from_the_committed_entries_and_holds():
    """benchmarks/results/criteria/credibility.json: exactly what its stored entries give, and issue 13's bounds."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "criteria"
    stored = json.loads((folder / "credibility.json").read_text())
    assert stored == json.loads(json.dumps(credibility(*read_entries(folder))))
    assert abs(stored["control_max_abs_task_change_pct"]) <= 1.5
    assert stored["random_0.25_max_task_gain_pct"] <= 1.0
    assert stored["max_task_gain_over_control_0.25_pct"] <= 2.0
    assert stored["best_delta_m_0.1_pct"] <= -2.0
    assert stored["seeds_min"] >= 3
    assert all(stored["score_split_half_rank_corr"][c] >= 0.8 for c in ("taylor", "task_taylor", "cosprune"))
