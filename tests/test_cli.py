"""The ``mtprune`` command: exit codes, config validation, train → evaluate → resume, prune → profile → report."""

import json
import subprocess
import sys

import pytest
import yaml

from helpers import tiny_run
from mtprune.cli import main
from mtprune.config import load_config

TINY = tiny_run(train={"epochs": 2, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6})


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def run(*args):
    return main(["--quiet", *map(str, args)])


def test_bad_config_key_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "learning_rate": 1}}))
    assert run("train", bad, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.learning_rate" in err[0] and "unknown key" in err[0]


@pytest.mark.parametrize(("override", "key"), [("train.lr=-1", "train.lr"), ("train.epochs=many", "train.epochs"),
                                                ("model.width=0", "model.width")])
def test_bad_values_are_named(tiny_config, tmp_path, capsys, override, key):
    assert run("train", tiny_config, "--set", override, "--out", tmp_path / "r") == 2
    assert key in capsys.readouterr().err


def test_prune_section_needs_exactly_one_target(tiny_config):
    with pytest.raises(ValueError, match="exactly one"):
        load_config(tiny_config, ["prune.criterion=l1"])
    with pytest.raises(ValueError, match="prune.target_macs"):
        load_config(tiny_config, ["prune.target_macs=1.5"])


def test_missing_config_and_unknown_dataset(tmp_path, tiny_config, capsys):
    assert run("train", tmp_path / "nope.yaml") == 2
    assert "not found" in capsys.readouterr().err
    assert run("train", tiny_config, "--set", "data.name=imagenet", "--out", tmp_path / "r") == 2
    assert "imagenet" in capsys.readouterr().err


def test_train_evaluate_and_refuse_to_overwrite(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", tiny_config, "--out", out) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["epoch"] == 2
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "config.yaml").is_file()
    assert run("evaluate", out) == 0
    scores = json.loads((out / "eval_val.json").read_text())
    assert set(scores) == {"seg", "depth"} and 0 <= scores["seg"]["miou"] <= 100
    before = (out / "metrics.jsonl").read_text()
    assert run("train", tiny_config, "--out", out) == 2  # exists: refused, nothing touched
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    # resume with more epochs continues from epoch 3
    assert run("train", tiny_config, "--out", out, "--resume", "--set", "train.epochs=3") == 0
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_prune_profile_report(tiny_config, tmp_path):
    out = tmp_path / "prune"
    code = run("prune", tiny_config, "--out", out, "--set", "train.epochs=1", "--set", "prune.criterion=taylor",
               "--set", "prune.target_macs=0.5", "--set", "prune.steps=2", "--set", "prune.stats_batches=1",
               "--set", "prune.finetune.epochs=1", "--set", "prune.finetune.batch_size=6")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    pruned = next(r for r in summary["models"] if r["name"] == "pruned")
    dense = next(r for r in summary["models"] if r["name"] == "dense")
    assert abs(pruned["macs"] / dense["macs"] - 0.5) < 0.02 * 0.5
    assert [r["step"] for r in summary["trajectory"]] == [0, 1, 2]
    assert (out / "report.md").is_file() and (out / "plots" / "widths.png").is_file()
    assert (out / "plots" / "width_trajectory.png").is_file()  # the widths at every step of the schedule
    assert "plots/width_trajectory.png" in (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert run("report", out) == 0 and "pruned" in (out / "report.md").read_text()
    assert run("profile", out / "model.mtp", "--json", tmp_path / "p.json") == 0
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["macs"] == pruned["macs"] and set(prof["macs_per_subset"]) == {"seg", "depth", "seg+depth"}


def test_corrupt_model_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "m.mtp"
    bad.write_bytes(b"\x00" * 50)
    assert run("profile", bad) == 2
    assert str(bad) in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtprune.cli", "train", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not found" in proc.stderr
