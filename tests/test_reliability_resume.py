"""Kill and resume with real processes: ``mtprune train`` and ``mtprune prune`` are SIGKILLed at seeded random
moments, several times in a row, each time followed by ``--resume``. The final weights must be bit-identical to
an uninterrupted run with the same seed, every log must have one line per epoch, and no temporary file may be
left in the run directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import tiny_run
from mtprune.cli import main
from mtprune.engine.checkpoint import load_checkpoint

TINY = tiny_run(train={"epochs": 12, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6, "weighting": "dwa",
                       "optimizer": "adamw", "scheduler": "cosine"})
PRUNE = {"criterion": "taylor", "target_macs": 0.5, "schedule": "iterative", "steps": 2, "stats_batches": 1,
         "stats_batch_size": 6, "finetune": {"epochs": 1, "batch_size": 6}}
POLL_S = 0.01
START_TIMEOUT_S = 120.0




def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **sections}))
    return path


def launch(env: dict, log: Path, *args) -> subprocess.Popen:
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "mtprune.cli", "--quiet", *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under ``folder``: an atomic rename gives a new inode."""
    out = {}
    for p in folder.rglob("*") if folder.is_dir() else []:
        try:
            st = p.stat()
        except FileNotFoundError:  # renamed away between listing and stat
            continue
        if p.is_file():
            out[str(p.relative_to(folder))] = (st.st_ino, st.st_mtime_ns)
    return out


