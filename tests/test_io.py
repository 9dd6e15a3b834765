"""The ``.mtp`` model file (mtprune.io): one safetensors file with JSON metadata, never unpickled, written atomically.

Round trips of zoo and user models, pruned and not, must reproduce the outputs exactly; damaged or edited files
and models that cannot be rebuilt must fail with an input error that names the file.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

import mtprune
import mtprune.io as mio
from helpers import nyu_batches, zoo_model
from mtprune.utils.errors import MTPruneInputError

zoo = zoo_model


def data(n: int = 2):
    return nyu_batches(n, seed=2)

X = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))




class UserNet(nn.Module):
    """A dict-returning user model, not from the zoo: shared trunk, a dense head and a classification head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.dense = nn.Sequential(nn.Conv2d(24, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 2, 1))
        self.cls = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10), nn.ReLU(),
                                 nn.Linear(10, 4))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        return {"dense": self.dense(f), "cls": self.cls(f)}


def outputs(model: nn.Module) -> dict[str, Tensor]:
    model.eval()
    with torch.no_grad():
        return model(X)


def assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    oa, ob = outputs(a), outputs(b)
    assert list(oa) == list(ob)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def trained_bn(model: nn.Module) -> nn.Module:
    """A few train-mode forwards, so BatchNorm running statistics are not at their defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(X)
    return model


def edit_metadata(src: Path, dst: Path, edit) -> None:
    """Rewrite the safetensors header with ``edit(meta_string) -> new string`` (tensor bytes untouched)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["mtprune"] = edit(header["__metadata__"]["mtprune"])
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


# ---------------------------------------------------------------- round trips
def test_unpruned_zoo_round_trip(tmp_path: Path) -> None:
    """A zoo model rebuilds itself from its metadata and gives identical outputs."""
    model = trained_bn(zoo())
    path = mtprune.save(model, tmp_path / "m.mtp")
    loaded = mtprune.load(path)
    assert type(loaded) is type(model) and loaded is not model
    assert_same_outputs(model, loaded)
    _, meta = mio.read(path)
    assert meta["format"] == "mtprune" and meta["spec"] == model.mtprune_spec
    assert meta["tasks"] == ["seg", "depth", "normal"]


def test_pruned_zoo_round_trip(tmp_path: Path) -> None:
    """A pruned zoo model is rebuilt at its pruned widths, with identical outputs."""
    model = trained_bn(zoo())
    mtprune.prune(model, X, "l1", channel_ratio=0.4, min_channels=2)
    path = mtprune.save(model, tmp_path / "pruned.mtp")
    loaded = mtprune.load(path)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in loaded.state_dict().items()} == shapes
    assert shapes != {k: v.shape for k, v in zoo().state_dict().items()}
    assert_same_outputs(model, loaded)
    again = mtprune.load(path, base=zoo(seed=5))  # an explicit fresh base gives the same model
    assert_same_outputs(model, again)


