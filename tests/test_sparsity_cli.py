"""``mtprune sparsify CONFIG``: end to end on tiny synthetic data, and its config errors (exit code 2)."""

from __future__ import annotations

import json

import pytest
import yaml

import mtprune
from mtprune.cli import main
from mtprune.sparsity import get_masks

TINY = {
    "name": "tiny_sparse",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "synthetic_scenes", "augment": False,
             "kwargs": {"n_train": 12, "n_val": 6, "height": 32, "width": 40}},
    "tasks": {"preset": "synthetic_scenes", "names": ["seg", "normal"]},
    "model": {"name": "deeplab_resnet18", "width": 0.125, "head": "conv"},
    "train": {"epochs": 1, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6},
    "sparsify": {"method": "disparse_static", "sparsity": 0.9, "batches": 2, "batch_size": 6,
                 "dynamic": {"delta_t": 1}},
}


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def run(*args) -> int:
    return main(["--quiet", *map(str, args)])


def test_sparsify_static_end_to_end(config, tmp_path) -> None:
    out = tmp_path / "run"
    assert run("sparsify", config, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    sp = summary["sparsity"]
    assert abs(sp["sparsity"] - 0.9) <= 1e-3 and abs(sp["after_training"] - 0.9) <= 1e-3
    model = mtprune.load(out / "model.mtp")
    masks = get_masks(model)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(1 - kept - 0.9) <= 1e-3
    report = (out / "report.md").read_text()
    assert "storage, not time" in report and "Task agreement" in report
    assert (out / "plots" / "task_agreement.png").is_file()
    assert summary["latency"]["masked_ms"] > 0 and sp["storage"]["bitmask_bytes"] < sp["storage"]["dense_bytes"]
    (out / "report.md").unlink()  # `mtprune report` rewrites a sparsify run's report too
    assert run("report", out) == 0 and "Task agreement" in (out / "report.md").read_text()


def test_report_of_a_foreign_summary_exits_2(tmp_path, capsys) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"name": "x"}))
    assert run("report", tmp_path) == 2
    assert "not from a prune or sparsify run" in capsys.readouterr().err


def test_sparsify_dynamic_runs_past_t_end(config, tmp_path) -> None:
    out = tmp_path / "dyn"
    assert run("sparsify", config, "--out", out, "--set", "sparsify.method=disparse_dynamic",
               "--set", "sparsify.dynamic.t_end=3", "--set", "train.epochs=2") == 0
    sp = json.loads((out / "summary.json").read_text())["sparsity"]
    assert sp["extra"]["steps"] == 4 and abs(sp["sparsity"] - 0.9) <= 1e-3  # 4 iterations, T_end = 3
    assert [h["step"] for h in sp["history"]] == [1, 2]


def test_sparsify_config_errors_exit_2(config, tmp_path, capsys) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "sparsify"}))
    assert run("sparsify", bare, "--out", tmp_path / "a") == 2
    assert "no 'sparsify' section" in capsys.readouterr().err
    assert run("sparsify", config, "--out", tmp_path / "b", "--set", "sparsify.sparsity=1.5") == 2
    assert "sparsify.sparsity" in capsys.readouterr().err
    assert run("sparsify", config, "--out", tmp_path / "c", "--set", "sparsify.method=obd") == 2
    assert "sparsify.method" in capsys.readouterr().err