def kill_after_progress(proc: subprocess.Popen, progressed, delay: float) -> bool:
    """Wait until ``progressed()`` (the process wrote new work), sleep ``delay``, SIGKILL. True if it was killed
    while still running (False: it finished first)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not progressed():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the process made no progress"
        time.sleep(POLL_S)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return True


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def epochs_logged(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_train_survives_repeated_sigkill_bit_exactly(tmp_path, env):
    cfg = write_config(tmp_path / "train.yaml")
    ref, run, log = tmp_path / "ref", tmp_path / "run", tmp_path / "stderr.log"
    assert main(["--quiet", "train", str(cfg), "--out", str(ref)]) == 0  # uninterrupted, in this process

    rng = random.Random(6)
    epoch_s = sum(r["time"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()))
    epoch_s /= TINY["train"]["epochs"]  # this machine's time for one epoch (without the checkpoint writes)
    last = run / "checkpoints" / "last.pt"
    kills = 0
    for attempt in range(2):
        before = snapshot(last.parent).get(last.name)
        proc = launch(env, log, "train", cfg, "--out", run, *(["--resume"] if attempt else []))
        # after the first checkpoint of this process appears: a random moment (mid-epoch, mid-write, ...)
        killed = kill_after_progress(proc, lambda b=before: snapshot(last.parent).get(last.name) not in (None, b),
                                     rng.uniform(0.0, 4 * epoch_s))
        kills += killed
        if not killed:
            break
        epoch = load_checkpoint(last)["epoch"]  # the last checkpoint is always complete and readable
        assert 1 <= epoch <= TINY["train"]["epochs"]
        assert epochs_logged(run / "metrics.jsonl")[:epoch] == list(range(1, epoch + 1))
    assert kills >= 2, "the runs finished before they could be killed: raise train.epochs"
    finish(launch(env, log, "train", cfg, "--out", run, "--resume"), log)

    assert_same_tensors(load_checkpoint(ref / "checkpoints" / "last.pt")["model"], load_checkpoint(last)["model"])
    assert_same_tensors(load_checkpoint(ref / "checkpoints" / "best.pt")["model"],
                        load_checkpoint(run / "checkpoints" / "best.pt")["model"])
    assert epochs_logged(run / "metrics.jsonl") == list(range(1, TINY["train"]["epochs"] + 1))
    assert records(run / "metrics.jsonl") == records(ref / "metrics.jsonl")  # same losses, metrics, lr, weights
    assert not temporaries(run)


def test_prune_survives_sigkill_during_the_steps_bit_exactly(tmp_path, env):
    cfg = write_config(tmp_path / "prune.yaml", train={**TINY["train"], "epochs": 2}, prune=PRUNE)
    ref, run, log = tmp_path / "ref", tmp_path / "run", tmp_path / "stderr.log"
    assert main(["--quiet", "prune", str(cfg), "--out", str(ref)]) == 0

    rng = random.Random(3)
    mtime = {name: (ref / name).stat().st_mtime for name in ("dense.mtp", "prune/steps/1/model.mtp",
                                                              "prune/steps/2/pruned.mtp")}
    step1_s = mtime["prune/steps/1/model.mtp"] - mtime["dense.mtp"]  # on this machine: step 1 as a whole
    step2_s = mtime["prune/steps/2/pruned.mtp"] - mtime["prune/steps/1/model.mtp"]  # step 1's end to step 2's cut
    prune_dir = run / "prune"
    mid_schedule = 0
    for attempt in range(2):
        before = snapshot(prune_dir)
        proc = launch(env, log, "prune", cfg, "--out", run, *(["--resume"] if attempt else []))
        if attempt == 0:  # after step 0 is recorded: somewhere in step 1 (statistics, bisection, fine-tuning)
            progressed, delay = (lambda: (prune_dir / "schedule.json").is_file()), rng.uniform(0.0, 0.6 * step1_s)
        else:  # after the resumed process wrote new work and step 1 is done: around the start of step 2
            def progressed(b=before):
                return (prune_dir / "steps" / "1" / "model.mtp").is_file() and snapshot(prune_dir).items() - b.items()

            delay = rng.uniform(0.0, 0.8 * step2_s)
        if not kill_after_progress(proc, progressed, delay):
            break
        steps = json.loads((prune_dir / "schedule.json").read_text())["records"]
        mid_schedule += len(steps) <= PRUNE["steps"]
    assert mid_schedule >= 1, "no kill landed during the pruning steps"
    finish(launch(env, log, "prune", cfg, "--out", run, "--resume"), log)

    assert_same_tensors(load_file(str(ref / "model.mtp")), load_file(str(run / "model.mtp")))
    schedule = json.loads((prune_dir / "schedule.json").read_text())["records"]
    assert [r["step"] for r in schedule] == [0, 1, 2]
    assert schedule == json.loads((ref / "prune" / "schedule.json").read_text())["records"]  # same trajectory
    assert epochs_logged(run / "dense" / "metrics.jsonl") == [1, 2]
    for step in ("1", "2"):
        assert epochs_logged(prune_dir / "steps" / step / "metrics.jsonl") == [1]
    assert not temporaries(run)


def test_interleaved_schedule_resumes_bit_exactly_with_augmented_data(tmp_path, env):
    """In process: the interleaved schedule (Garg et al.) stopped after its first removal, then resumed with the
    global RNG elsewhere, ends exactly where an uninterrupted run does (augmentation and dropout included)."""
    from mtprune.data import load
    from mtprune.data.transforms import Compose, RandomHorizontalFlip, RandomScaleCrop
    from mtprune.models import build_model
    from mtprune.pruning.schedule import interleaved_prune
    from mtprune.tasks import preset

    names = ["seg", "depth"]
    tasks = {n: preset("synthetic_scenes")[n] for n in names}
    kw = {"n_train": 12, "n_val": 6, "height": 32, "width": 40, "tasks": names}
    train = load("synthetic_scenes", split="train", transform=Compose([RandomScaleCrop(), RandomHorizontalFlip()]),
                 **kw)
    val = load("synthetic_scenes", split="val", **kw)
    x = torch.zeros(1, 3, 32, 40)

    def model():
        torch.manual_seed(0)
        return build_model("deeplab_resnet18", {n: t.out_channels for n, t in tasks.items()}, width=0.125,
                           head="conv")

    opts = {"criterion": "cosprune", "interval": 3, "filters_per_step": 6, "max_steps": 2, "batch_size": 6,
            "device": "cpu", "seed": 4}
    full, records = interleaved_prune(model(), x, tasks, train, val, tmp_path / "full", **opts)

    class Killed(Exception):
        pass

    def die(record):
        if record.step == 1:
            raise Killed

    with pytest.raises(Killed):
        interleaved_prune(model(), x, tasks, train, val, tmp_path / "part", on_step=die, **opts)
    torch.manual_seed(999)  # a fresh process: the global RNG is elsewhere
    resumed, resumed_records = interleaved_prune(model(), x, tasks, train, val, tmp_path / "part", resume=True,
                                                 **opts)
    assert [r.step for r in resumed_records] == [r.step for r in records] == [0, 1, 2]
    assert [r.widths for r in resumed_records] == [r.widths for r in records]
    assert_same_tensors(full.state_dict(), resumed.state_dict())
