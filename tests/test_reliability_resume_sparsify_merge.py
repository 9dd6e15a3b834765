"""Kill and resume for ``mtprune sparsify`` and ``mtprune merge`` (PAM and MFIS).

Cheap, in process: a run is "killed" right after a chosen checkpoint write (an exception the CLI does not catch),
resumed with ``--resume``, killed again at the next kind of unit, and so on; the global RNGs are scrambled before
every resume. Slow, with real processes: SIGKILL at seeded random moments, then ``--resume`` until done. Either
way the final model files must be bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import mtprune
import mtprune.engine.checkpoint as checkpoint
from helpers import tiny_run
from mtprune.cli import main
from mtprune.sparsity import sparsify
from mtprune.sparsity.training import SparseTrainConfig
from mtprune.utils.errors import MTPruneInputError
from mtprune.utils.rundir import MARKER
from test_reliability_resume import (
    assert_same_tensors,
    epochs_logged,
    kill_after_progress,
    launch,
    records,
    temporaries,
)

SPARSIFY = {"method": "imp", "sparsity": 0.8, "batches": 1, "batch_size": 6, "rounds": 2, "round_steps": 2,
            "train": {"epochs": 2, "batch_size": 6, "lr": 0.002}}
TINY_TRAIN = {"epochs": 2, "batch_size": 32, "lr": 0.002, "eval_batch_size": 128}
PAM = {"name": "tiny_pam", "device": "cpu", "tasks": ["left", "parity"],
       "data": {"name": "multidigits", "augment": False, "kwargs": {"n_train": 128, "n_val": 64, "size": 16}},
       "model": {"name": "lenet5", "width": 0.5, "kwargs": {"input_size": 16}}, "train": TINY_TRAIN,
       "merge": {"alpha_conv": -1.0, "alpha_linear": -1.0, "batch": 32, "naive_split": 2, "retrain": TINY_TRAIN},
       "prune": {"ladder": [0.5], "accuracy_drop": 100.0, "stats_batches": 1, "finetune": TINY_TRAIN},
       "cost": {"latency": False}}
MFIS = {"name": "tiny_mfis", "device": "cpu", "tasks": ["left", "right"],
        "data": {"name": "multidigits", "augment": False, "kwargs": {"n_train": 64, "n_val": 32}},
        "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 64},
        "merge": {"method": "mfis", "pop_size": 8, "generations": 2, "batch": 32,
                  "finetune": {"epochs": 2, "batch_size": 32}},
        "cost": {"latency": False}}
PAM_FILES = ("pam.mtp", "naive.mtp", "single_left.mtp", "single_parity.mtp")




def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def sparsify_config(tmp_path: Path, **sparsify_section) -> Path:
    return write(tmp_path / "sparsify.yaml", tiny_run(sparsify={**SPARSIFY, **sparsify_section}))


def same_files(a: Path, b: Path) -> None:
    assert_same_tensors(load_file(str(a)), load_file(str(b)))


def cli(*args) -> int:
    return main(["--quiet", *map(str, args)])






# ------------------------------------------------------------------------------------------------- in process
class Killed(BaseException):
    """A simulated SIGKILL: not an ``Exception``, so the CLI's error handling lets it through."""


@contextmanager
def killed_after(part: str, nth: int = 1) -> Iterator[None]:
    """The run dies right after its ``nth`` completed checkpoint write to a path containing ``part``."""
    real, seen = checkpoint.atomic_save, []

    def save(path, writer) -> None:
        real(path, writer)
        if part in Path(path).as_posix():
            seen.append(path)
            if len(seen) == nth:
                raise Killed(str(path))

    with mock.patch.object(checkpoint, "atomic_save", save), pytest.raises(Killed):
        yield


def scramble_rngs() -> None:
    """A resumed process starts with its global generators elsewhere."""
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


def kill_chain(args: list, kills: list[str]) -> None:
    """Run ``args``, killed after the first write to ``kills[0]``; resume, killed after ``kills[1]``; ...; then
    resume to the end."""
    for i, part in enumerate(kills):
        with killed_after(part):
            cli(*args, *(["--resume"] if i else []))
        scramble_rngs()
    assert cli(*args, "--resume") == 0


