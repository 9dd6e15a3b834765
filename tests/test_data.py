"""Loaders of the real on-disk layouts (DATA.md), on tiny fixtures written in those exact formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mtprune.data as D
from mtprune.data.adashare import AdaShareNYUv2
from mtprune.data.mtan import MTANDataset
from mtprune.utils.errors import MTPruneInputError

H, W = 6, 8


def _unit_normals(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    n = rng.normal(size=(h, w, 3)).astype(np.float32)
    return n / np.linalg.norm(n, axis=2, keepdims=True)


def write_mtan(root: Path, split: str, n: int, tasks=("label", "depth", "normal"), seed: int = 0) -> list[dict]:
    """MTAN/LibMTL .npy files; item 0 carries an ignore label, an invalid depth and a zero normal."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        item = {"image": rng.random((H, W, 3))}  # float64 HWC, as MTAN stores it
        if "label" in tasks:
            label = rng.integers(0, 13, (H, W)).astype(np.float64)
            label[0, 0] = -1
            item["label"] = label
        if "depth" in tasks:
            depth = rng.uniform(0.5, 9.0, (H, W, 1)).astype(np.float32)
            depth[1, 1] = 0.0
            item["depth"] = depth
        if "normal" in tasks:
            normal = _unit_normals(rng)
            normal[2, 2] = 0.0
            item["normal"] = normal
        for key, arr in item.items():
            (root / split / key).mkdir(parents=True, exist_ok=True)
            np.save(root / split / key / f"{i}.npy", arr)
        items.append(item)
    return items


def write_adashare(root: Path, n_train: int = 2, n_test: int = 1, seed: int = 0) -> dict[str, list[dict]]:
    """AdaShare json + PNG/.npy layout; seg has 255 (ignore), normal has a (255, 255, 255) pixel."""
    rng = np.random.default_rng(seed)
    for d in ("img", "seg", "normal_mask", "depth"):
        (root / d).mkdir(parents=True, exist_ok=True)
    info, raw = {}, {}
    k = 0
    for key, n in (("train", n_train), ("test", n_test)):
        info[key], raw[key] = [], []
        for _ in range(n):
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            seg = rng.integers(0, 40, (H, W), dtype=np.uint8)
            seg[0, :2] = 255
            normal = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            normal[1, 3] = 255
            depth = rng.uniform(0.5, 10.0, (H, W)).astype(np.float32)
            names = [f"img/{k}.png", f"seg/{k}.png", f"normal_mask/{k}.png", f"depth/{k}.npy"]
            Image.fromarray(img, "RGB").save(root / names[0])
            Image.fromarray(seg, "L").save(root / names[1])
            Image.fromarray(normal, "RGB").save(root / names[2])
            np.save(root / names[3], depth)
            info[key].append(names)
            raw[key].append({"img": img, "seg": seg, "normal": normal, "depth": depth})
            k += 1
    (root / "nyu_v2_3task.json").write_text(json.dumps(info))
    return raw


# ---------------------------------------------------------------- NYUv2, MTAN layout


def test_nyuv2_mtan_values_and_shapes(tmp_path):
    items = write_mtan(tmp_path, "val", 2)
    write_mtan(tmp_path, "train", 3, seed=1)
    assert D.detect_layout(tmp_path) == "mtan"
    ds = D.load("nyuv2", root=tmp_path, split="val")
    assert isinstance(ds, MTANDataset) and len(ds) == 2
    assert ds.kinds == {"seg": "seg", "depth": "depth", "normal": "normal"}
    assert ds.tasks == ["seg", "depth", "normal"] and ds.num_classes == {"seg": 13}
    assert len(D.load("nyuv2", root=tmp_path, split="train")) == 3

    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.allclose(image, torch.from_numpy(items[0]["image"].transpose(2, 0, 1)).float())
    assert t["seg"].dtype == torch.int64 and t["seg"].shape == (H, W)
    assert t["seg"][0, 0] == -1
    assert torch.equal(t["seg"], torch.from_numpy(items[0]["label"]).long())
    assert t["depth"].dtype == torch.float32 and t["depth"].shape == (1, H, W)
    assert t["depth"][0, 1, 1] == 0
    assert torch.equal(t["depth"][0], torch.from_numpy(items[0]["depth"][..., 0]))
    assert t["normal"].dtype == torch.float32 and t["normal"].shape == (3, H, W)
    assert torch.equal(t["normal"][:, 2, 2], torch.zeros(3))
    assert torch.equal(t["normal"], torch.from_numpy(items[0]["normal"].transpose(2, 0, 1)))
    assert torch.equal(ds[-1][0], ds[1][0])
    with pytest.raises(IndexError):
        ds[2]


