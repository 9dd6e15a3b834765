"""``mtprune bench conformance`` at ``--scale small``: the model × criterion table, its refusal lines and counts,
and resuming from stored entries."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torchvision")

from mtprune.bench import conformance, run_suite  # noqa: E402

RESNET, VIT, SHUFFLE = conformance.SMALL_MODELS
REFUSAL = "Torch-Pruning cannot map the channels of TwoHeads"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance")
    return out, run_suite("conformance", scale="small", out=str(out), threads=1, resume=False)


def test_every_model_and_criterion_has_an_outcome(small) -> None:
    out, result = small
    stored = json.loads((out / "results.json").read_text())
    assert set(stored["models"]) == set(conformance.SMALL_MODELS)
    assert stored["settings"]["criteria"] == ["l1", "task_taylor"]
    for key in (RESNET, VIT):
        for crit, r in stored["models"][key]["criteria"].items():
            assert r["outcome"] == "ok", (key, crit, r)
            assert abs(r["macs_kept"] - 0.5) <= 0.1, (key, crit, r["macs_kept"])
            assert r["load_max_diff"] <= conformance.ATOL
    assert stored["models"][RESNET]["torch_pruning"]["prunes"]
    assert stored["models"][VIT]["torch_pruning"]["prunes"], "Torch-Pruning's torchvision ViT recipe prunes it"
    tp = stored["models"][SHUFFLE]["torch_pruning"]
    assert not tp["prunes"] and tp["stage"] == "prune"
    for r in stored["models"][SHUFFLE]["criteria"].values():
        assert r["outcome"] == "refused" and r["message"].startswith(REFUSAL)
        assert r["one_line"] and r["unchanged"]
    assert stored["summary"]["tp_prunes"] == 2 and stored["summary"]["tp_prunes_and_every_criterion_ok"] == 2
    assert stored["summary"]["tp_prunes_no_failure"] == 2 and stored["summary"]["errors"] == []


def test_markdown_table_shows_refusal_lines_and_counts(small) -> None:
    out, _ = small
    md = (out / "results.md").read_text()
    assert "**2 of 2 models TP prunes are pruned here with every criterion**" in md
    assert "| model | TP | l1 | task_taylor |" in md
    assert f"| `{RESNET}` | ✓ | ✓ 0." in md
    assert f"| `{SHUFFLE}` | ✗ (T1) | refused (R1) | refused (R1) |" in md
    assert f"- R1: {REFUSAL}" in md and "- T1: prune: ZeroDivisionError" in md
    assert "mtprune bench conformance --scale small --threads 1 --resume" in md


def test_resume_reuses_entries(small, monkeypatch) -> None:
    out, result = small

    def boom(*_):
        raise AssertionError("a stored entry was recomputed")

    monkeypatch.setattr(conformance, "prune_check", boom)
    monkeypatch.setattr(conformance, "tp_check", boom)
    again = run_suite("conformance", scale="small", out=str(out), threads=1, resume=True)
    assert again["models"] == result["models"]


def test_errors_are_listed_with_their_stage() -> None:
    ok = {"outcome": "ok", "macs_kept": 0.5}
    bad = {"outcome": "error", "stage": "load", "message": "outputs differ by 0.1 after save/load"}
    tp = {"prunes": True}
    grid = {("m", "l1"): ok, ("m", "taylor"): bad}
    summary = conformance.summary({"m": tp}, grid, ["m"], ["l1", "taylor"])
    assert summary["tp_prunes_not_every_criterion_ok"] == ["m"] and summary["errors"] == ["m taylor"]
    assert summary["tp_prunes_no_failure"] == 0
    result = {"command": "cmd", "machine": {"date": "d"}, "versions": {}, "summary": summary,
              "settings": {"criteria": ["l1", "taylor"], "target_macs": 0.5, "min_channels": 2, "batches": 2,
                           "atol": 1e-5, "tp_ratio": 0.3},
              "models": {"m": {"torch_pruning": tp, "criteria": {"l1": ok, "taylor": bad}}}}
    md = conformance.markdown(result)
    assert "**0 of 1 models TP prunes are pruned here with every criterion**" in md
    assert "| `m` | ✓ | ✓ 0.50 | ✗ (E1) |" in md and "- E1: load: outputs differ by 0.1" in md