def test_sparsify_imp_resumes_after_each_kind_of_unit_bit_exactly(tmp_path, env):
    """IMP without rewinding: dense epochs, mask-finding rounds, the masks found, sparse fine-tuning epochs."""
    cfg = sparsify_config(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("sparsify", cfg, "--out", ref) == 0
    kill_chain(["sparsify", cfg, "--out", run], ["dense/checkpoints/last.pt", "sparsify/loop.pt",
                                                  "sparsify/sparsified.pt", "train/checkpoints/last.pt"])
    same_files(ref / "model.mtp", run / "model.mtp")
    same_files(ref / "dense.mtp", run / "dense.mtp")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert [r["metrics"] for r in a["models"]] == [r["metrics"] for r in b["models"]]
    assert a["sparsity"]["history"] == b["sparsity"]["history"]  # each round's target and last losses
    assert [h["round"] for h in b["sparsity"]["history"]] == [1, 2]
    for part in ("dense", "train"):  # every epoch once, with the uninterrupted run's losses and metrics
        assert epochs_logged(run / part / "metrics.jsonl") == [1, 2]
        assert records(run / part / "metrics.jsonl") == records(ref / part / "metrics.jsonl")
    assert not temporaries(run)


def test_sparsify_dynamic_resumes_after_an_epoch_bit_exactly(tmp_path, env):
    """DiSparse dynamic: the masks move during training; the run dies after its first epoch (2 iterations)."""
    cfg = sparsify_config(tmp_path, method="disparse_dynamic", dynamic={"delta_t": 1})
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("sparsify", cfg, "--out", ref) == 0
    kill_chain(["sparsify", cfg, "--out", run], ["sparsify/loop.pt"])
    same_files(ref / "model.mtp", run / "model.mtp")
    a, b = (json.loads((d / "summary.json").read_text())["sparsity"] for d in (ref, run))
    assert b["extra"]["steps"] == 4 and [h["step"] for h in b["history"]] == [1, 2]  # updates before T_end = 3
    assert a["history"] == b["history"]  # the same weights dropped and regrown


def masked_toy() -> tuple[torch.nn.Module, list, dict]:
    """A tiny two-task zoo model (seeded), 4 batches of 32×32 images and the losses."""
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 32, 32, generator=gen), {"seg": torch.randint(0, 5, (2, 4, 4), generator=gen),
                                                           "normal": torch.randn(2, 3, 4, 4, generator=gen)})
               for _ in range(4)]
    torch.manual_seed(0)
    model = mtprune.build_model("deeplab_resnet18", {"seg": 5, "normal": 3}, width=0.125, head="conv",
                                head_kwargs={"hidden": 16, "width": 1.0})
    return model, batches, {"seg": torch.nn.functional.cross_entropy, "normal": torch.nn.functional.mse_loss}


def test_dynamic_sparse_training_resumes_mid_pass(tmp_path):
    """Library level, RigL: checkpoints every 3 iterations over a 4-batch loader (not at pass boundaries)."""
    _, batches, losses = masked_toy()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True, generator=torch.Generator())

    def run(path: Path, resume: bool = False):
        model = masked_toy()[0]
        loader.generator.manual_seed(0)
        train = SparseTrainConfig(steps=8, lr=0.01, checkpoint=str(path), checkpoint_every=3, resume=resume)
        result = sparsify(model, None, "rigl", 0.8, data=loader, losses=losses, train=train,
                          schedule={"delta_t": 2, "t_end": 6})
        return model.state_dict(), result.history

    full, history = run(tmp_path / "full.pt")
    with killed_after("part.pt", nth=2):  # after iteration 6
        run(tmp_path / "part.pt")
    scramble_rngs()
    resumed, resumed_history = run(tmp_path / "part.pt", resume=True)
    assert resumed_history == history and [h["step"] for h in history] == [2, 4]
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    checkpoint.save_checkpoint(tmp_path / "other.pt", {"kind": "something else"})
    with pytest.raises(MTPruneInputError, match="other.pt"):
        run(tmp_path / "other.pt", resume=True)