def test_nyuv2_task_subset_resize_and_collate(tmp_path):
    write_mtan(tmp_path, "train", 2)
    ds = D.load("nyuv2", root=tmp_path, tasks=["seg", "depth"], size=(3, 4))
    image, t = ds[0]
    assert list(t) == ["seg", "depth"] and ds.kinds == {"seg": "seg", "depth": "depth"}
    assert image.shape == (3, 3, 4) and t["seg"].shape == (3, 4) and t["depth"].shape == (1, 3, 4)
    full = D.load("nyuv2", root=tmp_path)[0][1]
    # nearest neighbour: every resized label / depth is one of the original values (no blending)
    assert set(t["seg"].unique().tolist()) <= set(full["seg"].unique().tolist())
    assert set(t["depth"].unique().tolist()) <= set(full["depth"].unique().tolist())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 3, 4) and batch[1]["seg"].shape == (2, 3, 4)
    with pytest.raises(MTPruneInputError, match="edge"):
        D.load("nyuv2", root=tmp_path, tasks=["edge"])


# ---------------------------------------------------------------- NYUv2, AdaShare layout


def test_nyuv2_adashare_conversions(tmp_path):
    raw = write_adashare(tmp_path)
    assert D.detect_layout(tmp_path) == "adashare"
    ds = D.load("nyuv2", root=tmp_path, split="val")  # val reads the json key "test"
    assert isinstance(ds, AdaShareNYUv2) and len(ds) == 1
    assert len(D.load("nyuv2", root=tmp_path, split="train")) == 2
    assert ds.kinds == {"seg": "seg", "depth": "depth", "normal": "normal"} and ds.num_classes == {"seg": 40}
    r = raw["test"][0]
    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.allclose(image, torch.from_numpy(r["img"].transpose(2, 0, 1)).float() / 255)
    expected_seg = torch.from_numpy(r["seg"]).long()
    expected_seg[expected_seg == 255] = -1
    assert t["seg"].dtype == torch.int64 and torch.equal(t["seg"], expected_seg)
    assert (t["seg"][0, :2] == -1).all()
    expected_normal = torch.from_numpy(r["normal"].transpose(2, 0, 1)).float() / 127.5 - 1
    expected_normal[:, 1, 3] = 0
    assert t["normal"].shape == (3, H, W) and torch.allclose(t["normal"], expected_normal)
    assert torch.equal(t["normal"][:, 1, 3], torch.zeros(3))
    assert t["depth"].shape == (1, H, W) and torch.equal(t["depth"][0], torch.from_numpy(r["depth"]))
    ds40 = D.load("nyuv2_40", root=tmp_path, split="train")
    assert ds40.num_classes == {"seg": 40} and len(ds40) == 2


def test_nyuv2_40_rejects_mtan_layout(tmp_path):
    write_mtan(tmp_path, "train", 1)
    with pytest.raises(MTPruneInputError, match="nyu_v2_3task.json"):
        D.load("nyuv2_40", root=tmp_path)


def test_layout_detection_failure_names_both_layouts(tmp_path):
    with pytest.raises(MTPruneInputError, match="nyu_v2_3task.json") as e:
        D.load("nyuv2", root=tmp_path)
    assert "image" in str(e.value)


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes(tmp_path):
    items = write_mtan(tmp_path, "val", 2, tasks=("label", "depth"))
    ds = D.load("cityscapes", root=tmp_path, split="val")
    assert ds.kinds == {"seg": "seg", "depth": "depth"} and ds.num_classes == {"seg": 7}
    image, t = ds[1]
    assert image.shape == (3, H, W) and set(t) == {"seg", "depth"}
    assert torch.equal(t["seg"], torch.from_numpy(items[1]["label"]).long())
    assert torch.equal(t["depth"][0], torch.from_numpy(items[1]["depth"][..., 0]))


