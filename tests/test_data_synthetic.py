"""The no-download datasets: synthetic_scenes (generator, cache, target consistency) and multidigits."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

import mtprune
import mtprune.data as D
from mtprune.data import synthetic_scenes as S
from mtprune.data.multidigits import CANVAS, DIGIT, LEFT_X, MAX_Y, RIGHT_X, MultiDigits
from mtprune.utils.errors import MTPruneInputError

TINY = {"n_train": 5, "n_val": 3, "height": 24, "width": 32}
TINY_CLASSES = S.SceneParams.num_classes


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_generation_is_deterministic_per_seed(tmp_path):
    a = S.generate(tmp_path / "a", S.SceneParams(**TINY))
    b = S.generate(tmp_path / "b", S.SceneParams(**TINY))
    c = S.generate(tmp_path / "c", S.SceneParams(**TINY, seed=1))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 5 * (5 + 3) and fa == fb
    assert fa.keys() == fc.keys() and fa != fc
    # a scene depends on (seed, split, index) only, not on the split sizes
    d = S.generate(tmp_path / "d", S.SceneParams(**{**TINY, "n_train": 2}))
    assert all(fa[k] == v for k, v in _files(d).items() if k.parts[0] == "train")


def test_load_generates_once_then_reuses_the_cache(cache, monkeypatch):
    ds = D.load("synthetic_scenes", split="val", **TINY)
    root = cache / "synthetic_scenes" / S.SceneParams(**TINY).digest()
    assert ds.root == root and (root / "params.json").is_file() and len(ds) == 3
    assert not list(root.parent.glob(".tmp-*"))  # the temporary folder was renamed into place
    stamp = (root / "params.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(S, "render_scene", boom)
    again = D.load("synthetic_scenes", split="train", **TINY)
    assert len(again) == 5 and (root / "params.json").stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="regenerated"):
        D.load("synthetic_scenes", **{**TINY, "seed": 9})  # other params → another folder, generated


def test_killed_generation_leaves_nothing(tmp_path, monkeypatch):
    real = S.write_split

    def dies_on_val(folder, params, palette, split, n):
        if split == "val":
            raise KeyboardInterrupt
        real(folder, params, palette, split, n)

    monkeypatch.setattr(S, "write_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        S.generate(tmp_path / "scenes", S.SceneParams(**TINY))
    assert list(tmp_path.iterdir()) == []


def test_explicit_root_and_parameter_checks(tmp_path):
    ds = D.load("synthetic_scenes", root=tmp_path / "s", **TINY)
    assert ds.params["height"] == 24 and len(ds) == 5
    assert len(D.load("synthetic_scenes", root=tmp_path / "s")) == 5  # read back without params
    with pytest.raises(MTPruneInputError, match="other parameters"):
        D.load("synthetic_scenes", root=tmp_path / "s", n_train=7)
    with pytest.raises(MTPruneInputError, match="unknown parameter"):
        D.load("synthetic_scenes", root=tmp_path / "s", colour=1)
    with pytest.raises(MTPruneInputError, match="num_classes"):
        D.load("synthetic_scenes", root=tmp_path / "t", num_classes=2)
    with pytest.raises(MTPruneInputError, match="missing split 'test'"):
        D.load("synthetic_scenes", root=tmp_path / "s", split="test")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dataset")
    with pytest.raises(MTPruneInputError, match="not empty"):
        D.load("synthetic_scenes", root=tmp_path / "other")


def test_fresh_training_scenes_every_epoch_deterministic_and_resumable(tmp_path):
    train = D.load("synthetic_scenes", root=tmp_path / "s", **TINY)
    assert train.fresh and train.epoch == 0

    def epoch(ds, e):
        ds.set_epoch(e)
        return [ds[i] for i in range(len(ds))]

    stored, first = epoch(train, 0), epoch(train, 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(stored, first, strict=True))  # epochs 0, 1: the pool
    e2, e3 = epoch(train, 2), epoch(train, 3)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, e2, strict=True))  # new scenes...
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(e2, e3, strict=True))  # ...every epoch
    again = D.load("synthetic_scenes", root=tmp_path / "s")  # another process, e.g. a resumed run
    for a, b in zip(e3, epoch(again, 3), strict=True):
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][t], b[1][t]) for t in a[1])
    params = S.SceneParams(**TINY)
    ref = S.render_scene(S.scene_rng(params, "train", 1, 3), params, S.make_palette(params))
    assert torch.equal(e3[1][1]["depth"], torch.from_numpy(ref["depth"]).permute(2, 0, 1))
    # the targets of a fresh scene keep their contract (seg classes, attribute tasks from its label map)
    attrs = D.load("synthetic_scenes", root=tmp_path / "s", tasks=["seg", "count"])
    attrs.set_epoch(2)
    image, targets = attrs[0]
    assert targets["seg"].shape == image.shape[1:] and int(targets["count"]) <= TINY_CLASSES - 2
    # fresh=False keeps the pool; the validation split never changes
    pool, val = D.load("synthetic_scenes", root=tmp_path / "s", fresh=False), D.load(
        "synthetic_scenes", root=tmp_path / "s", split="val")
    assert torch.equal(epoch(pool, 5)[0][0], stored[0][0])
    assert not val.fresh and torch.equal(epoch(val, 5)[0][0], epoch(val, 0)[0][0])


def test_trainer_announces_the_epoch_through_wrappers(tmp_path):
    from mtprune.engine.trainer import set_data_epoch

    train = D.load("synthetic_scenes", root=tmp_path / "s", **TINY)
    set_data_epoch(torch.utils.data.Subset(train, [0, 1]), 4)
    assert train.epoch == 4
    set_data_epoch(torch.utils.data.TensorDataset(torch.zeros(2)), 4)  # no hook: nothing happens
    # a training run tells the dataset each epoch before drawing its batches
    from mtprune.engine.trainer import TrainConfig, Trainer

    seen = []

    class Recording(type(train)):
        def set_epoch(self, epoch):
            seen.append(epoch)
            super().set_epoch(epoch)

    data = Recording(train.root, "train", params=train.params, tasks=["depth"], fresh=True)
    tasks = mtprune.tasks.preset("synthetic_scenes", num_classes=TINY_CLASSES)
    tasks = {"depth": tasks["depth"]}
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, x):
            return {"depth": self.conv(x)}

    torch.manual_seed(0)
    model = Tiny()
    Trainer(model, tasks, data, D.load("synthetic_scenes", root=tmp_path / "s", split="val", tasks=["depth"]),
            tmp_path / "run", TrainConfig(epochs=2, batch_size=5, device="cpu", quiet=True, tensorboard=False)).fit()
    assert seen == [1, 2, 0] and data.epoch == 0  # back to the stored pool once training is over


def test_loader_follows_the_sample_contract(tmp_path):
    ds = D.load("synthetic_scenes", root=tmp_path, **TINY)
    assert ds.kinds == {"seg": "seg", "depth": "depth", "normal": "normal", "edge": "edge"}
    assert ds.num_classes == {"seg": 7}
    image, t = ds[0]
    assert image.shape == (3, 24, 32) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    assert t["seg"].dtype == torch.int64 and t["seg"].shape == (24, 32)
    assert t["depth"].shape == (1, 24, 32) and t["normal"].shape == (3, 24, 32) and t["edge"].shape == (1, 24, 32)
    only = D.load("synthetic_scenes", root=tmp_path, tasks=["seg", "edge"])
    assert list(only[0][1]) == ["seg", "edge"]


def _scenes(n=12, **kw):
    p = S.SceneParams(**{**TINY, **kw, "height": 48, "width": 64})
    pal = S.make_palette(p)
    return p, [S.render_scene(S.scene_rng(p, "train", i), p, pal) for i in range(n)]


def _label_boundary(label):
    b = np.zeros(label.shape, bool)
    dv, dh = label[1:] != label[:-1], label[:, 1:] != label[:, :-1]
    b[1:] |= dv
    b[:-1] |= dv
    b[:, 1:] |= dh
    b[:, :-1] |= dh
    return b


def test_targets_are_consistent():
    p, scenes = _scenes()
    m = S.VIEW_HEIGHT_M / p.height
    for sc in scenes:
        label, depth, normal, edge = sc["label"], sc["depth"][..., 0], sc["normal"], sc["edge"][..., 0]
        assert sc["image"].dtype == np.float32 and sc["image"].shape == (48, 64, 3)
        assert np.array_equal(label, label.round()) and label.min() >= 0 and label.max() < p.num_classes
        assert depth.min() >= S.MIN_DEPTH_M  # never 0 (0 means invalid)
        assert np.allclose(np.linalg.norm(normal, axis=2), 1.0, atol=1e-5)
        assert normal[..., 2].min() > 0  # every visible plane faces the viewer
        assert set(np.unique(edge)) <= {0.0, 1.0}
        boundary = _label_boundary(label)
        assert edge[boundary].all()  # every label boundary is an edge
        extra = (edge > 0) & ~boundary  # other edges are occlusions: a depth jump to a neighbour
        jump = np.zeros_like(extra)
        dv = np.abs(depth[1:] - depth[:-1]) > S.EDGE_JUMP * np.minimum(depth[1:], depth[:-1])
        dh = np.abs(depth[:, 1:] - depth[:, :-1]) > S.EDGE_JUMP * np.minimum(depth[:, 1:], depth[:, :-1])
        jump[1:] |= dv
        jump[:-1] |= dv
        jump[:, 1:] |= dh
        jump[:, :-1] |= dh
        assert not (extra & ~jump).any()
        # the normal of z = a + b·x + c·y is (b, c, 1)/‖·‖: compare with finite differences of depth
        same = (normal[:, :-2] == normal[:, 2:]).all(-1) & (normal[:, 1:-1] == normal[:, 2:]).all(-1)
        dzdx = (depth[:, 2:] - depth[:, :-2]) / (2 * m)
        n = normal[:, 1:-1]
        assert same.sum() > 100
        assert np.allclose(dzdx[same], (n[..., 0] / n[..., 2])[same], atol=2e-3)
        same_v = (normal[:-2] == normal[2:]).all(-1) & (normal[1:-1] == normal[2:]).all(-1)
        dzdy = (depth[2:] - depth[:-2]) / (2 * m)
        nv = normal[1:-1]
        assert np.allclose(dzdy[same_v], (nv[..., 1] / nv[..., 2])[same_v], atol=2e-3)


def test_edges_are_exactly_label_boundaries_without_depth_edges():
    _, scenes = _scenes(6, depth_edges=False)
    for sc in scenes:
        assert np.array_equal(sc["edge"][..., 0] > 0, _label_boundary(sc["label"]))


def test_scenes_have_variety_and_confusers():
    p, scenes = _scenes(40)
    labels = np.stack([s["label"] for s in scenes]).astype(int)
    present = np.bincount(labels.ravel(), minlength=p.num_classes)
    assert (present > 0).all()  # every class occurs
    objects = labels >= 2
    assert 0.03 < objects.mean() < 0.6  # objects are neither rare nor everything
    # colour alone does not tell the object classes apart: nearest class-mean colour stays far from perfect
    rgb = np.stack([s["image"] for s in scenes])[objects]
    y = labels[objects]
    means = np.stack([rgb[y == c].mean(0) for c in range(2, p.num_classes)])
    guess = np.argmin(((rgb[:, None] - means[None]) ** 2).sum(-1), axis=1) + 2
    assert (guess == y).mean() < 0.75


def test_default_generation_is_fast():
    p = S.SceneParams()
    pal = S.make_palette(p)
    start = time.perf_counter()
    for i in range(60):
        S.render_scene(S.scene_rng(p, "train", i), p, pal)
    assert time.perf_counter() - start < 4.0  # ~10 ms on one core; 600 scenes stay far under 20 s


# ---------------------------------------------------------------- multidigits


def _composite(left, right, dyl, dxl, dyr, dxr) -> bytes:
    a = np.zeros((CANVAS, CANVAS), np.float32)
    a[dyl : dyl + DIGIT, dxl : dxl + DIGIT] = left
    a[dyr : dyr + DIGIT, dxr : dxr + DIGIT] = np.maximum(a[dyr : dyr + DIGIT, dxr : dxr + DIGIT], right)
    return a.tobytes()


def test_multidigits_labels_match_the_pasted_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    ds = MultiDigits("train", n_train=8, size=CANVAS, tasks=("left", "right", "parity", "sum_parity"))
    assert len(ds) == 8
    assert ds.kinds == {"left": "class", "right": "class", "parity": "multilabel", "sum_parity": "class"}
    assert ds.num_classes == {"left": 10, "right": 10, "parity": 2, "sum_parity": 2}
    for i in range(len(ds)):
        image, t = ds[i]
        li, ri = ds.left_index[i], ds.right_index[i]
        assert t["left"].item() == digits.target[li] and t["right"].item() == digits.target[ri]
        l, r = int(digits.target[li]), int(digits.target[ri])
        assert t["left"].dtype == torch.int64 and t["left"].shape == ()
        assert t["parity"].tolist() == [l % 2, r % 2] and t["sum_parity"].item() == (l + r) % 2
        # the canvas is exactly the two source digits pasted at some allowed offsets
        offsets = itertools.product(
            range(MAX_Y + 1), range(LEFT_X[0], LEFT_X[1] + 1), range(MAX_Y + 1), range(RIGHT_X[0], RIGHT_X[1] + 1)
        )
        assert any(_composite(images[li], images[ri], *o) == image[0].numpy().tobytes() for o in offsets), i


def test_multidigits_split_seed_and_contract():
    train, val = MultiDigits("train", n_train=200), MultiDigits("val", n_val=50)
    assert not set(train.left_index) & set(val.left_index)  # disjoint source digits
    assert not set(train.right_index) & set(val.right_index)
    image, t = val[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert torch.equal(image[0], image[1]) and set(t) == {"left", "right"}
    again = MultiDigits("val", n_val=50)
    assert torch.equal(again[7][0], val[7][0]) and not torch.equal(MultiDigits("val", n_val=50, seed=3)[7][0], image)
    assert len(D.load("multidigits", split="val", n_val=10)) == 10
    with pytest.raises(MTPruneInputError, match="split"):
        MultiDigits("test")
    with pytest.raises(MTPruneInputError, match="colour"):
        MultiDigits("train", tasks=("colour",))