def test_sparse_training_stops_on_a_nan_loss_naming_the_task():
    model, batches, losses = masked_toy()
    losses["normal"] = lambda p, t: p.mean() * float("nan")
    with pytest.raises(MTPruneInputError, match=r"\['normal'\] is NaN or Inf at step 1"):
        sparsify(model, None, "rigl", 0.8, data=batches, losses=losses, train={"steps": 2})


@pytest.mark.filterwarnings("ignore:target_macs")
def test_merge_pam_resumes_after_each_stage_bit_exactly(tmp_path, env):
    cfg = write(tmp_path / "pam.yaml", PAM)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("merge", cfg, "--out", ref) == 0
    kill_chain(["merge", cfg, "--out", run], ["singles/parity/checkpoints/last.pt", "pam/retrain/checkpoints/last.pt",
                                               "prune/naive/step1/checkpoints/last.pt"])
    for name in PAM_FILES:
        same_files(ref / name, run / name)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert a["budgets"] == b["budgets"]  # the same pruning ladder: fractions and accuracies
    a["pam"]["partitions"].pop("seconds"), b["pam"]["partitions"].pop("seconds")
    assert a["pam"] == b["pam"]  # the same partitions, accuracy after merging and after retraining
    for part in ("singles/parity", "pam/retrain", "prune/naive/step1"):
        assert epochs_logged(run / part / "metrics.jsonl") == [1, 2]
        assert records(run / part / "metrics.jsonl") == records(ref / part / "metrics.jsonl")
    assert not temporaries(run)


def test_merge_mfis_resumes_without_searching_again(tmp_path, env):
    cfg = write(tmp_path / "mfis.yaml", MFIS)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("merge", cfg, "--out", ref) == 0
    with killed_after("singles/right/checkpoints/last.pt"):
        cli("merge", cfg, "--out", run)
    scramble_rngs()
    with killed_after("finetune/checkpoints/last.pt"):
        cli("merge", cfg, "--out", run, "--resume")
    scramble_rngs()
    with mock.patch("mtprune.merging.mfis.run.solve", side_effect=AssertionError("searched again")):
        assert cli("merge", cfg, "--out", run, "--resume") == 0  # the saved Pareto front is reused
    same_files(ref / "mfis.mtp", run / "mfis.mtp")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert a["mfis"]["front"]["F"] == b["mfis"]["front"]["F"] and a["acc_after_finetune"] == b["acc_after_finetune"]
    assert epochs_logged(run / "finetune" / "metrics.jsonl") == [1, 2]


@pytest.mark.parametrize("command", ["sparsify", "merge"])
def test_existing_run_dir_is_refused_and_left_untouched(tmp_path, env, capsys, command):
    cfg = sparsify_config(tmp_path) if command == "sparsify" else write(tmp_path / "pam.yaml", PAM)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.mtp").write_bytes(b"earlier work")
    (run / "checkpoints" / "last.pt").write_bytes(b"earlier checkpoint")
    state = lambda: {p: (p.is_file() and p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)  # noqa: E731
                     for p in run.rglob("*")}
    before = state()
    assert cli(command, cfg, "--out", run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--resume" in err and "--overwrite" in err
    assert state() == before


class Payload:
    """Unpickling it would create ``marker`` (a stand-in for running arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
@pytest.mark.parametrize(("command", "unit"), [("sparsify", "sparsify/sparsified.pt"), ("sparsify", "sparsify/loop.pt"),
                                               ("merge", "search.pt")])
def test_unit_checkpoints_are_loaded_safely_on_resume(tmp_path, env, capsys, command, unit, damage):
    """A malicious pickle in place of a unit's checkpoint never runs; a truncated one is named; both exit 2."""
    cfg = (sparsify_config(tmp_path, rewind=True) if command == "sparsify"  # IMP with rewinding: no dense training
           else write(tmp_path / "mfis.yaml", {**MFIS, "train": {**MFIS["train"], "epochs": 1}}))
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / unit).parent.mkdir(parents=True)
    (run / MARKER).touch()  # a run directory mtprune made, with a planted or damaged unit
    if damage == "pickle":
        torch.save({"format": "mtprune-train-checkpoint", "version": 1, "model": Payload(marker)}, run / unit)
    else:
        checkpoint.save_checkpoint(run / unit, {"kind": "sparsified", "model": {"w": torch.zeros(1000)}})
        (run / unit).write_bytes((run / unit).read_bytes()[:2000])
    assert cli(command, cfg, "--out", run, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / unit) in err[0], err
    assert ("refused" if damage == "pickle" else "truncated") in err[0]
    assert not marker.exists()


