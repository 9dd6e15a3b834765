"""Schedules: iterative (targets, trajectory, resume after an interruption), interleaved (Garg et al.), and
retraining a recorded architecture from scratch."""

from __future__ import annotations

import pytest
import torch

import mtprune
from mtprune.engine.trainer import TrainConfig
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.schedule import interleaved_prune, iterative_prune, rebuild_from_widths
from mtprune.tasks import preset
from mtprune.utils.errors import MTPruneInputError

TASKS = preset("synthetic_scenes")
NAMES = ["seg", "depth", "normal"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    kw = {"n_train": 12, "n_val": 6, "height": 32, "width": 40}
    train = mtprune.data.load("synthetic_scenes", root=root, split="train", tasks=NAMES, **kw)
    val = mtprune.data.load("synthetic_scenes", root=root, split="val", tasks=NAMES, **kw)
    return train, val


def tasks():
    return {n: TASKS[n] for n in NAMES}


def make():
    torch.manual_seed(0)
    return mtprune.build_model("deeplab_resnet18", {n: TASKS[n].out_channels for n in NAMES}, width=0.125,
                               head="conv")


X = torch.zeros(1, 3, 32, 40)
FT = TrainConfig(epochs=1, batch_size=6, quiet=True, tensorboard=False, device="cpu")


def test_iterative_reaches_target_in_steps_and_resumes_identically(scenes, tmp_path):
    train, val = scenes
    kw = {"criterion": "taylor", "target_macs": 0.4, "steps": 2, "finetune": FT, "stats_batches": 1,
          "stats_batch_size": 6}
    full, records = iterative_prune(make(), X, tasks(), train, val, tmp_path / "a", **kw)
    assert [r.step for r in records] == [0, 1, 2]
    macs = [r.macs for r in records]
    assert macs[2] / macs[0] == pytest.approx(0.4, rel=0.02)
    assert macs[1] / macs[0] == pytest.approx(0.4 ** 0.5, rel=0.02)  # geometric steps
    assert set(records[1].metrics) == set(NAMES)

    class Killed(Exception):
        pass

    def die(rec):
        if rec.step == 1:
            raise Killed

    with pytest.raises(Killed):
        iterative_prune(make(), X, tasks(), train, val, tmp_path / "b", on_step=die, **kw)
    resumed, records_b = iterative_prune(make(), X, tasks(), train, val, tmp_path / "b", resume=True, **kw)
    assert [r.step for r in records_b] == [0, 1, 2]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interleaved_removes_filters_every_interval_and_records_widths(scenes, tmp_path):
    train, val = scenes
    model, records = interleaved_prune(make(), X, tasks(), train, val, tmp_path, criterion="cosprune", interval=2,
                                       filters_per_step=6, max_steps=2, batch_size=6, device="cpu")
    assert [r.step for r in records] == [0, 1, 2] and [r.iteration for r in records] == [0, 2, 4]
    totals = [sum(r.widths.values()) for r in records]
    assert totals[0] - totals[1] == 6 and totals[1] - totals[2] == 6
    backbone = {g.root for g in PruningGraph(make(), X).groups if g.part == "backbone"}
    changed = {k for k in records[0].widths if records[0].widths[k] != records[2].widths[k]}
    assert changed and changed <= backbone  # cosprune only ranks shared filters
    assert PruningGraph(model, X).widths() == records[-1].widths
    assert all(r.extra.get("best_val_loss", 0) < float("inf") for r in records[1:])


def test_interleaved_stops_at_macs_target(scenes, tmp_path):
    train, val = scenes
    _, records = interleaved_prune(make(), X, tasks(), train, val, tmp_path, criterion="l1", interval=1,
                                   filters_per_step=20, max_steps=50, target_macs=0.7, batch_size=6, device="cpu")
    assert records[-1].macs <= 0.7 * records[0].macs < records[-2].macs


def test_rebuild_from_widths_gives_the_recorded_architecture_freshly_initialised():
    pruned = make()
    mtprune.prune(pruned, X, "l1", channel_ratio=0.4)
    widths = PruningGraph(pruned, X).widths()
    fresh = rebuild_from_widths(make, X, widths, seed=3)
    assert PruningGraph(fresh, X).widths() == widths
    a, b = pruned.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    convs = [k for k, v in a.items() if v.dim() == 4]
    assert not any(torch.equal(a[k], b[k]) for k in convs)  # every layer re-initialised
    fresh(X)["seg"].sum().backward()


def test_interleaved_params_per_step_removes_matched_parameters_for_any_criterion(scenes, tmp_path):
    """Garg et al. compare criteria at equal parameters: a parameter budget per step lands both on the same
    counts, although they remove different numbers of filters."""
    train, val = scenes
    kept, removed = {}, {}
    for crit in ("l1", "cosprune"):
        _, records = interleaved_prune(make(), X, tasks(), train, val, tmp_path / crit, criterion=crit, interval=1,
                                       params_per_step=0.1, max_steps=2, batch_size=6, device="cpu",
                                       exclude_parts=NAMES)
        p0 = records[0].params
        kept[crit] = [r.params / p0 for r in records]
        removed[crit] = sum(records[0].widths.values()) - sum(records[-1].widths.values())
        assert kept[crit] == pytest.approx([1.0, 0.9, 0.8], abs=0.01)
    assert removed["l1"] != removed["cosprune"]  # equal parameters, not equal filter counts


def test_interleaved_control_trains_on_the_same_schedule_without_removing(scenes, tmp_path):
    train, val = scenes
    _, records = interleaved_prune(make(), X, tasks(), train, val, tmp_path, criterion="l1", interval=2,
                                   filters_per_step=0, max_steps=2, batch_size=6, device="cpu")
    assert [r.step for r in records] == [0, 1, 2] and [r.iteration for r in records] == [0, 2, 4]
    assert all(r.widths == records[0].widths and r.params == records[0].params for r in records)
    assert records[2].metrics != records[0].metrics  # it trained
    with pytest.raises(MTPruneInputError, match="params_per_step"):
        interleaved_prune(make(), X, tasks(), train, val, tmp_path / "bad", params_per_step=1.5)


def test_resuming_a_schedule_with_other_settings_is_refused(scenes, tmp_path):
    """A run directory holds one experiment: resuming it with another removal rule must not hand back (or
    continue) the stored trajectory as if it were the new one."""
    train, val = scenes
    kw = {"criterion": "l1", "interval": 1, "max_steps": 1, "batch_size": 6, "device": "cpu"}
    _, first = interleaved_prune(make(), X, tasks(), train, val, tmp_path / "i", filters_per_step=4, **kw)
    _, again = interleaved_prune(make(), X, tasks(), train, val, tmp_path / "i", filters_per_step=4, resume=True,
                                 **kw)
    assert [r.widths for r in again] == [r.widths for r in first]  # same settings: the stored trajectory
    with pytest.raises(MTPruneInputError, match="params_per_step"):
        interleaved_prune(make(), X, tasks(), train, val, tmp_path / "i", params_per_step=0.1, resume=True, **kw)
    it = {"criterion": "l1", "steps": 1, "finetune": TrainConfig(epochs=0, batch_size=6, quiet=True,
                                                                  device="cpu")}
    iterative_prune(make(), X, tasks(), train, val, tmp_path / "t", target_macs=0.5, **it)
    with pytest.raises(MTPruneInputError, match="target_macs"):
        iterative_prune(make(), X, tasks(), train, val, tmp_path / "t", target_macs=0.3, resume=True, **it)


def test_interleaved_records_every_step_recovered_after_an_interval_of_training(scenes, tmp_path):
    train, val = scenes
    model, records = interleaved_prune(make(), X, tasks(), train, val, tmp_path, criterion="l1", interval=2,
                                       filters_per_step=6, max_steps=2, batch_size=6, device="cpu")
    assert [r.extra.get("recovered_iteration") for r in records] == [None, 4, 6]  # the last step trains on too
    assert all(set(r.extra["recovered"]) == set(NAMES) for r in records[1:])
    assert records[2].extra["recovered"] != records[2].metrics  # trained on after the removal
    from mtprune.engine.evaluate import evaluate

    assert evaluate(model, val, tasks(), device="cpu", batch_size=6) == records[2].extra["recovered"]
    resumed, again = interleaved_prune(make(), X, tasks(), train, val, tmp_path, criterion="l1", interval=2,
                                       filters_per_step=6, max_steps=2, batch_size=6, device="cpu", resume=True)
    assert again == records  # a finished schedule resumed: its records and its recovered model
    assert evaluate(resumed, val, tasks(), device="cpu", batch_size=6) == records[2].extra["recovered"]
