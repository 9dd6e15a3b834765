"""engine/: loss weighting, training, resume, checkpoints, NaN guard, evaluation."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtprune.engine import (
    NonFiniteLossError,
    RunState,
    TrainConfig,
    build_weighting,
    evaluate,
    load_checkpoint,
    selection_score,
    train,
)
from mtprune.engine.logging import RunLogger, progress_enabled
from mtprune.tasks import DepthTask, SegmentationTask
from mtprune.utils.errors import MTPruneInputError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops are far faster on one thread (and deterministic either way on CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- a tiny learnable 2-task problem


class ToyScenes(Dataset):
    """8×8 images; seg = argmax of a fixed channel mix (3 classes), depth = a positive linear map."""

    kinds = {"seg": "seg", "depth": "depth"}

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 8, 8, generator=g)
        mix = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 2.0, 0.0], [0.0, 0.3, 1.5]])
        self.seg = torch.einsum("kc,nchw->nkhw", mix, self.images).argmax(1)
        self.depth = (0.5 + self.images[:, :1] + 0.5 * self.images[:, 2:3]).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], {"seg": self.seg[i], "depth": self.depth[i]}


class TinyNet(nn.Module):
    """Shared conv backbone, one 1×1 conv head per task; returns ``{task: Tensor}``."""

    CHANNELS = {"seg": 3, "depth": 1, "extra": 2}

    def __init__(self, dropout: float = 0.0, heads: tuple[str, ...] = ("seg", "depth")) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(dropout))
        self.heads = nn.ModuleDict({t: nn.Conv2d(8, self.CHANNELS[t], 1) for t in heads})

    def forward(self, x):
        feat = self.backbone(x)
        return {t: head(feat) for t, head in self.heads.items()}


def toy_tasks():
    return {"seg": SegmentationTask("seg", 3), "depth": DepthTask()}


def make_model(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def quick(**options) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 4, "lr": 0.02, "quiet": True, "tensorboard": False, "seed": 0}
    return TrainConfig(**{**base, **options})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- weighting


def losses_of(a: float, b: float):
    return {"seg": torch.tensor(a), "depth": torch.tensor(b)}


def test_equal_weighting_sums():
    w = build_weighting("equal", ["seg", "depth"])
    assert float(w.combine(losses_of(1.5, 2.0))) == pytest.approx(3.5)


def test_fixed_weighting_uses_weights_by_name():
    w = build_weighting("fixed", ["seg", "depth"], weights={"depth": 10.0, "seg": 0.5})
    assert float(w.combine(losses_of(2.0, 0.3))) == pytest.approx(0.5 * 2.0 + 10.0 * 0.3)
    with pytest.raises(MTPruneInputError, match="depth"):
        build_weighting("fixed", ["seg", "depth"], weights={"seg": 1.0})


def test_uncertainty_gradients_reach_log_variances():
    w = build_weighting("uncertainty", ["seg", "depth"])
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.0, 1.0]))
    total = w.combine(losses_of(2.0, 3.0))
    assert total.item() == pytest.approx(2.0 + math.exp(-1.0) * 3.0 + 1.0)
    total.backward()
    # d/ds [exp(-s) L + s] = 1 - exp(-s) L
    expected = torch.tensor([1 - 2.0, 1 - math.exp(-1.0) * 3.0])
    assert torch.allclose(w.log_vars.grad, expected)


def test_dwa_matches_hand_computation():
    w = build_weighting("dwa", ["seg", "depth"], temperature=2.0)
    assert w.weights() == {"seg": 1.0, "depth": 1.0}
    w.epoch_end({"seg": 1.0, "depth": 2.0})
    assert w.weights() == {"seg": 1.0, "depth": 1.0}  # equal for the first two epochs
    w.epoch_end({"seg": 0.5, "depth": 1.8})
    r = [0.5 / 1.0, 1.8 / 2.0]
    e = [math.exp(x / 2.0) for x in r]
    expected = {"seg": 2 * e[0] / sum(e), "depth": 2 * e[1] / sum(e)}
    assert w.weights() == pytest.approx(expected)
    assert float(w.combine(losses_of(1.0, 1.0))) == pytest.approx(2.0)
    restored = build_weighting("dwa", ["seg", "depth"])
    restored.load_state_dict(w.state_dict())
    assert restored.weights() == pytest.approx(expected)


def test_build_weighting_names_bad_input():
    with pytest.raises(MTPruneInputError, match="unknown loss weighting"):
        build_weighting("gradnorm", ["a"])
    with pytest.raises(MTPruneInputError, match="dwa"):
        build_weighting("dwa", ["a"], tau=3)
    with pytest.raises(MTPruneInputError, match="expects losses"):
        build_weighting("equal", ["a", "b"]).combine({"a": torch.tensor(1.0)})


# ---------------------------------------------------------------- training


def test_training_reduces_the_loss(tmp_path):
    summary = train(make_model(), toy_tasks(), ToyScenes(32), ToyScenes(16, seed=1), tmp_path,
                    quick(epochs=8, optimizer="adam", lr=0.05))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    first, last = records[0], records[-1]
    for t in ("seg", "depth"):
        assert last["train_loss"][t] < 0.7 * first["train_loss"][t]
        assert last["val"][t]["loss"] < first["val"][t]["loss"]
    assert summary.best_epoch > 1 and summary.best_score > 0
    assert summary.final_metrics == last["val"]


class SabotagedDepth(DepthTask):
    """After ``after`` training steps its loss turns NaN (``nan=True``) or the process "dies" (raises)."""

    def __init__(self, after: int, nan: bool = False) -> None:
        super().__init__("depth")
        self.after, self.nan, self.calls = after, nan, 0

    def loss(self, pred, target):
        loss = super().loss(pred, target)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.after:
                if not self.nan:
                    raise KeyboardInterrupt("killed")
                return loss * float("nan")
        return loss


@pytest.mark.parametrize("weighting", ["dwa", "uncertainty"])
def test_kill_and_resume_is_bit_exact(tmp_path, weighting):
    """3 epochs uninterrupted == killed during epoch 3, then resumed in a fresh state (torch.equal)."""
    cfg = quick(epochs=3, weighting=weighting, scheduler="cosine", optimizer="adamw", weight_decay=1e-3)
    data, val = ToyScenes(24), ToyScenes(8, seed=1)  # 6 steps per epoch
    full = make_model(dropout=0.3)
    train(full, toy_tasks(), data, val, tmp_path / "full", cfg)

    with pytest.raises(KeyboardInterrupt):
        train(make_model(dropout=0.3), {"seg": SegmentationTask("seg", 3), "depth": SabotagedDepth(14)},
              data, val, tmp_path / "part", cfg)
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["epoch"] == 2
    resumed = make_model(seed=123, dropout=0.3)  # another init, and the global RNGs moved on
    torch.manual_seed(999)
    np.random.seed(999)
    summary = train(resumed, toy_tasks(), data, val, tmp_path / "part", cfg, resume=True)

    assert summary.epochs_run == 1
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck_full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    ck_part = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert ck_full["epoch"] == ck_part["epoch"] == 3
    for key in ck_full["weighting"]:
        assert torch.equal(ck_full["weighting"][key], ck_part["weighting"][key])

    def records(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(tmp_path / run / "metrics.jsonl")]

    assert records("full") == records("part")


def test_metrics_jsonl_and_atomic_checkpoints(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mtprune"):
        summary = train(make_model(), toy_tasks(), ToyScenes(16), ToyScenes(8, seed=1), tmp_path,
                        quick(epochs=2, tensorboard=True, amp=True))
    assert "amp applies on CUDA only" in caplog.text
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for epoch, line in enumerate(lines, start=1):
        rec = json.loads(line)
        assert rec["epoch"] == epoch
        assert set(rec["train_loss"]) == {"seg", "depth"}
        assert set(rec["val"]["seg"]) == {"miou", "pixel_acc", "loss"}
        assert {"lr", "time", "score", "weights"} <= set(rec)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["tasks"] == ["seg", "depth"]
    assert {"model", "optimizer", "scheduler", "weighting", "rng", "run"} <= set(ckpt)
    best = torch.load(summary.best_checkpoint, weights_only=True)
    assert best["epoch"] == summary.best_epoch


def test_nan_loss_stops_naming_the_task_and_keeps_the_last_checkpoint(tmp_path):
    # 16 samples / batch 4 = 4 steps per epoch: the NaN comes at epoch 2, step 1
    tasks = {"seg": SegmentationTask("seg", 3), "depth": SabotagedDepth(after=4, nan=True)}
    with pytest.raises(NonFiniteLossError, match=r"\['depth'\]") as err:
        train(make_model(), tasks, ToyScenes(16), ToyScenes(8, seed=1), tmp_path, quick(epochs=3))
    assert "'seg'" not in str(err.value) and isinstance(err.value, MTPruneInputError)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_model_lacking_a_task_output_is_named(tmp_path):
    with pytest.raises(MTPruneInputError, match=r"output lacks tasks \['depth'\]"):
        train(make_model(heads=("seg",)), toy_tasks(), ToyScenes(4), ToyScenes(4), tmp_path, quick(epochs=1))
    assert not (tmp_path / "checkpoints").exists()


def test_extra_model_outputs_are_ignored(tmp_path):
    summary = train(make_model(heads=("seg", "depth", "extra")), toy_tasks(), ToyScenes(8), ToyScenes(4), tmp_path,
                    quick(epochs=1))
    assert set(summary.final_metrics) == {"seg", "depth"}


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mtprune"):
        summary = train(make_model(), toy_tasks(), ToyScenes(8), ToyScenes(4), tmp_path, quick(epochs=1),
                        resume=True)
    assert "no checkpoint" in caplog.text and summary.epochs_run == 1


def test_run_logger_lines_and_resume_truncation(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    for epoch in (1, 2, 3):
        logger.log_epoch({"epoch": epoch, "val": {"seg": {"miou": float("nan") if epoch == 2 else 1.0}}})
    assert read_jsonl(tmp_path / "metrics.jsonl")[1]["val"]["seg"]["miou"] is None  # strict JSON
    logger.drop_after(2)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    RunLogger(tmp_path / "other", enabled=False).log_epoch({"epoch": 1})
    assert not (tmp_path / "other").exists()
    assert not progress_enabled(quiet=True)
    assert not progress_enabled(quiet=False)  # pytest's stdout is not a terminal


def test_bad_train_options_are_named():
    with pytest.raises(MTPruneInputError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(MTPruneInputError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(MTPruneInputError, match="epochz"):
        train(make_model(), toy_tasks(), ToyScenes(4), ToyScenes(4), "unused", epochz=3)
    with pytest.raises(MTPruneInputError, match=r"depth/rel_err"):
        reference = {"seg": {"miou": 50.0, "pixel_acc": 80.0}, "depth": {"abs_err": 0.1}}
        train(make_model(), toy_tasks(), ToyScenes(4), ToyScenes(4), "unused", reference=reference)


def test_selection_score_is_delta_m_or_minus_val_loss():
    tasks = toy_tasks()
    ref = {"seg": {"miou": 50.0, "pixel_acc": 80.0}, "depth": {"abs_err": 0.2, "rel_err": 0.1}}
    val = {
        "seg": {"miou": 55.0, "pixel_acc": 80.0, "loss": 1.0},
        "depth": {"abs_err": 0.1, "rel_err": 0.1, "loss": 2.0},
    }
    assert selection_score(val, ref, tasks) == pytest.approx(100 * (0.1 / 2 + 0.5 / 2) / 2)
    ref["seg"]["miou"] = 0.0  # Δm undefined
    assert selection_score(val, ref, tasks) == -3.0
    state = RunState()
    assert state.update(1, val, tasks) == (0.0, True) and state.reference["seg"] == {"miou": 55.0, "pixel_acc": 80.0}
    assert state.update(2, val, tasks) == (0.0, False) and state.best_epoch == 1


# ---------------------------------------------------------------- evaluation


class Oracle(nn.Module):
    """Fixed predictions from the image: seg logits = the image's first 3 channels, depth = channel 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.BatchNorm2d(1)

    def forward(self, x):
        return {"seg": x[:, :3] * self.scale, "depth": x[:, :1] * self.scale}


