"""report.md explains a pruned row above dense instead of presenting it as a gain (issue 13)."""

import json

from mtprune.report.run_report import above_dense_note, write_run_report


def _metrics(path, scores):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"epoch": i + 1, "score": s}) + "\n" for i, s in enumerate(scores)))


def _rows(pruned_dm):
    setting = {"batch_size": 1, "threads": 1, "device": "cpu"}
    return [{"name": n, "metrics": {"seg": {"miou": 1.0}}, "delta_m": dm, "params": 1e6, "macs": 1e6,
             "latency_ms": 1.0, "setting": setting, "macs_per_subset": {"seg": 1e6}}
            for n, dm in (("dense", 0.0), ("pruned", pruned_dm))]


def test_note_names_extra_epochs_and_a_dense_model_still_improving(tmp_path):
    _metrics(tmp_path / "dense" / "metrics.jsonl", [0, 1, 2, 3, 4, 5, 6, 8])
    for step in (1, 2):
        _metrics(tmp_path / "prune" / "steps" / str(step) / "metrics.jsonl", [0, 0, 0])
    note = above_dense_note(tmp_path, _rows(1.5))
    assert "Δm +1.50 %" in note and "6 fine-tuning epochs" in note
    assert "still improving when its 8 epochs ended" in note and "rose by 3.00 over the last 2 epochs" in note


def test_no_plateau_claim_when_the_dense_model_had_stopped_improving(tmp_path):
    _metrics(tmp_path / "dense" / "metrics.jsonl", [0, 3, 5, 5, 4.9, 5])
    note = above_dense_note(tmp_path, _rows(0.4))
    assert note is not None and "still improving" not in note


def test_no_note_when_pruned_is_below_dense_and_the_report_carries_it_otherwise(tmp_path):
    assert above_dense_note(tmp_path, _rows(-2.0)) is None
    summary = {"tasks": {"seg": {"miou": 1}}, "models": _rows(2.0), "trajectory": [], "schedule": "oneshot",
               "criterion": "l1", "widths_before": {"a": 4}, "widths_after": {"a": 2}, "name": "t"}
    text = write_run_report(tmp_path, summary).read_text()
    assert "## Reading the table" in text and "no evidence that pruning helps" in text
