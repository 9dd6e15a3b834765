"""Progress lines when stdout is not a terminal (a file, a pipe, a CI log): every pruning step prints one line with
its cost and metrics, the MFIS NSGA-III search (Cheng et al.) one line every few generations in place of its
progress bar, and ``--quiet`` silences them. The commands run as real processes with their output captured."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import tiny_run
from mtprune.cli import main
from mtprune.engine.logging import progress_bar, set_progress_lines

PRUNE = {"criterion": "l1", "target_macs": 0.5, "steps": 2, "stats_batches": 1, "stats_batch_size": 6,
         "finetune": {"epochs": 0, "batch_size": 6}}
MFIS = {"name": "tiny_mfis", "device": "cpu", "tasks": ["left", "right"],
        "data": {"name": "multidigits", "augment": False, "kwargs": {"n_train": 64, "n_val": 32}},
        "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64},
        "merge": {"method": "mfis", "pop_size": 8, "generations": 4, "batch": 32,
                  "finetune": {"epochs": 0, "batch_size": 32}},
        "cost": {"latency": False}}
STEP = re.compile(r"^prune step (\d)/2: MACs ([\d.]+) of dense \(\S+\) \| params ([\d.]+) of dense \(\S+\) \| "
                  r"val seg\.miou=\S+ .*depth\.abs_err=\S+")
GENERATION = re.compile(r"^MFIS NSGA-III: (\d)/4 generation \1/4 · feasible \d+/\d+ · min MACs [\d.]+ · min mean loss")


def mtprune(env: dict, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mtprune.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_prune_prints_one_line_per_step_off_a_terminal(tmp_path, env):
    cfg = tiny_run(prune=PRUNE)
    cfg["train"]["epochs"] = 1
    out = mtprune(env, "prune", write(tmp_path / "prune.yaml", cfg), "--out", tmp_path / "run").stdout
    steps = [STEP.match(line) for line in out.splitlines() if line.startswith("prune step")]
    assert [int(m.group(1)) for m in steps if m] == [1, 2] and len(steps) == 2, out
    macs = [float(m.group(2)) for m in steps]
    assert 1 > macs[0] > macs[1] and abs(macs[1] - 0.5) < 0.05  # step i prunes to 0.5^(i/2) of the dense MACs
    assert all(0 < float(m.group(3)) < 1 for m in steps)


def test_mfis_prints_generation_lines_off_a_terminal(tmp_path, env):
    out = mtprune(env, "merge", write(tmp_path / "mfis.yaml", MFIS), "--out", tmp_path / "run").stdout
    lines = [line for line in out.splitlines() if line.startswith("MFIS NSGA-III")]
    assert [GENERATION.match(line).group(1) for line in lines] == ["1", "2", "3", "4"], out


def test_quiet_silences_the_progress_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = write(tmp_path / "mfis.yaml", {**MFIS, "merge": {**MFIS["merge"], "generations": 2}})
    assert main(["--quiet", "merge", str(cfg), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "MFIS NSGA-III" not in out and "epoch 1" not in out and "report:" in out


def test_progress_bar_prints_every_nth_step_and_the_last(capsys):
    set_progress_lines(True)
    try:
        with progress_bar(5, "search", enabled=False, lines_every=2) as step:
            for i in range(5):
                step(f"x={i}")
        with progress_bar(3, "training", enabled=False) as step:  # no lines_every: silent (per-batch bars)
            for _ in range(3):
                step("loss 1")
    finally:
        set_progress_lines(False)
    with progress_bar(2, "off", enabled=False, lines_every=1) as step:  # progress lines off: silent
        step("a")
    assert capsys.readouterr().out.splitlines() == ["search: 2/5 x=1", "search: 4/5 x=3", "search: 5/5 x=4"]