def test_debug_adds_the_traceback_to_the_one_line(tmp_path, env, capsys):
    cfg = write(tmp_path / "bare.yaml", tiny_run())  # no sparsify section: bad input
    assert cli("sparsify", cfg, "--out", tmp_path / "a") == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"mtprune: error: {cfg}: no 'sparsify' section"]
    assert main(["--quiet", "--debug", "sparsify", str(cfg), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and "MTPruneInputError" in "\n".join(err)
    assert err[-1] == f"mtprune: error: {cfg}: no 'sparsify' section"


# ------------------------------------------------------------------------------------------- real processes



def checkpoints(run: Path) -> dict[str, int]:
    """Inode of every checkpoint under ``run`` (an atomic rename gives a new one)."""
    out = {}
    for p in run.rglob("*.pt") if run.is_dir() else []:
        try:
            out[str(p)] = p.stat().st_ino
        except FileNotFoundError:
            continue
    return out



def sigkill_loop(env: dict, args: list, run: Path, log: Path, ref_seconds: float, seed: int) -> int:
    """Start ``args``, SIGKILL it at random moments after it made progress, resume each time; returns the kills."""
    rng, kills = random.Random(seed), 0
    for attempt in range(2):
        proc = launch(env, log, *args, *(["--resume"] if attempt else []))
        before = checkpoints(run)
        progressed = lambda b=before: not checkpoints(run).items() <= b.items()  # noqa: E731
        if not kill_after_progress(proc, progressed, rng.uniform(0.0, 0.1 * ref_seconds)):
            assert proc.wait() == 0, log.read_text()[-3000:]
            return kills
        kills += 1
    proc = launch(env, log, *args, "--resume")
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    return kills


@pytest.mark.slow
def test_sparsify_survives_repeated_sigkill_bit_exactly(tmp_path, env):
    cfg = sparsify_config(tmp_path, train={"epochs": 3, "batch_size": 6, "lr": 0.002})
    ref, run = tmp_path / "ref", tmp_path / "run"
    start = time.perf_counter()
    assert cli("sparsify", cfg, "--out", ref) == 0
    kills = sigkill_loop(env, ["sparsify", cfg, "--out", run], run, tmp_path / "stderr.log",
                         time.perf_counter() - start, seed=2)
    assert kills >= 2, "the runs finished before they could be killed"
    same_files(ref / "model.mtp", run / "model.mtp")
    assert epochs_logged(run / "train" / "metrics.jsonl") == [1, 2, 3]
    assert records(run / "train" / "metrics.jsonl") == records(ref / "train" / "metrics.jsonl")
    assert not temporaries(run)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:target_macs")
def test_merge_survives_repeated_sigkill_bit_exactly(tmp_path, env):
    one = {**TINY_TRAIN, "epochs": 1}
    cfg = write(tmp_path / "pam.yaml", {**PAM, "train": one, "merge": {**PAM["merge"], "retrain": one},
                                        "prune": {**PAM["prune"], "finetune": one}})
    ref, run = tmp_path / "ref", tmp_path / "run"
    start = time.perf_counter()
    assert cli("merge", cfg, "--out", ref) == 0
    kills = sigkill_loop(env, ["merge", cfg, "--out", run], run, tmp_path / "stderr.log",
                         time.perf_counter() - start, seed=5)
    assert kills >= 2, "the runs finished before they could be killed"
    for name in PAM_FILES:
        same_files(ref / name, run / name)
    assert not temporaries(run)
