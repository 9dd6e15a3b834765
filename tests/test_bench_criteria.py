"""The criteria benchmark's parts: the Torch-Pruning baseline, the summary and its findings, resumable entries;
and the ``quick`` suite end to end (the CI smoke test of the benchmark harness)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import zoo_model
from mtprune.bench import criteria, run_suite
from mtprune.bench.common import Entries, fingerprint
from mtprune.bench.credibility import credibility, read_entries
from mtprune.pruning.graph import PruningGraph, torch_pruning_magnitude
from mtprune.pruning.prune import count
from mtprune.utils.errors import MTPruneInputError
from test_reliability_resume import kill_after_progress, launch


def test_torch_pruning_baseline_prunes_uniformly_and_keeps_predictors():
    model, x = zoo_model(), torch.rand(1, 3, 32, 40)
    graph = PruningGraph(model, x)
    before = graph.widths()
    heads = {n: m.out_channels for n, m in model.named_modules() if n in graph.protected}
    model.train()
    torch_pruning_magnitude(model, x, 0.5)
    assert model.training  # Torch-Pruning traces in eval mode; the adapter restores train mode
    after = PruningGraph(model, x).widths()
    assert after.keys() == before.keys()
    shrunk = [after[k] / before[k] for k in before if before[k] >= 8]
    assert shrunk and all(0.4 <= r <= 0.6 for r in shrunk)  # one ratio for every layer
    modules = dict(model.named_modules())
    assert {n: modules[n].out_channels for n in heads} == heads  # predictors keep their outputs
    out = model(x)
    assert out["seg"].shape[1] == 5 and out["normal"].shape[1] == 3


def test_torch_pruning_baseline_reaches_a_macs_target():
    model, x = zoo_model(), torch.rand(1, 3, 32, 40)
    _, macs0 = count(model, x)
    ratio = criteria._tp_to_macs(model, x, 0.5)
    assert 0 < ratio < 0.95
    assert abs(count(model, x)[1] / macs0 - 0.5) < 0.05


def test_bad_ratio_is_refused():
    from mtprune.utils.errors import MTPruneInputError

    with pytest.raises(MTPruneInputError, match="pruning_ratio"):
        torch_pruning_magnitude(zoo_model(), torch.rand(1, 3, 32, 40), 1.0)


def _row(method, target, seed, dm, tasks):
    return {"method": method, "target_macs": target, "seed": seed, "delta_m": dm, "delta_m_before_finetune": dm - 5,
            "macs_kept": target, "params_kept": target, "task_delta": tasks}


def test_summary_statistics_best_method_and_findings():
    rows = [_row("taylor", 0.25, s, dm, {"a": dm - 1, "b": dm + 1}) for s, dm in enumerate([-1.0, -2.0, -3.0])]
    rows += [_row(criteria.TP_BASELINE, 0.25, s, dm, {"a": dm, "b": dm}) for s, dm in enumerate([-6.0, -7.0, -8.0])]
    rows += [_row("taylor", 0.5, 0, -0.5, {"a": -0.5, "b": -0.5}), _row("l1", 0.25, 0, 5.0, {"a": 5.0, "b": 5.0})]
    s = criteria.summarise(rows)
    cell = s["taylor"]["0.25"]
    assert cell["seeds"] == 3
    assert cell["delta_m"] == pytest.approx((-2.0, 1.0))  # mean, sample std
    assert cell["worst_task"] == pytest.approx((-3.0, 1.0))
    # l1 is not a multi-task criterion: it cannot be "the best multi-task criterion"
    assert criteria.best_method(s, 0.25) == "taylor"
    text = "\n".join(criteria.findings({"summary": s}))
    assert "At MACs 0.5, the best multi-task criterion (taylor) has Δm -0.50 %: it meets" in text
    assert "At MACs 0.25, the best multi-task criterion (taylor) has Δm -2.00 %: it meets" in text
    assert "beats Torch-Pruning's magnitude baseline by +5.00 points of Δm, more than the seed noise (1.00)" in text
    # a method that stopped above its MACs target is marked in the tables and is never "the best"
    missed = [{**_row("taylor + PAGCP", 0.25, s, 1.0, {"a": 1.0, "b": 1.0}), "macs_kept": 0.4} for s in (0, 1)]
    s = criteria.summarise(rows + missed)
    assert s["taylor + PAGCP"]["0.25"]["missed_target"] == 2 and criteria.best_method(s, 0.25) == "taylor"
    assert "✗ (2 of 2 stopped above the target: MACs 0.400)" in criteria._cell(s["taylor + PAGCP"]["0.25"])
    assert "✗" not in criteria._cell(s["taylor"]["0.25"])


def test_entries_resume_only_when_asked(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"n": len(calls)}

    assert Entries(tmp_path, resume=True).get("a b", work) == {"n": 1}
    assert Entries(tmp_path, resume=True).get("a b", work) == {"n": 1}  # stored: not rerun
    assert Entries(tmp_path, resume=False).get("a b", work) == {"n": 2}  # without --resume: rerun
    assert len(calls) == 2
    assert json.loads(Entries(tmp_path, resume=True).path("a b").read_text()) == {"n": 2}


def test_entries_with_a_fingerprint_are_reused_only_under_the_same_settings(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"n": len(calls)}

    assert Entries(tmp_path, resume=True).get("k", work, "A") == {"n": 1, "fingerprint": "A"}
    assert Entries(tmp_path, resume=True).get("k", work, "A")["n"] == 1  # same settings: reused
    assert Entries(tmp_path, resume=True).get("k", work, "B") == {"n": 2, "fingerprint": "B"}  # other: recomputed
    assert fingerprint(1, {"a": 2}) == fingerprint(1, {"a": 2}) != fingerprint(1, {"a": 3})


def test_gradient_criteria_and_entry_keys():
    assert criteria.gradient_criteria(["random", "l1", "taylor", "taylor, mean-normalised", "taylor + PAGCP",
                                       "cosprune", criteria.TP_BASELINE]) == ["taylor", "cosprune"]
    assert criteria._entry_key("taylor", 0.25, 1, "all") == "taylor_0.25_s1"  # the pre-pool key of a row
    assert criteria._entry_key("taylor", 0.25, 1, "backbone") == "backbone_taylor_0.25_s1"
    with pytest.raises(MTPruneInputError, match="candidate pool"):
        criteria.run(scale="small", pools=("heads",))


def test_unknown_suite_is_an_input_error():
    from mtprune.utils.errors import MTPruneInputError

    with pytest.raises(MTPruneInputError, match="unknown benchmark suite 'nope'"):
        run_suite("nope")


@pytest.mark.quick_bench
def test_quick_suite_runs_every_stage(tmp_path, env):
    reference = tmp_path / "reference"
    result = run_suite("quick", out=reference, threads=1)
    summary = result["criteria"]
    assert set(summary) == {"l1", "taylor", criteria.TP_BASELINE, criteria.DENSE_FT}
    assert summary[criteria.DENSE_FT]["1.0"]["macs_kept"] == 1.0  # the control is not pruned
    for method, cells in summary.items():
        if method == criteria.DENSE_FT:
            continue
        assert abs(cells["0.5"]["macs_kept"] - 0.5) < 0.05, method
        assert all(abs(v[0]) < 1e6 for v in cells["0.5"]["task_delta"].values())
    for name in ("results.json", "criteria/results.md", "criteria/delta_m_vs_macs.png", "speed"):
        assert (reference / name).exists(), name
    # the backbone-only table has every criterion but not Torch-Pruning's baseline (it prunes every layer)
    crit = json.loads((reference / "criteria" / "results.json").read_text())
    assert set(crit["summary_backbone"]) == {"l1", "taylor", criteria.DENSE_FT}
    backbone = [r for r in crit["rows"] if r["pool"] == "backbone"]
    assert backbone and all(w == r0 for r in backbone for k, w in r["widths"].items() if k.startswith("heads.")
                            for r0 in [crit["rows"][0]["widths"][k]])  # the control row: the dense widths
    # credibility.json is exactly what the entries give; taylor's split-half score stability is measured
    stored_cred = json.loads((reference / "criteria" / "credibility.json").read_text())
    assert stored_cred == json.loads(json.dumps(credibility(*read_entries(reference / "criteria"))))
    assert set(stored_cred["score_split_half_rank_corr"]) == {"taylor"} and stored_cred["seeds_min"] == 1
    # the dense reference is settled by one cycle of the suite's fine-tuning after its own training
    dense_entry = json.loads((reference / "criteria" / "entries" / "dense_s0.json").read_text())
    assert set(dense_entry["settle_task_delta"]) == set(dense_entry["metrics"]) != set()
    assert dense_entry["trained_metrics"] != dense_entry["metrics"]
    assert (reference / "criteria" / "runs" / "dense_s0" / "trained.mtp").is_file()
    stored = json.loads((reference / "results.json").read_text())
    assert stored["seconds"]["criteria"] > 0
    # resuming reuses every finished entry: the summary is identical and nothing retrains
    again = run_suite("quick", out=reference, threads=1, resume=True)
    assert again["criteria"] == summary
    assert again["seconds"]["criteria"] < result["seconds"]["criteria"]
    # a real `mtprune bench quick` process, SIGKILLed twice after it finished an entry, then resumed: same results
    run, log, rng, kills = tmp_path / "run", tmp_path / "stderr.log", random.Random(3), 0
    entries = run / "criteria" / "entries"
    for attempt in range(2):
        before = set(entries.glob("*.json")) if entries.is_dir() else set()
        proc = launch(env, log, "bench", "quick", "--out", run, "--threads", "1", *(["--resume"] if attempt else []))
        progressed = lambda b=before: entries.is_dir() and bool(set(entries.glob("*.json")) - b)  # noqa: E731
        kills += kill_after_progress(proc, progressed, rng.uniform(0.0, 1.0))
    assert kills >= 1, "the suite finished before it could be killed"
    proc = launch(env, log, "bench", "quick", "--out", run, "--threads", "1", "--resume")
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert json.loads((run / "results.json").read_text())["criteria"] == json.loads(json.dumps(summary))


def test_gather_writes_partial_tables_from_finished_entries_and_runs_nothing(tmp_path):
    out = tmp_path / "criteria"
    criteria.run(scale="small", out=out, threads=1, methods=["l1"], pools=("all",))
    entries = out / "entries"
    (entries / "l1_0.5_s0.json").unlink()  # as if the suite had been stopped before this entry
    before = sorted(p.name for p in entries.glob("*.json"))
    result = criteria.run(scale="small", out=out, threads=1, methods=["l1"], pools=("all",), gather=True)
    assert sorted(p.name for p in entries.glob("*.json")) == before  # nothing ran
    assert result["partial"] and [r["method"] for r in result["rows"]] == [criteria.DENSE_FT]
    assert "**Partial** (`--gather`): the 1 method entries finished so far" in (out / "results.md").read_text()
    for name in before:
        (entries / name).unlink()
    with pytest.raises(MTPruneInputError, match="criteria --gather: no finished entries"):
        criteria.run(scale="small", out=out, threads=1, methods=["l1"], pools=("all",), gather=True)


def test_split_half_second_decision_reads_scenes_the_first_never_saw(tmp_path, monkeypatch):
    """The two decisions of the split-half ρ must not share scenes (version 2 read the stored pool twice), and a
    criterion that needs more batches than the pool holds reads fresh epochs after it."""
    setup = criteria._Setup(criteria._config("small", 0), tmp_path)
    setup.train_set.transform = None  # compare the scenes themselves, not their random crops
    per_epoch = len(setup.train_set) // criteria.STATS_BATCH_SIZE
    monkeypatch.setitem(criteria.CRITERION_BATCHES, "cosprune", per_epoch + 1)  # spans two epochs
    first = list(setup.decision_data("cosprune"))
    second = list(setup.decision_data("cosprune", second=True))
    assert len(first) == len(second) == per_epoch + 1
    images = [torch.cat([b[0] for b in part]) for part in (first, second)]
    assert torch.equal(images[0][: len(setup.train_set)],  # the pool first, as every entry reads it
                       torch.cat([b[0] for b in setup.stats_data()]))
    for image in images[1]:
        assert (images[0] - image).flatten(1).abs().amax(1).min() > 0.1  # no scene of the first decision again
    within = images[0].flatten(1)
    assert (within[: len(setup.train_set)] - within[-1]).abs().amax(1).min() > 0.1  # the extra batch is fresh
    assert setup.train_set.epoch == 0  # left as every entry expects it
    assert setup.decision_data("taylor") is not None and criteria.stats_batches("taylor") == criteria.STATS_BATCHES


def test_the_suites_decision_sizes_are_the_library_defaults():
    """The suite's evidence set ``Criterion.stable_samples``: the two must not drift apart."""
    from mtprune.pruning.criteria import get_criterion

    for name in ("taylor", "task_taylor", "disparse_structured", "cosprune"):
        assert criteria.stats_batches(name) * criteria.STATS_BATCH_SIZE == get_criterion(name).stable_samples, name