def test_pruned_user_model_round_trip_with_base(tmp_path: Path) -> None:
    """A pruned user model comes back from load(path, base=MyNet()) with identical outputs."""
    torch.manual_seed(0)
    model = trained_bn(UserNet())
    mtprune.prune(model, X, "l2", channel_ratio=0.4, min_channels=2)
    assert model.trunk[3].out_channels < 24
    path = mtprune.save(model, tmp_path / "user.mtp")
    torch.manual_seed(123)
    loaded = mtprune.load(path, base=UserNet())
    assert loaded.trunk[3].out_channels == model.trunk[3].out_channels
    assert_same_outputs(model, loaded)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither pickle nor torch.load is touched when loading (zoo and user models)."""
    model = zoo()
    mtprune.prune(model, X, "l1", channel_ratio=0.3)
    zoo_path = mtprune.save(model, tmp_path / "z.mtp")
    torch.manual_seed(0)
    user = UserNet()
    mtprune.prune(user, X, "l1", channel_ratio=0.3, min_channels=2)
    user_path = mtprune.save(user, tmp_path / "u.mtp")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert_same_outputs(model, mtprune.load(zoo_path))
    assert_same_outputs(user, mtprune.load(user_path, base=UserNet()))


def test_file_is_plain_safetensors(tmp_path: Path) -> None:
    """Any safetensors reader sees the weights and buffers, and the JSON metadata under "mtprune"."""
    model = zoo()
    path = mtprune.save(model, tmp_path / "m.mtp")
    tensors = safetensors.torch.load_file(str(path))
    assert set(tensors) == set(model.state_dict())
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        meta = json.loads(json.loads(fh.read(n))["__metadata__"]["mtprune"])
    assert meta["version"] == mio.VERSION


# ---------------------------------------------------------------- atomic writes
def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    """After a save (and an overwrite) the folder holds the model file only."""
    mtprune.save(zoo(), tmp_path / "m.mtp")
    mtprune.save(zoo(seed=1), tmp_path / "m.mtp")
    assert [p.name for p in tmp_path.iterdir()] == ["m.mtp"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies half-way leaves the old file intact and loadable, and no temporary file."""
    model = zoo()
    path = mtprune.save(model, tmp_path / "m.mtp")
    old = path.read_bytes()

    def partial(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(mio, "save_file", partial)
    with pytest.raises(OSError, match="No space"):
        mtprune.save(zoo(seed=1), path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.mtp"]
    monkeypatch.undo()
    assert_same_outputs(model, mtprune.load(path))


# ---------------------------------------------------------------- damaged files and clear errors
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    model = zoo()
    mtprune.prune(model, X, "l1", channel_ratio=0.3)
    return mtprune.save(model, folder / "good.mtp")


@pytest.mark.parametrize("keep", [0.5, 0.99, 10 / 1e6])
def test_truncated_file_is_an_input_error(saved: Path, tmp_path: Path, keep: float) -> None:
    """A truncated file fails with an input error naming the file."""
    raw = saved.read_bytes()
    bad = tmp_path / "truncated.mtp"
    bad.write_bytes(raw[: max(int(len(raw) * keep), 4)])
    with pytest.raises(MTPruneInputError, match="truncated.mtp"):
        mtprune.load(bad)


def _meta_edit(key: str, value):
    def edit(text: str) -> str:
        meta = json.loads(text)
        meta[key] = value
        return json.dumps(meta)
    return edit


def _spec_width(text: str) -> str:
    meta = json.loads(text)
    meta["spec"]["kwargs"]["width"] = 0.0625  # narrower than the stored weights
    return json.dumps(meta)


@pytest.mark.parametrize("edit", [
    lambda t: t[:-5],  # broken JSON
    lambda t: "[1, 2]",  # JSON, but not an object
    _meta_edit("format", "other"),
    _meta_edit("version", 99),
    _meta_edit("spec", {"builder": "no_such_model", "kwargs": {}}),
    _meta_edit("spec", {"builder": "vgg16"}),  # no kwargs
    _meta_edit("input_shape", None),  # a pruned model can no longer be rebuilt
    _spec_width,  # a different architecture than the weights
], ids=["json", "not-object", "format", "version", "builder", "no-kwargs", "no-input-shape", "width"])
def test_edited_metadata_is_an_input_error(saved: Path, tmp_path: Path, edit) -> None:
    """Edited metadata fails with an input error naming the file, never a crash or a wrong model."""
    bad = tmp_path / "edited.mtp"
    edit_metadata(saved, bad, edit)
    with pytest.raises(MTPruneInputError, match="edited.mtp"):
        mtprune.load(bad)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    """A missing file, and a safetensors file without mtprune metadata, are named in the error."""
    with pytest.raises(MTPruneInputError, match="absent.mtp"):
        mtprune.load(tmp_path / "absent.mtp")
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(MTPruneInputError, match="foreign.safetensors"):
        mtprune.load(foreign)
    text = tmp_path / "text.mtp"
    text.write_text("hello")
    with pytest.raises(MTPruneInputError, match="text.mtp"):
        mtprune.load(text)


def test_user_model_needs_a_base(tmp_path: Path) -> None:
    """A non-zoo model cannot be loaded without base=; a base of the wrong class is named as not fitting."""
    torch.manual_seed(0)
    path = mtprune.save(UserNet(), tmp_path / "user.mtp")
    with pytest.raises(MTPruneInputError, match="base="):
        mtprune.load(path)
    with pytest.raises(MTPruneInputError, match="user.mtp"):
        mtprune.load(path, base=zoo())

