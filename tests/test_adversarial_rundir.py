"""Adversarial probes of run directories (issue 15): --overwrite, --out, the lock, --resume checks, metrics.jsonl,
bench --resume across scales. Each test is one probe a hostile or careless user tried."""

import fcntl
import json
import os
from pathlib import Path

import pytest
import yaml

from helpers import tiny_run
from mtprune.cli import main
from mtprune.commands import check_bench_scale
from mtprune.utils.errors import MTPruneInputError
from mtprune.utils.rundir import LOCK, MARKER, changed_settings, prepare_run_dir, release_locks

TINY = tiny_run(train={"epochs": 1, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic-data cache for the module's runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """A finished one-epoch run: (config path, run directory)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = root / "run"
    assert main(["--quiet", "train", str(cfg), "--out", str(out)]) == 0
    return cfg, out


def cli(*args):
    return main(["--quiet", *map(str, args)])


def snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_overwrite_refuses_a_folder_mtprune_did_not_make(tmp_path, monkeypatch, capsys):
    """`cd project && mtprune train cfg.yaml --out . --overwrite` deleted the project; now: refused, nothing touched."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    (project / "notes.txt").write_text("precious")
    (project / "src").mkdir()
    (project / "src" / "code.py").write_text("print(1)")
    before = snapshot(project)
    monkeypatch.chdir(project)
    assert cli("train", "cfg.yaml", "--out", ".", "--overwrite") == 2
    line = one_error_line(capsys)
    assert "not a run directory made by mtprune" in line and "nothing was deleted" in line
    assert snapshot(project) == before and sorted(p.name for p in project.iterdir()) == ["cfg.yaml", "notes.txt",
                                                                                           "src"]


def test_overwrite_replaces_a_run_directory(trained, tmp_path):
    cfg, _ = trained
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("made by mtprune")
    (out / "stale.txt").write_text("old")
    assert cli("train", cfg, "--out", out, "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "config.yaml").is_file() and (out / MARKER).is_file()


def test_out_that_is_a_file_exits_2(trained, tmp_path, capsys):
    cfg, _ = trained
    target = tmp_path / "model.txt"
    target.write_text("keep me")
    assert cli("train", cfg, "--out", target) == 2
    assert "is not a directory" in one_error_line(capsys) and target.read_text() == "keep me"


def test_a_second_writer_is_refused_while_the_lock_is_held(trained, tmp_path, capsys):
    cfg, _ = trained
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's lock (flock is per open file)
        os.write(fd, b"4242\n")
        assert cli("train", cfg, "--out", out) == 2
        line = one_error_line(capsys)
        assert "in use by another mtprune process" in line and "4242" in line
        assert not (out / "metrics.jsonl").exists()
    finally:
        os.close(fd)


def test_a_lock_left_by_a_killed_process_is_not_stale(tmp_path):
    """The lock is an flock: the kernel drops it with the process, so a leftover lock file blocks nothing."""
    out = tmp_path / "killed"
    out.mkdir()
    (out / LOCK).write_text("99999\n")
    (out / MARKER).write_text("made by mtprune")
    (out / "config.yaml").write_text("name: x\n")
    try:
        assert prepare_run_dir(out, resume=True) == out
    finally:
        release_locks()


def test_refused_resume_leaves_the_config_and_the_run_usable(trained, capsys):
    """A refused --resume (width or tasks changed) used to rewrite config.yaml first; evaluate then failed."""
    cfg, out = trained
    before = (out / "config.yaml").read_bytes()
    for change, key in (("model.width=0.25", "model.width"), ("tasks.names=[seg]", "tasks.names")):
        assert cli("train", cfg, "--out", out, "--resume", "--set", change) == 2
        assert key in one_error_line(capsys)
        assert (out / "config.yaml").read_bytes() == before
    assert cli("evaluate", out) == 0


def test_resume_refuses_changed_seed_and_lr_naming_them(trained, capsys):
    cfg, out = trained
    before = snapshot(out)
    assert cli("train", cfg, "--out", out, "--resume", "--set", "seed=3", "--set", "train.lr=0.01") == 2
    line = one_error_line(capsys)
    assert "seed (0 -> 3)" in line and "train.lr (0.002 -> 0.01)" in line
    assert {k: v for k, v in snapshot(out).items() if k.name != LOCK} == {
        k: v for k, v in before.items() if k.name != LOCK}


def test_safe_settings_may_change_on_resume():
    old = {"name": "a", "device": "cpu", "seed": 0, "train": {"epochs": 2, "num_workers": 0, "lr": 0.1},
           "prune": {"finetune": {"epochs": 1}}}
    new = {"name": "b", "device": "auto", "seed": 0, "train": {"epochs": 5, "num_workers": 2, "lr": 0.1},
           "prune": {"finetune": {"epochs": 3}}}
    assert changed_settings(old, new) == []
    assert changed_settings(old, {**new, "train": {**new["train"], "lr": 0.2}}) == ["train.lr (0.1 -> 0.2)"]


def test_damaged_metrics_jsonl_on_resume(tmp_path, trained, capsys):
    """A hand-damaged line is named; a cut last line (a full disk mid-append) is dropped and the run goes on."""
    cfg, out = trained
    run = tmp_path / "copy"
    assert cli("train", cfg, "--out", run) == 0
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("{not json\n" + good)
    assert cli("train", cfg, "--out", run, "--resume", "--set", "train.epochs=2") == 2
    line = one_error_line(capsys)
    assert "metrics.jsonl: line 1 is not a metrics record" in line
    (run / "metrics.jsonl").write_text(good + '{"epoch": 2, "train_lo')
    assert cli("train", cfg, "--out", run, "--resume", "--set", "train.epochs=2") == 0
    epochs = [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_bench_resume_refuses_entries_of_another_scale(tmp_path, capsys):
    folder = tmp_path / "results"
    check_bench_scale(folder, "small", resume=False)
    assert (folder / "entries" / ".scale").read_text().strip() == "small"
    check_bench_scale(folder, "small", resume=True)  # same scale: reused
    with pytest.raises(MTPruneInputError, match="made at --scale small, not cpu"):
        check_bench_scale(folder, "cpu", resume=True)
    check_bench_scale(folder, "cpu", resume=False)  # without --resume every entry runs again at the new scale
    assert (folder / "entries" / ".scale").read_text().strip() == "cpu"
    # through the command: refused before any entry runs
    before = snapshot(folder)
    assert cli("bench", "quick", "--scale", "small", "--out", folder, "--resume") == 2
    assert "--scale cpu, not small" in one_error_line(capsys) and snapshot(folder) == before


def test_a_key_added_to_the_schema_since_the_run_started_compares_as_its_default(tmp_path):
    from mtprune.config import dump_config, parse_config
    from mtprune.utils.rundir import check_resume_config

    cfg = parse_config(TINY)
    stored = yaml.safe_load(dump_config(cfg))
    del stored["train"]["grad_clip"], stored["data"]["augment"]  # an older mtprune did not write these keys
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    check_resume_config(tmp_path, cfg)  # defaults: unchanged
    with pytest.raises(MTPruneInputError, match=r"data.augment \(True -> False\)"):
        check_resume_config(tmp_path, parse_config({**TINY, "data": {**TINY["data"], "augment": False}}))


@pytest.mark.parametrize("name", ["merge_pam_multidigits", "merge_mfis_multidigits"])
def test_merge_resume_refuses_changed_settings(tmp_path, name):
    from mtprune.config import dump_config
    from mtprune.merging.experiment import load_merge_config
    from mtprune.merging.mfis.run import load_mfis_config
    from mtprune.utils.rundir import check_resume_config

    load = load_mfis_config if "mfis" in name else load_merge_config
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    (tmp_path / "config.yaml").write_text(dump_config(load(path)))
    check_resume_config(tmp_path, load(path, ["train.epochs=50"]))  # more epochs: allowed
    with pytest.raises(MTPruneInputError, match=r"seed \(0 -> 5\)"):
        check_resume_config(tmp_path, load(path, ["seed=5"]))


def test_resume_refuses_a_folder_mtprune_did_not_make(trained, tmp_path, capsys):
    """`--resume` into a project folder (no marker) used to write config.yaml, metrics and checkpoints there."""
    cfg, _ = trained
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    before = snapshot(project)
    assert cli("train", cfg, "--out", project, "--resume") == 2
    line = one_error_line(capsys)
    assert "--resume" in line and "not a run directory made by mtprune" in line and "nothing was written" in line
    assert snapshot(project) == before and sorted(p.name for p in project.iterdir()) == ["notes.txt"]
    with pytest.raises(MTPruneInputError, match="no .mtprune-run file"):
        prepare_run_dir(project, resume=True)
    fresh = tmp_path / "fresh"  # --resume of a run that never started (no folder yet) still starts it
    try:
        assert prepare_run_dir(fresh, resume=True) == fresh and (fresh / MARKER).is_file()
    finally:
        release_locks()
