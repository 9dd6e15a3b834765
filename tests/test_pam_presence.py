"""PAM's presence testbed (issue 16): digit-presence composites from the bundled digits, ±1 labels split into
tasks low (0–4) and high (5–9), trained with tanh + MSE (PresenceTask), which the merge pipeline picks."""

from __future__ import annotations

import pytest
import torch

from mtprune import data as D
from mtprune.data.presence import PRESENCE_TASKS
from mtprune.merging.experiment import tasks_of
from mtprune.merging.tasks import PresenceTask
from mtprune.utils.errors import MTPruneInputError


def test_presence_composites_and_labels():
    ds = D.load("presence", split="train", n_train=64, digits=3, seed=0)
    x, y = ds[0]
    assert x.shape == (3, 28, 28) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y) == {"low", "high"} and y["low"].shape == (5,) and y["high"].shape == (5,)
    both = torch.cat([ds.targets["low"], ds.targets["high"]], 1)
    assert set(both.unique().tolist()) == {-1.0, 1.0}
    present = (both > 0).sum(1)
    assert bool((present >= 1).all()) and bool((present <= 3).all())  # 3 digits, repeats allowed
    assert torch.equal(both > 0, ds.presence.bool())
    again = D.load("presence", split="train", n_train=64, digits=3, seed=0)
    assert torch.equal(again.images, ds.images)  # deterministic
    val = D.load("presence", split="val", n_val=64, seed=0)
    assert not torch.equal(val.images, ds.images)
    assert ds.kinds == {"low": "multilabel", "high": "multilabel"} and ds.num_classes == {"low": 5, "high": 5}
    assert PRESENCE_TASKS["high"] == (5, 6, 7, 8, 9)


def test_presence_refuses_bad_arguments():
    with pytest.raises(MTPruneInputError, match="digits"):
        D.load("presence", digits=5)
    with pytest.raises(MTPruneInputError, match="split"):
        D.load("presence", split="test")
    with pytest.raises(MTPruneInputError, match="unknown"):
        D.load("presence", tasks=["middle"])


def test_presence_task_is_tanh_mse_and_is_picked_for_signed_targets():
    ds = D.load("presence", split="train", n_train=16)
    tasks = tasks_of(ds, ["low", "high"])
    assert all(isinstance(t, PresenceTask) for t in tasks.values())
    target = torch.tensor([[1.0, -1.0]])
    pred = torch.tensor([[0.5, -2.0]])
    want = ((torch.tanh(pred) - target) ** 2).mean()
    torch.testing.assert_close(tasks["low"].loss(pred, target), want)
    meter = tasks["low"].new_meter()
    meter.update(torch.tensor([[0.3, 0.2]]), target)  # signs: right, wrong
    assert meter.compute()["acc"] == pytest.approx(50.0)
    multi = D.load("multidigits", split="train", n_train=16, tasks=["parity"])
    assert not isinstance(tasks_of(multi, ["parity"])["parity"], PresenceTask)  # {0, 1} targets keep BCE
