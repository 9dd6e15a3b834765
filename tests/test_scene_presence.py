"""The CelebA-like presence testbed for PAM's VGG-16 (issue 16): synthetic_scenes' object presence as ±1 labels,
object classes split into two tasks (He et al., KDD 2021, split CelebA's attributes 0–19 / 20–39)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtprune import data as D
from mtprune.data.scene_presence import object_groups
from mtprune.merging.experiment import tasks_of
from mtprune.merging.tasks import PresenceTask
from mtprune.utils.errors import MTPruneInputError

TINY = {"n_train": 48, "n_val": 8, "seed": 0}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))


def test_groups_partition_the_object_classes():
    groups = object_groups(12)
    assert groups["objects_a"] == (0, 1, 2, 3, 4) and groups["objects_b"] == (5, 6, 7, 8, 9)
    for num_classes in (4, 7, 12):
        g = object_groups(num_classes)
        a, b = set(g["objects_a"]), set(g["objects_b"])
        assert a and b and not a & b and a | b == set(range(num_classes - 2)) == set(g["objects"])
        assert max(a) < min(b)  # the first half, then the second


def test_targets_are_signed_presence_of_the_stored_scenes():
    ds = D.load("scene_presence", split="train", tasks=["objects_a", "objects_b", "objects"], **TINY)
    assert len(ds) == 48 and ds.signed_targets and ds.num_classes == {"objects_a": 5, "objects_b": 5, "objects": 10}
    image, targets = ds[3]
    assert image.shape == (3, 32, 40) and image.min() >= 0.0 and image.max() <= 1.0
    for t, v in ds.targets.items():
        assert set(v.unique().tolist()) <= {-1.0, 1.0}, t
    assert torch.equal(torch.cat([ds.targets["objects_a"], ds.targets["objects_b"]], 1), ds.targets["objects"])
    # +1 exactly when the object class covers at least 1 % of the stored label map (object k = scene class k + 2)
    for i in (0, 7, 31):
        label = np.load(ds.root / "train" / "label" / f"{i}.npy")
        visible = [(label == k + 2).mean() >= 0.01 for k in range(10)]
        assert ds.targets["objects"][i].tolist() == [1.0 if v else -1.0 for v in visible]
    rates = ds.presence.mean(0)
    assert bool(((rates > 0.1) & (rates < 0.6)).all()), rates  # every class is seen, none is always there
    assert torch.equal(D.load("scene_presence", split="train", **TINY).targets["objects_b"], ds.targets["objects_b"])
    assert isinstance(tasks_of(ds, ["objects_a"])["objects_a"], PresenceTask)  # tanh + MSE in mtprune merge


def test_a_target_flips_with_the_object(tmp_path):
    root = tmp_path / "scenes"
    D.load("scene_presence", root=root, split="val", **TINY)
    path = root / "val" / "label" / "0.npy"
    label = np.zeros((32, 40), dtype=np.float32)  # wall only: nothing present
    label[:4, :4] = 7 + 2  # object class 7 covers 16 of 1280 pixels (1.25 %): present
    np.save(path, label)
    on = D.load("scene_presence", root=root, split="val", **TINY)
    assert on.targets["objects_b"][0].tolist() == [-1.0, -1.0, 1.0, -1.0, -1.0]
    assert on.targets["objects_a"][0].tolist() == [-1.0] * 5
    label[:4, :4] = 0
    label[:3, :4] = 7 + 2  # 12 pixels (0.94 %): below the 1 % of ATTR_MIN_FRACTION, absent
    np.save(path, label)
    off = D.load("scene_presence", root=root, split="val", **TINY)
    assert off.targets["objects_b"][0].tolist() == [-1.0] * 5
    assert torch.equal(off.targets["objects_a"][1:], on.targets["objects_a"][1:])  # the other scenes are unchanged


def test_bad_arguments_are_refused_before_generating(tmp_path):
    root = tmp_path / "never"
    for kw, match in (({"tasks": ["objects_c"]}, "objects_c"), ({"split": "test"}, "unknown split"),
                      ({"num_classes": 3}, "num_classes"), ({"bogus": 1}, "bogus")):
        with pytest.raises(MTPruneInputError, match=match):
            D.load("scene_presence", root=root, **{**TINY, **kw})
    assert not root.exists()
