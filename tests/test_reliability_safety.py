"""Safe loading and numerical guards, through the ``mtprune`` command and the trainer.

- A malicious pickle disguised as a checkpoint is refused (exit 2, one line naming the file) and never runs.
- Truncated and edited checkpoints are refused with the file's name.
- A NaN loss in the middle of training stops the run naming the task; the last good checkpoint stays intact.
- The windows a kill can hit between two writes (a metrics line and its checkpoint; best.pt and last.pt) resume
  to a consistent run, and resuming removes the temporary files of interrupted writes.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from helpers import tiny_run
from mtprune.cli import main
from mtprune.engine import TrainConfig, Trainer, load_checkpoint
from mtprune.engine import checkpoint as checkpoint_mod
from mtprune.engine import trainer as trainer_mod
from mtprune.tasks import DepthTask, SegmentationTask
from mtprune.utils.rundir import MARKER

TINY = tiny_run(train={"epochs": 1, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6})
PRUNE = {"criterion": "taylor", "target_macs": 0.5, "steps": 2, "stats_batches": 1,
         "finetune": {"epochs": 1, "batch_size": 6}}


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "prune": PRUNE}))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch training run (copied by the tests that damage it)."""
    root = tmp_path_factory.mktemp("trained")
    mp = pytest.MonkeyPatch()
    mp.setenv("MTPRUNE_CACHE", str(root / "cache"))
    try:
        (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
        assert cli("train", root / "tiny.yaml", "--out", root / "run") == 0
    finally:
        mp.undo()
    return root / "run"


def cli(*args) -> int:
    return main(["--quiet", *map(str, args)])


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mtprune: error: ")
    return lines[0]


class Payload:
    """Unpickling it would create ``marker`` (a stand-in for running arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fake = {"format": "mtprune-train-checkpoint", "version": 1, "epoch": 1, "model": Payload(marker)}
    if kind == "torch":
        torch.save(fake, path)
    else:  # a bare pickle (protocol 2: the one torch's legacy loader reads)
        path.write_bytes(pickle.dumps(fake, protocol=2))


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_the_payload_is_live_when_unpickled(tmp_path, kind):
    """The test payload really runs code under a plain (unsafe) load: the refusal below means something."""
    marker = tmp_path / "ran"
    malicious_checkpoint(tmp_path / "evil.pt", marker, kind)
    if kind == "torch":
        torch.load(tmp_path / "evil.pt", weights_only=False)
    else:
        pickle.loads((tmp_path / "evil.pt").read_bytes())  # noqa: S301 - the point of this test
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_malicious_last_checkpoint_is_refused_on_resume(config, tmp_path, capsys, kind):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    malicious_checkpoint(run / "checkpoints" / "last.pt", marker, kind)
    (run / MARKER).touch()  # a run directory mtprune made, with a planted checkpoint
    assert cli("train", config, "--out", run, "--resume") == 2
    line = one_error_line(capsys)
    assert str(run / "checkpoints" / "last.pt") in line and "refused" in line
    assert not marker.exists()


def test_malicious_dense_checkpoint_is_refused_by_prune_resume(config, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    malicious_checkpoint(run / "dense" / "checkpoints" / "last.pt", marker, "torch")
    (run / MARKER).touch()
    assert cli("prune", config, "--out", run, "--resume") == 2
    assert str(run / "dense" / "checkpoints" / "last.pt") in one_error_line(capsys)
    assert not marker.exists()


def damaged_copy(trained: Path, tmp_path: Path, damage) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "checkpoints" / "last.pt")
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_weights(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.dim() == 4)
    ckpt["model"][key] = ckpt["model"][key][:1]  # a conv with one filter: the shapes no longer fit
    torch.save(ckpt, path)


def edit_tasks(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt["tasks"] = ["seg", "normal"]
    torch.save(ckpt, path)


def drop_key(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, path)


@pytest.mark.parametrize(("damage", "what"), [(truncate, "truncated"), (edit_weights, "size mismatch"),
                                              (edit_tasks, "tasks"), (drop_key, "optimizer")],
                         ids=["truncated", "weights", "tasks", "missing-key"])
def test_damaged_checkpoint_is_named_on_resume(trained, tmp_path, capsys, monkeypatch, damage, what):
    monkeypatch.setenv("MTPRUNE_CACHE", str(trained.parent / "cache"))
    run = damaged_copy(trained, tmp_path, damage)
    assert cli("train", run / "config.yaml", "--out", run, "--resume", "--set", "train.epochs=2") == 2
    line = one_error_line(capsys)
    assert str(run / "checkpoints" / "last.pt") in line and what in line


def test_resume_removes_temporaries_of_interrupted_writes(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(trained.parent / "cache"))
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    stale = [run / "checkpoints" / ".last.pt.k1ll3d.tmp", run / ".metrics.jsonl.x2y.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert cli("train", run / "config.yaml", "--out", run, "--resume", "--set", "train.epochs=2") == 0
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


# ---------------------------------------------------------------- numerical guards through the CLI
def test_nan_loss_mid_training_exits_2_naming_the_task(config, tmp_path, capsys, monkeypatch):
    """12 samples in batches of 6: the depth loss turns NaN at epoch 2, step 1."""
    calls = {"n": 0}
    original = DepthTask.loss

    def loss(self, pred, target):
        value = original(self, pred, target)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 2:
                return value * float("nan")
        return value

    monkeypatch.setattr(DepthTask, "loss", loss)
    run = tmp_path / "run"
    assert cli("train", config, "--out", run, "--set", "train.epochs=3") == 2
    line = one_error_line(capsys)
    assert "['depth']" in line and "'seg'" not in line and "epoch 2, step 1" in line
    last = load_checkpoint(run / "checkpoints" / "last.pt")  # intact, and the epoch before the NaN
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- crash windows between two writes (trainer)
class Toy(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 8, 8, generator=g)
        self.seg = (self.x[:, 0] > self.x[:, 1]).long()
        self.depth = 0.5 + self.x[:, 2:3]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"seg": self.seg[i], "depth": self.depth[i]}


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.seg, self.depth = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x):
        f = self.body(x)
        return {"seg": self.seg(f), "depth": self.depth(f)}


def fit(run: Path, epochs: int, resume: bool = False, tensorboard: bool = False) -> nn.Module:
    model = ToyNet()
    cfg = TrainConfig(epochs=epochs, batch_size=4, lr=0.01, quiet=True, tensorboard=tensorboard, resume=resume)
    Trainer(model, {"seg": SegmentationTask("seg", 2), "depth": DepthTask()}, Toy(8, 0), Toy(4, 1), run, cfg).fit()
    return model


class Killed(BaseException):
    pass


def kill_at_save(monkeypatch, n: int) -> None:
    """The ``n``-th checkpoint write of the trainer never happens: the process "dies" right before it."""
    calls = {"n": 0}

    def save(path, payload):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed
        checkpoint_mod.save_checkpoint(path, payload)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save)


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_kill_between_the_metrics_line_and_the_first_checkpoint(tmp_path, monkeypatch):
    """Epoch 1's metrics line is written, its checkpoint is not: the resumed log has no duplicate epoch, neither
    in metrics.jsonl nor in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kill_at_save(monkeypatch, 1)
    with pytest.raises(Killed):
        fit(tmp_path, 2, tensorboard=True)
    assert epochs_logged(tmp_path) == [1] and not (tmp_path / "checkpoints" / "last.pt").exists()
    monkeypatch.undo()
    fit(tmp_path, 2, resume=True, tensorboard=True)
    assert epochs_logged(tmp_path) == [1, 2]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [s.step for s in events.Scalars("train_loss/seg")] == [1, 2]


def test_kill_between_the_best_and_last_checkpoints(tmp_path, monkeypatch):
    """Epoch 1 always improves, so it writes best.pt and last.pt; a kill between the two must not leave a
    last.pt whose recorded best epoch has no best.pt (or an older one)."""
    reference = fit(tmp_path / "ref", 1)
    kill_at_save(monkeypatch, 2)
    with pytest.raises(Killed):
        fit(tmp_path / "run", 1)
    monkeypatch.undo()
    resumed = fit(tmp_path / "run", 1, resume=True)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["run"]["best_epoch"] == best["epoch"] == 1
    ref_state = reference.state_dict()
    assert all(torch.equal(ref_state[k], v) for k, v in resumed.state_dict().items())
    assert all(torch.equal(ref_state[k], v) for k, v in best["model"].items())