def test_cityscapes_original_mtan_label_folder(tmp_path):
    write_mtan(tmp_path, "train", 1, tasks=("label", "depth"))
    (tmp_path / "train" / "label").rename(tmp_path / "train" / "label_19")
    ds = D.load("cityscapes", root=tmp_path, num_classes=19)
    assert ds.num_classes == {"seg": 19} and ds[0][1]["seg"].shape == (H, W)


# ---------------------------------------------------------------- CelebA


def write_celeba(root: Path) -> np.ndarray:
    """Four images (train, train, val, test) in the torchvision folder layout; returns the ±1 table."""
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    attrs = rng.choice([-1, 1], size=(4, 40))
    names = [f"{i:06d}.jpg" for i in range(1, 5)]
    for i, name in enumerate(names):
        colour = (40 * i, 200 - 40 * i, 90)
        Image.new("RGB", (18, 22), colour).save(root / "img_align_celeba" / name, quality=95)
    attr_names = " ".join(f"Attr_{j}" for j in range(40))
    lines = ["4", attr_names] + [f"{n} " + "  ".join(f"{v:2d}" for v in a) for n, a in zip(names, attrs, strict=True)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "\n".join(f"{n} {p}" for n, p in zip(names, (0, 0, 1, 2), strict=True))
    )
    return attrs


def test_celeba_default_pam_groups(tmp_path):
    attrs = write_celeba(tmp_path)
    ds = D.load("celeba", root=tmp_path)
    assert len(ds) == 2 and ds.kinds == {"attr_a": "multilabel", "attr_b": "multilabel"}
    assert ds.num_classes == {"attr_a": 20, "attr_b": 20}
    image, t = ds[1]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    # a solid JPEG keeps its colour (40, 160, 90) up to compression noise
    assert torch.allclose(image.mean((1, 2)), torch.tensor([40, 160, 90]) / 255, atol=0.03)
    expected = torch.from_numpy((attrs[1] > 0).astype(np.float32))
    assert t["attr_a"].dtype == torch.float32 and torch.equal(t["attr_a"], expected[:20])
    assert torch.equal(t["attr_b"], expected[20:])
    assert len(D.load("celeba", root=tmp_path, split="val")) == 1
    assert len(D.load("celeba", root=tmp_path, split="test")) == 1


def test_celeba_custom_groups_and_size(tmp_path):
    attrs = write_celeba(tmp_path / "celeba")
    # torchvision's root/celeba convention is accepted too
    ds = D.load("celeba", root=tmp_path, split="test", groups={"one": [3], "named": ["Attr_5", 7]}, size=(16, 12))
    image, t = ds[0]
    assert image.shape == (3, 16, 12) and ds.num_classes == {"one": 1, "named": 2}
    assert t["one"].tolist() == [float(attrs[3, 3] > 0)]
    assert t["named"].tolist() == [float(attrs[3, 5] > 0), float(attrs[3, 7] > 0)]
    assert D.load("celeba", root=tmp_path, groups={"one": [3], "two": [4]}, tasks=["two"]).kinds == {
        "two": "multilabel"
    }
    with pytest.raises(MTPruneInputError, match="Nope"):
        D.load("celeba", root=tmp_path, groups={"x": ["Nope"]})
    with pytest.raises(MTPruneInputError, match="40"):
        D.load("celeba", root=tmp_path, groups={"x": [40]})


def test_celeba_bad_files(tmp_path):
    write_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000002.jpg").unlink()
    ds = D.load("celeba", root=tmp_path)
    with pytest.raises(MTPruneInputError, match="000002.jpg"):
        ds[1]
    attr = tmp_path / "list_attr_celeba.txt"
    good = attr.read_text()
    attr.write_text(good.replace(" 1", " 3", 1))
    with pytest.raises(MTPruneInputError, match="list_attr_celeba.txt line 3"):
        D.load("celeba", root=tmp_path)
    attr.write_text(good)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(MTPruneInputError, match="list_eval_partition.txt"):
        D.load("celeba", root=tmp_path)


# ---------------------------------------------------------------- errors


def test_registry_errors():
    with pytest.raises(MTPruneInputError, match="known: .*nyuv2.*synthetic_scenes"):
        D.load("imagenet")
    with pytest.raises(MTPruneInputError, match="root=PATH"):
        D.load("nyuv2")
    with pytest.raises(MTPruneInputError, match="bogus"):
        D.load("cityscapes", root="/nowhere", bogus=1)
    assert set(D.DATASETS) == {"nyuv2", "nyuv2_40", "cityscapes", "celeba", "synthetic_scenes", "multidigits",
                               "presence", "scene_presence"}


