"""Joint transforms keep the geometry of every dense target consistent (MTAN conventions)."""

from __future__ import annotations

import numpy as np
import torch

import mtprune.data as D
from mtprune.data.transforms import RandomCrop, RandomHorizontalFlip, RandomScaleCrop, Resize

KINDS = {"seg": "seg", "depth": "depth", "normal": "normal", "edge": "edge", "cls": "class", "attrs": "multilabel"}


def sample(h: int = 8, w: int = 8):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=g)
    normal = torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
    normal[:, 0, 0] = 0  # an invalid pixel
    targets = {
        "seg": torch.arange(h * w).view(h, w) % 5 - 1,
        "depth": torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w),
        "normal": normal,
        "edge": (torch.arange(h * w).view(1, h, w) % 3 == 0).float(),
        "cls": torch.tensor(3),
        "attrs": torch.tensor([1.0, 0.0]),
    }
    targets["depth"][0, -1, -1] = 0  # invalid depth
    return image, targets


def test_flip_mirrors_everything_and_negates_normal_x():
    image, t = sample()
    out_image, out = RandomHorizontalFlip(p=1.0)(image, t, KINDS)
    assert torch.equal(out_image, image.flip(-1))
    for name in ("seg", "depth", "edge"):
        assert torch.equal(out[name], t[name].flip(-1)), name
    assert torch.equal(out["normal"][0], -t["normal"][0].flip(-1))
    assert torch.equal(out["normal"][1:], t["normal"][1:].flip(-1))
    assert torch.equal(out["normal"][:, 0, -1], torch.zeros(3))  # invalid stays invalid
    assert out["cls"] is t["cls"] and out["attrs"] is t["attrs"]
    assert RandomHorizontalFlip(p=1.0)(*RandomHorizontalFlip(p=1.0)(image, t, KINDS), KINDS)[1]["normal"].equal(
        t["normal"]
    )
    same_image, same = RandomHorizontalFlip(p=0.0)(image, t, KINDS)
    assert same_image is image and same is t


def test_scale_crop_divides_depth_by_the_scale_exactly():
    image, t = sample()
    tr = RandomScaleCrop(scales=(2.0,))
    out_image, out = tr.apply(image, t, KINDS, scale=2.0, top=4, left=2)
    # window rows 4..7, cols 2..5 of an 8×8 sample, blown up 2× by nearest neighbour
    window = (slice(4, 8), slice(2, 6))
    up = lambda x: x.repeat_interleave(2, -2).repeat_interleave(2, -1)  # noqa: E731
    assert torch.equal(out["depth"], up(t["depth"][:, window[0], window[1]]) / 2.0)
    assert torch.equal(out["seg"], up(t["seg"][window]))
    assert torch.equal(out["normal"], up(t["normal"][:, window[0], window[1]]))
    assert torch.equal(out["edge"], up(t["edge"][:, window[0], window[1]]))
    assert out_image.shape == image.shape and out["cls"] is t["cls"] and out["attrs"] is t["attrs"]
    # inverse depth (Cityscapes) is multiplied instead
    _, inv = RandomScaleCrop(scales=(2.0,), inverse_depth=True).apply(image, t, KINDS, 2.0, 4, 2)
    assert torch.equal(inv["depth"], up(t["depth"][:, window[0], window[1]]) * 2.0)


def test_scale_crop_keeps_invalid_depth_zero_and_scale_one_is_identity():
    image, t = sample()
    t["depth"][:] = 3.0
    t["depth"][0, :, :4] = 0.0
    _, out = RandomScaleCrop(scales=(1.5,)).apply(image, t, KINDS, 1.5, 0, 0)
    assert set(out["depth"].unique().tolist()) == {0.0, 2.0}
    same_image, same = RandomScaleCrop(scales=(1.0,))(image, t, KINDS)
    assert torch.equal(same_image, image) and torch.equal(same["depth"], t["depth"])


def test_random_transforms_are_reproducible_with_a_generator():
    image, t = sample(12, 16)
    tr = lambda seed: D.Compose(  # noqa: E731
        [
            RandomScaleCrop(generator=torch.Generator().manual_seed(seed)),
            RandomHorizontalFlip(generator=torch.Generator().manual_seed(seed)),
        ]
    )
    a, b = tr(5), tr(5)
    draws_a = [a(image, t, KINDS) for _ in range(6)]
    draws_b = [b(image, t, KINDS) for _ in range(6)]
    for (ia, ta), (ib, tb) in zip(draws_a, draws_b, strict=True):
        assert torch.equal(ia, ib) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert len({round(float(i.sum()), 4) for i, _ in draws_a}) > 1  # it does vary between calls
    rsc = RandomScaleCrop(generator=torch.Generator().manual_seed(0))
    for _ in range(50):
        s, top, left = rsc.sample(12, 16)
        assert s in (1.0, 1.2, 1.5) and 0 <= top <= 12 - int(12 / s) and 0 <= left <= 16 - int(16 / s)


def test_random_crop_cuts_and_pads_with_invalid_values():
    image, t = sample(8, 10)
    crop = RandomCrop((5, 6))
    out_image, out = crop.apply(image, t, KINDS, top=2, left=3)
    assert torch.equal(out_image, image[:, 2:7, 3:9]) and torch.equal(out["seg"], t["seg"][2:7, 3:9])
    assert torch.equal(out["normal"], t["normal"][:, 2:7, 3:9]) and out["cls"] is t["cls"]
    g_image, g = RandomCrop(5, generator=torch.Generator().manual_seed(1))(image, t, KINDS)
    assert g_image.shape == (3, 5, 5) and g["depth"].shape == (1, 5, 5) and g["seg"].shape == (5, 5)
    big_image, big = RandomCrop((10, 12)).apply(image, t, KINDS, top=0, left=0)
    assert big_image.shape == (3, 10, 12) and torch.equal(big_image[:, :8, :10], image)
    assert (big_image[:, 8:] == 0).all() and (big["seg"][8:] == -1).all() and (big["seg"][:, 10:] == -1).all()
    assert (big["depth"][:, 8:] == 0).all() and (big["normal"][:, :, 10:] == 0).all()
    assert (big["edge"][:, 8:] == -1).all() and torch.equal(big["seg"][:8, :10], t["seg"])
    assert big["seg"].dtype == torch.int64


def test_resize_uses_nearest_for_targets():
    image, t = sample(8, 8)
    out_image, out = Resize((4, 6))(image, t, KINDS)
    assert out_image.shape == (3, 4, 6) and out["seg"].shape == (4, 6) and out["seg"].dtype == torch.int64
    for name in ("seg", "depth", "edge"):
        assert set(out[name].unique().tolist()) <= set(t[name].unique().tolist()), name
    norms = out["normal"].norm(dim=0)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))  # never a blend of two normals


def test_dataset_applies_the_joint_transform(tmp_path):
    from test_data import write_mtan

    write_mtan(tmp_path, "train", 2)
    plain = D.load("nyuv2", root=tmp_path)
    flipped = D.load("nyuv2", root=tmp_path, transform=D.Compose([RandomHorizontalFlip(p=1.0)]))
    (i0, t0), (i1, t1) = plain[0], flipped[0]
    assert torch.equal(i1, i0.flip(-1)) and torch.equal(t1["normal"][0], -t0["normal"][0].flip(-1))
    assert np.array_equal(t1["seg"].numpy(), t0["seg"].flip(-1).numpy())