def test_evaluate_accumulates_over_the_split_and_restores_modes():
    data = ToyScenes(5, seed=3)
    data.depth[1, :, :4] = 0  # invalid pixels: uneven valid counts per batch
    data.seg[2, :2] = -1  # ignored pixels
    model = Oracle().train()
    model.frozen.eval()
    out = evaluate(model, data, toy_tasks(), device="cpu", batch_size=3, with_loss=True)  # batches of 3 and 2
    assert model.training and not model.frozen.training

    pred = data.images[:, :3].argmax(1)
    cm = np.zeros((3, 3))
    valid = data.seg >= 0
    np.add.at(cm, (data.seg[valid].numpy(), pred[valid].numpy()), 1)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert out["seg"]["miou"] == pytest.approx(100 * iou.mean())
    assert out["seg"]["pixel_acc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    dvalid = data.depth > 0
    err = (data.images[:, :1] - data.depth).abs()[dvalid]
    assert out["depth"]["abs_err"] == pytest.approx(float(err.mean()))
    assert out["depth"]["rel_err"] == pytest.approx(float((err / data.depth[dvalid]).mean()))
    batches = ((slice(0, 3), 3), (slice(3, 5), 2))
    per_batch = [(data.images[s, :1] - data.depth[s]).abs()[data.depth[s] > 0].mean() for s, _ in batches]
    assert float(sum(per_batch) / 2) != pytest.approx(out["depth"]["abs_err"])  # not a mean of batch means
    losses = [DepthTask().loss(data.images[s, :1], data.depth[s]) * n for s, n in batches]
    assert out["depth"]["loss"] == pytest.approx(float(sum(losses) / 5))
    from_loader = evaluate(model, DataLoader(data, batch_size=2), toy_tasks(), device="cpu")
    for task, metrics in from_loader.items():
        assert metrics == pytest.approx({m: out[task][m] for m in metrics})


def test_evaluate_names_missing_task_outputs_and_targets():
    model = make_model(heads=("seg",))
    with pytest.raises(MTPruneInputError, match=r"output lacks tasks \['depth'\]"):
        evaluate(model, ToyScenes(2), toy_tasks(), device="cpu")
    assert model.training
    with pytest.raises(MTPruneInputError, match=r"no targets for tasks \['edges'\]"):
        evaluate(model, ToyScenes(2), {"seg": SegmentationTask("seg", 3), "edges": DepthTask("edges")})
