"""The ``garg2023`` suite (Garg et al. 2023, METHODS.md §1) at ``--scale small``: both criteria along the interleaved
schedule (backbone filters only, equal parameters removed at every step) beside the control, the scratch
retrainings at the recorded widths with the epochs of each arm, the verdicts, the figures, and resuming."""

import json

import pytest

from mtprune.bench import garg2023, run_suite
from mtprune.utils.errors import MTPruneInputError


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("garg2023")
    return out, run_suite("garg2023", scale="small", out=str(out), threads=1)


def test_both_criteria_prune_backbone_filters_along_the_interleaved_schedule(small):
    out, result = small
    saved = json.loads((out / "results.json").read_text())
    plan = garg2023.SCALES["small"]
    assert set(saved["trajectories"]) == {"taylor", "cosprune", "control"}
    control = saved["trajectories"].pop("control")[0]["trajectory"]
    assert len(control) == plan["steps"] + 1  # evaluated at the same steps, nothing removed
    assert all(p["widths"] == control[0]["widths"] for p in control)
    assert control[-1]["metrics"] != control[0]["metrics"]  # trained on
    removed = {}
    dense_params = saved["dense"]["0"]["params"]
    dense_epochs = saved["config"]["train"]["epochs"]
    per_epoch = -(-saved["n_train"] // saved["config"]["train"]["batch_size"])
    for crit, runs in saved["trajectories"].items():
        traj = runs[0]["trajectory"]
        params = [p["params"] for p in traj]
        assert len(params) == plan["steps"] + 1, crit
        assert params[0] == dense_params
        # each step removes the same share of the dense parameters, whichever filters the criterion picks
        assert [p / dense_params for p in params] == pytest.approx(
            [1 - k * plan["params_per_step"] for k in range(len(params))], abs=0.01)
        assert all(b < a for a, b in zip(params, params[1:], strict=False)), (crit, params)
        first, last = traj[0], traj[-1]
        assert first["delta_m"] == pytest.approx(0.0, abs=1e-9)  # step 0 is the dense model itself
        # only backbone filters are pruned: every head keeps its hidden width
        heads = {k: v for k, v in last["widths"].items() if k.startswith("heads.")}
        assert heads and heads == {k: v for k, v in first["widths"].items() if k.startswith("heads.")}
        removed[crit] = sum(first["widths"][k] - last["widths"][k] for k in first["widths"])
        for k, point in enumerate(traj[1:], 1):
            # removal k after k intervals of training, measured after the interval that follows it (recovered),
            # recorded as epochs on top of the dense ones; right after the removal it is worth less
            assert point["iteration"] == (k + 1) * plan["interval"]
            assert point["epochs"] == pytest.approx(dense_epochs + point["iteration"] / per_epoch)
            assert point["pruned_metrics"] != point["metrics"]
    assert removed["taylor"] != removed["cosprune"]  # equal parameters, not equal filter counts
    assert result["verdicts"]["a"]["control_delta_m"] == result["summary"]["control"][-1]["delta_m"]


def test_scratch_rows_rebuild_the_recorded_architectures(small):
    out, result = small
    rows = result["scratch"]
    assert {r["criterion"] for r in rows} == {"taylor", "cosprune"}
    for row in rows:
        assert row["step"] in garg2023.SCALES["small"]["scratch_steps"]
        assert row["params"] == row["iterative"]["params"]  # same architecture, fresh weights
        assert set(row["metrics"]) == {"seg", "depth", "normal"}
        assert row["epochs"] == result["config"]["train"]["epochs"]  # the dense recipe
        assert row["iterative"]["epochs"] > row["epochs"]
    assert set(result["scratch_summary"]) == {"taylor", "cosprune"}


def test_verdicts_figures_and_markdown(small):
    out, result = small
    for name in ("a_metric_vs_params.png", "b_scratch_vs_iterative.png"):
        assert (out / name).stat().st_size > 10_000
    md = (out / "results.md").read_text()
    a, b = result["verdicts"]["a"], result["verdicts"]["b"]
    assert f"Finding (a) {'holds' if a['holds'] else 'does not hold here'}." in md
    # (b)'s verdict follows the numbers it reports (one seed at this scale: mean = the seed)
    per = b["per_criterion"]
    better = [c for c, v in per.items() if v["scratch_pixel_acc"][0] > v["iterative_pixel_acc"][0]
              and v["scratch_delta_m"][0] > v["iterative_delta_m"][0]]
    assert b["holds_for"] == better and b["holds"] == (len(better) == 2)
    expected = "holds." if b["holds"] else "holds for" if better else "does not hold here."
    assert f"Finding (b) {expected}" in md
    # (a)'s verdict: CosPrune must beat Taylor at the last step on both numbers for it to hold
    if a["seeds_cosprune_higher_delta_m"] == 0 or a["seeds_cosprune_higher_pixel_acc"] == 0:
        assert not a["holds"]


def test_resume_reuses_finished_entries(small, tmp_path):
    out, result = small
    entry = out / "entries" / "s0_taylor.json"
    stored = json.loads(entry.read_text())
    stored["trajectory"][-1]["metrics"]["seg"]["pixel_acc"] = 1234.5  # a marker only a reused entry carries
    entry.write_text(json.dumps(stored))
    again = garg2023.run(scale="small", out=str(out), threads=1, resume=True)
    assert again["trajectories"]["taylor"][0]["trajectory"][-1]["metrics"]["seg"]["pixel_acc"] == 1234.5
    strip = lambda rows: [{k: v for k, v in r.items() if k != "iterative"} for r in rows]  # noqa: E731
    assert strip(again["scratch"]) == strip(result["scratch"])  # the scratch models are reused ...
    taylor = [r for r in again["scratch"] if r["criterion"] == "taylor"][-1]  # ... against the current trajectory
    assert taylor["iterative"]["metrics"]["seg"]["pixel_acc"] == 1234.5


def test_resume_with_another_schedule_reruns_instead_of_reusing_the_run_directories(small, monkeypatch):
    """A changed schedule makes new entries, and their run directories are cleared, not resumed: resuming the
    old directory returned the old trajectory under the new fingerprint."""
    out, result = small
    step = garg2023.SCALES["small"]["params_per_step"] - 0.05
    monkeypatch.setitem(garg2023.SCALES["small"], "params_per_step", step)
    again = garg2023.run(scale="small", out=str(out), threads=1, resume=True)
    for crit in garg2023.CRITERIA:
        traj = again["trajectories"][crit][0]["trajectory"]
        assert traj[1]["params"] / traj[0]["params"] == pytest.approx(1 - step, abs=0.01), crit


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(MTPruneInputError, match="scale"):
        garg2023.run(scale="huge", out=str(tmp_path))