def test_missing_root_and_split(tmp_path):
    with pytest.raises(MTPruneInputError, match=str(tmp_path / "absent")):
        D.load("cityscapes", root=tmp_path / "absent")
    write_mtan(tmp_path, "train", 1)
    with pytest.raises(MTPruneInputError, match="missing split 'val'") as e:
        D.load("nyuv2", root=tmp_path, split="val")
    assert str(tmp_path / "val") in str(e.value) and "train" in str(e.value)
    with pytest.raises(MTPruneInputError, match="'val'"):
        D.load("nyuv2", root=write_adashare_root(tmp_path / "ada", test=False), split="val")


def write_adashare_root(root: Path, test: bool = True) -> Path:
    write_adashare(root)
    if not test:
        info = json.loads((root / "nyu_v2_3task.json").read_text())
        del info["test"]
        (root / "nyu_v2_3task.json").write_text(json.dumps(info))
    return root


def test_corrupt_and_missing_npy_name_the_file(tmp_path):
    write_mtan(tmp_path, "train", 3)
    bad = tmp_path / "train" / "depth" / "1.npy"
    bad.write_bytes(b"this is not a numpy file")
    ds = D.load("nyuv2", root=tmp_path)
    ds[0]
    with pytest.raises(MTPruneInputError, match="corrupt") as e:
        ds[1]
    assert str(bad) in str(e.value)
    missing = tmp_path / "train" / "normal" / "2.npy"
    missing.unlink()
    with pytest.raises(MTPruneInputError, match="missing file") as e:
        ds[2]
    assert str(missing) in str(e.value)
    (tmp_path / "train" / "image" / "1.npy").unlink()  # a gap in the image indices
    with pytest.raises(MTPruneInputError, match=str(tmp_path / "train" / "image" / "1.npy")):
        D.load("nyuv2", root=tmp_path)


def test_wrong_shapes_are_reported(tmp_path):
    write_mtan(tmp_path, "train", 2)
    np.save(tmp_path / "train" / "label" / "0.npy", np.zeros((H, W + 1)))
    np.save(tmp_path / "train" / "normal" / "1.npy", np.zeros((H, W, 2)))
    ds = D.load("nyuv2", root=tmp_path)
    with pytest.raises(MTPruneInputError, match="seg target"):
        ds[0]
    with pytest.raises(MTPruneInputError, match=r"1\.npy.*\(H, W, 3\)"):
        ds[1]


def test_corrupt_png_and_missing_depth_name_the_file(tmp_path):
    write_adashare(tmp_path)
    seg = tmp_path / "seg" / "2.png"
    seg.write_bytes(b"\x89PNG broken")
    ds = D.load("nyuv2", root=tmp_path, split="val")
    with pytest.raises(MTPruneInputError, match="corrupt") as e:
        ds[0]
    assert str(seg) in str(e.value)
    (tmp_path / "depth" / "0.npy").unlink()
    with pytest.raises(MTPruneInputError, match=str(tmp_path / "depth" / "0.npy")):
        D.load("nyuv2", root=tmp_path, split="train")[0]
    (tmp_path / "nyu_v2_3task.json").write_text("{not json")
    with pytest.raises(MTPruneInputError, match="nyu_v2_3task.json"):
        D.load("nyuv2", root=tmp_path)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "train" / "image").mkdir(parents=True)
    for d in ("label", "depth", "normal"):
        (tmp_path / "train" / d).mkdir()
    with pytest.raises(MTPruneInputError, match="empty dataset"):
        D.load("nyuv2", root=tmp_path)
    (tmp_path / "ada").mkdir()
    (tmp_path / "ada" / "nyu_v2_3task.json").write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(MTPruneInputError, match="empty dataset"):
        D.load("nyuv2", root=tmp_path / "ada")


def test_missing_task_folder(tmp_path):
    write_mtan(tmp_path, "train", 1, tasks=("label",))
    with pytest.raises(MTPruneInputError, match="depth folder"):
        D.load("nyuv2", root=tmp_path)
    assert len(D.load("nyuv2", root=tmp_path, tasks=["seg"])) == 1
