"""Bad input is refused clearly: ``MTPruneInputError`` from the library, exit code 2 and one line from the command.

Property-based (hypothesis) over configs: unknown keys, wrong types, out-of-range values, non-mapping YAML and
task names outside the preset, through ``parse_config``, ``load_config`` and ``mtprune.cli.main``. Then models
that do not return a dict, and data with NaN/Inf, wrong shapes or dtypes, no samples, or no root, through
training, evaluation and pruning (and through the command, for data read from disk).
"""

from __future__ import annotations

import contextlib
import copy
import io
import string
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mtprune
import mtprune.commands  # noqa: F401  (imported once here, not inside the first timed example)
from helpers import tiny_run
from mtprune.cli import main
from mtprune.config import (
    DataConfig,
    DynamicSection,
    ModelConfig,
    PAGCPSection,
    PruneSection,
    RunConfig,
    SparsifySection,
    TasksConfig,
    TrainSection,
    load_config,
    parse_config,
)
from mtprune.engine import train
from mtprune.tasks import DepthTask, SegmentationTask, preset
from mtprune.utils.errors import MTPruneInputError

BASE = tiny_run(
    train={"epochs": 1, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6},
    prune={"criterion": "taylor", "target_macs": 0.5, "steps": 2, "finetune": {"epochs": 1, "lr": 0.001},
           "pagcp": {"rounds": 2}},
    sparsify={"method": "snip", "sparsity": 0.9, "dynamic": {"delta_t": 10}},
)
SECTIONS = {"": RunConfig, "data": DataConfig, "tasks": TasksConfig, "model": ModelConfig, "train": TrainSection,
            "prune": PruneSection, "prune.finetune": TrainSection, "prune.pagcp": PAGCPSection,
            "sparsify": SparsifySection, "sparsify.dynamic": DynamicSection}
FAST = settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=60, deadline=timedelta(seconds=10), derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies over configs
WORD = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), WORD)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WORD, inner, max_size=3),
                      max_leaves=6)
CONTAINERS = st.lists(LEAVES, min_size=1, max_size=3) | st.dictionaries(WORD, LEAVES, min_size=1, max_size=3)
NUMBER_WORDS = {"inf", "infinity", "nan"}
BOOL_WORDS = {"t", "f", "y", "n", "on", "off", "yes", "no", "true", "false"}
KEYS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=16)

INT_KEYS = ["seed", "train.epochs", "train.batch_size", "prune.steps", "prune.stats_batches", "sparsify.batches",
            "prune.finetune.epochs", "sparsify.dynamic.delta_t", "prune.pagcp.rounds"]
FLOAT_KEYS = ["train.lr", "model.width", "prune.target_macs", "sparsify.sparsity", "train.weight_decay",
              "prune.finetune.lr", "prune.pagcp.budget"]
STR_KEYS = ["name", "device", "data.name", "tasks.preset", "prune.criterion", "model.name"]
LITERALS = {"train.optimizer": {"adam", "adamw", "sgd"}, "train.scheduler": {"none", "step", "cosine"},
            "prune.schedule": {"one_shot", "iterative", "interleaved"}, "prune.allocator": {"global", "layer", "pagcp"},
            "sparsify.method": {"disparse_static", "disparse_pretrained", "disparse_dynamic", "snip", "random",
                                "magnitude", "imp", "rigl"}}
BOOL_KEYS = ["data.augment", "train.amp", "prune.retrain_from_scratch"]


def finite_outside(lo: float, hi: float):
    """Numbers ≤ lo or ≥ hi, and NaN/Inf (a config never holds a non-finite number)."""
    return st.one_of(st.floats(max_value=lo), st.floats(min_value=hi), st.sampled_from([float("nan"), float("inf")]))


OUT_OF_RANGE = {
    "prune.target_macs": finite_outside(0.0, 1.0),
    "sparsify.sparsity": finite_outside(0.0, 1.0),
    "train.lr": finite_outside(0.0, float("inf")),
    "prune.finetune.lr": finite_outside(0.0, float("inf")),
    "model.width": st.one_of(st.floats(max_value=0.0), st.floats(min_value=8.0, exclude_min=True)),
    "train.epochs": st.integers(max_value=-1),
    "prune.finetune.epochs": st.integers(max_value=-1),
    "train.batch_size": st.integers(max_value=0),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
}


def wrong_type(path: str):
    if path in INT_KEYS:
        bad = st.one_of(CONTAINERS, WORD, st.floats(allow_nan=False).filter(lambda v: v != int(v) if
                                                                             abs(v) < 1e300 else True))
    elif path in FLOAT_KEYS:
        bad = st.one_of(CONTAINERS, WORD.filter(lambda w: w.lower() not in NUMBER_WORDS))
    elif path in STR_KEYS:
        bad = st.one_of(CONTAINERS, st.integers(), st.floats(), st.booleans())
    elif path in BOOL_KEYS:
        bad = st.one_of(CONTAINERS, st.integers().filter(lambda v: v not in (0, 1)),
                        WORD.filter(lambda w: w.lower() not in BOOL_WORDS))
    else:
        bad = st.one_of(CONTAINERS, st.integers(), WORD.filter(lambda w: w not in LITERALS[path]))
    return st.one_of(bad, st.none())


def section(raw: dict, path: str) -> dict:
    node = raw
    for part in filter(None, path.split(".")):
        node = node[part]
    return node


def with_value(path: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    *parents, key = path.split(".")
    section(raw, ".".join(parents))[key] = value
    return raw


@st.composite
def unknown_key(draw, keys=KEYS):
    where = draw(st.sampled_from(sorted(SECTIONS)))
    key = draw(keys)
    assume(key not in SECTIONS[where].model_fields)
    raw = copy.deepcopy(BASE)
    section(raw, where)[key] = draw(VALUES)
    return (f"{where}.{key}" if where else key), raw


@st.composite
def bad_type(draw):
    path = draw(st.sampled_from(INT_KEYS + FLOAT_KEYS + STR_KEYS + BOOL_KEYS + sorted(LITERALS)))
    return path, with_value(path, draw(wrong_type(path)))


@st.composite
def out_of_range(draw):
    path = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    return path, with_value(path, draw(OUT_OF_RANGE[path]))


def assert_names(err: MTPruneInputError, path: str) -> None:
    message = str(err)
    assert "\n" not in message and "\r" not in message
    if path.isprintable():
        assert f"'{path}'" in message, message


def test_the_base_config_is_valid():
    """Each example below breaks exactly one thing in an otherwise valid config."""
    parse_config(copy.deepcopy(BASE))


@FAST
@given(unknown_key())
def test_unknown_keys_are_named(case):
    path, raw = case
    with pytest.raises(MTPruneInputError, match="unknown key") as err:
        parse_config(raw, "cfg.yaml")
    assert_names(err.value, path)


@FAST
@given(st.one_of(bad_type(), out_of_range()))
def test_wrong_types_and_out_of_range_values_are_named(case):
    path, raw = case
    with pytest.raises(MTPruneInputError) as err:
        parse_config(raw, "cfg.yaml")
    assert_names(err.value, path)
    assert str(err.value).startswith("cfg.yaml: config key")


NON_MAPPINGS = st.one_of(st.lists(LEAVES, max_size=3), st.integers(), st.floats(allow_nan=False), WORD,
                         st.booleans(), st.sampled_from([0, "", [], False, 0.0]))


@FAST
@given(NON_MAPPINGS)
def test_non_mapping_yaml_is_refused(value):
    with pytest.raises(MTPruneInputError, match="top level must be a mapping"):
        parse_config(value, "cfg.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(yaml.safe_dump(value))
        for overrides in ([], ["train.epochs=2"]):  # falsy values ([], 0, "") were once read as an empty config
            with pytest.raises(MTPruneInputError, match="top level must be a mapping"):
                load_config(path, overrides)


# ---------------------------------------------------------------- the same through the command
def run_cli(*args) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--quiet", *map(str, args)])
    return code, err.getvalue().splitlines()


SET_KEYS = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10)


def as_yaml_value(value) -> str:
    """``value`` as the YAML text of a ``--set key=value`` override."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@SLOWER
@given(case=st.one_of(unknown_key(), bad_type(), out_of_range()), command=st.sampled_from(["train", "prune"]),
       via_set=st.booleans())
def test_command_refuses_bad_configs_with_one_line(case, command, via_set):
    path, raw = case
    # a YAML round trip must keep the example (YAML cannot carry every string, e.g. lone control characters)
    assume(yaml.safe_load(yaml.safe_dump(raw)) == raw)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = Path(tmp) / "cfg.yaml", Path(tmp) / "run"
        extra = []
        if via_set and "." in path and all(c in string.ascii_lowercase + "_." for c in path):
            cfg.write_text(yaml.safe_dump(BASE))  # a valid file; the fault comes from --set key=value
            parent, key = path.rsplit(".", 1)
            extra = ["--set", f"{path}={as_yaml_value(section(raw, parent)[key])}"]
        else:
            cfg.write_text(yaml.safe_dump(raw))
        code, err = run_cli(command, cfg, "--out", out, *extra)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("mtprune: error: ") and (not path.isprintable() or f"'{path}'" in err[0]), err
        assert not out.exists() or not any(out.iterdir())  # refused before anything was written


@SLOWER
@given(NON_MAPPINGS, st.sampled_from(["train", "prune"]))
def test_command_refuses_non_mapping_yaml(value, command):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(value))
        code, err = run_cli(command, cfg, "--out", Path(tmp) / "run")
    assert code == 2 and len(err) == 1 and "top level must be a mapping" in err[0], err


@SLOWER
@given(st.lists(KEYS, min_size=1, max_size=3), st.sampled_from(["train", "prune"]))
def test_command_refuses_task_names_outside_the_preset(names, command):
    assume(set(names) - set(preset("synthetic_scenes")))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        raw = {**BASE, "tasks": {"preset": "synthetic_scenes", "names": names}}
        assume(yaml.safe_load(yaml.safe_dump(raw)) == raw)
        cfg.write_text(yaml.safe_dump(raw))
        code, err = run_cli(command, cfg, "--out", Path(tmp) / "run")
    assert code == 2 and len(err) == 1 and "tasks.names" in err[0], err


@pytest.mark.parametrize(("text", "expected"), [
    ("train: {epochs: [1, 2\n", "not valid YAML at line"),  # unclosed flow sequence
    ("a: 1\n---\nb: 2\n", "not valid YAML"),  # two documents
    ("!!python/object:os.system {}\n", "not valid YAML"),  # a tag safe_load refuses
    (b"\xff\xfe\x00bad", "not a UTF-8 text file"),
])
def test_unreadable_config_files_exit_2(tmp_path, text, expected):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_cli("train", cfg, "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1 and expected in err[0] and str(cfg) in err[0], err


@pytest.mark.parametrize(("override", "expected"), [("train.lr=[", "not valid YAML"), ("train.lr", "key=value"),
                                                    ("train.lr=.inf", "train.lr"), ("name.x=1", "not a section")])
def test_bad_set_overrides_exit_2(tmp_path, override, expected):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    code, err = run_cli("train", cfg, "--out", tmp_path / "run", "--set", override)
    assert code == 2 and len(err) == 1 and expected in err[0], err


# ---------------------------------------------------------------- models that break the contract
class NotADict(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.seg, self.depth = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x):
        f = self.body(x).relu()
        return self.seg(f) if self.kind == "tensor" else [self.seg(f), self.depth(f)]


class ToyNet(nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU())
        self.seg, self.depth = nn.Conv2d(16, 2, 1), nn.Conv2d(16, 1, 1)

    def forward(self, x):
        f = self.body(x)
        return {"seg": self.seg(f), "depth": self.depth(f)}


TASKS = {"seg": SegmentationTask("seg", 2), "depth": DepthTask()}
X = torch.rand(1, 3, 8, 8)


class Toy(Dataset):
    """8 samples of 3×8×8 with seg and depth targets; ``edit(i, image, targets)`` corrupts a sample."""

    def __init__(self, n: int = 8, edit=None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 8, 8, generator=g)
        self.n, self.edit = n, edit

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        image = self.x[i].clone()
        targets = {"seg": (image[0] > image[1]).long(), "depth": 0.5 + image[2:3]}
        if self.edit is not None:
            image, targets = self.edit(i, image, targets)
        return image, targets


def run_entry(entry: str, data: Dataset, tmp: Path, model: nn.Module | None = None, val: Dataset | None = None):
    model = model or ToyNet()
    if entry == "train":
        val = Toy(4) if val is None else val
        return train(model, TASKS, data, val, tmp, epochs=1, batch_size=4, quiet=True, tensorboard=False)
    if entry == "evaluate":
        return mtprune.evaluate(model, data, TASKS, device="cpu", batch_size=4)
    return mtprune.prune(model, X, "taylor", channel_ratio=0.3, data=DataLoader(data, batch_size=4), losses=TASKS,
                         min_channels=2)


ENTRIES = ["train", "evaluate", "prune"]


@pytest.mark.parametrize("kind", ["tensor", "list"])
@pytest.mark.parametrize("entry", ["evaluate", "prune", "prune_l1", "train"])
def test_a_model_that_does_not_return_a_dict_is_refused(tmp_path, kind, entry):
    model = NotADict(kind)
    with pytest.raises(MTPruneInputError, match="model must return a dict of task outputs"):
        if entry == "prune_l1":
            mtprune.prune(model, X, "l1", channel_ratio=0.3)
        else:
            run_entry(entry, Toy(), tmp_path, model=model)


def test_losses_for_tasks_the_model_does_not_output_are_named():
    with pytest.raises(MTPruneInputError, match=r"\['normal'\]"):
        mtprune.prune(ToyNet(), X, "taylor", channel_ratio=0.3, data=DataLoader(Toy(), batch_size=4),
                      losses={**TASKS, "normal": preset("nyuv2")["normal"]})


# ---------------------------------------------------------------- bad data, property-based
def corrupt(kind: str, where: int, value: float, pixel: tuple[int, int]):
    """An ``edit`` for ``Toy``: one kind of damage on sample ``where``."""
    r, c = pixel

    def edit(i, image, targets):
        if kind == "image_uint8":  # a dataset of uint8 images
            return (image * 255).to(torch.uint8), targets
        if i != where:
            return image, targets
        seg, depth = targets["seg"], targets["depth"]
        if kind == "image_value":
            image[0, r, c] = value
        elif kind == "depth_value":
            depth[0, r, c] = value
        elif kind == "image_uint8_one":  # one sample breaks the dtype of the others
            image = (image * 255).to(torch.uint8)
        elif kind == "seg_fractional":
            seg = seg.float() + 0.5
        elif kind == "seg_channel":
            seg = seg[None]
        elif kind == "depth_no_channel":
            depth = depth[0]
        elif kind == "depth_two_channels":
            depth = torch.cat([depth, depth])
        elif kind == "image_grey":
            image = image[:1]
        return image, {"seg": seg, "depth": depth}

    return edit


SHAPES = "task '{0}'.*shape|cannot batch the data's samples: {0}: |cannot load a batch.*equal size"  # one sample
KINDS = {"image_value": "images contain NaN or Inf", "depth_value": "task 'depth'.*NaN or Inf",
         "image_uint8": "dtype torch.uint8", "image_uint8_one": "different dtypes|dtype torch.uint8",
         "seg_fractional": "task 'seg'.*integers",
         "seg_channel": SHAPES.format("seg"), "depth_no_channel": SHAPES.format("depth"),
         "depth_two_channels": SHAPES.format("depth"), "image_grey": "channels|image: "}


@SLOWER
@given(kind=st.sampled_from(sorted(KINDS)), entry=st.sampled_from(ENTRIES), where=st.integers(0, 7),
       value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       pixel=st.tuples(st.integers(0, 7), st.integers(0, 7)))
def test_bad_data_is_refused_with_a_reason(kind, entry, where, value, pixel):
    # a user's DataLoader (prune) collates as it likes: a batch of mixed dtypes is promoted before we see it
    assume(not (kind == "image_uint8_one" and entry == "prune" and where % 4))
    assume(not (kind == "image_grey" and entry != "train"))  # only training probes the model on one sample first
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(MTPruneInputError, match=KINDS[kind]):
            run_entry(entry, Toy(edit=corrupt(kind, where, value, pixel)), Path(tmp))
        assert not (Path(tmp) / "checkpoints").exists()  # refused before a checkpoint was written


@pytest.mark.parametrize("entry", ENTRIES)
def test_empty_data_is_refused(tmp_path, entry):
    with pytest.raises(MTPruneInputError, match="empty|no batches"):
        run_entry(entry, Toy(n=0), tmp_path)


def test_empty_validation_data_is_refused_before_training(tmp_path):
    with pytest.raises(MTPruneInputError, match="validation data is empty"):
        run_entry("train", Toy(), tmp_path, val=Toy(n=0))
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------- bad data on disk, through the command
@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A tiny MTAN-layout dataset (generated synthetic scenes) that the tests copy and damage."""
    root = tmp_path_factory.mktemp("scenes") / "data"
    mtprune.data.load("synthetic_scenes", root=root, split="train", **BASE["data"]["kwargs"])
    return root


def disk_config(tmp_path: Path, root: Path, **data) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "data": {"name": "synthetic_scenes", "root": str(root), "augment": False,
                                                     **data}}))
    return cfg


def damaged(scenes: Path, tmp_path: Path, damage) -> Path:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(scenes, root)
    damage(root)
    return root


def nan_image(root: Path) -> None:
    path = root / "train" / "image" / "3.npy"
    image = np.load(path)
    image[2, 5, 1] = np.nan
    np.save(path, image)


def fractional_labels(root: Path) -> None:
    path = root / "train" / "label" / "5.npy"
    np.save(path, np.load(path).astype(np.float32) + 0.25)


def no_images(root: Path) -> None:
    for p in (root / "train" / "image").glob("*.npy"):
        p.unlink()


def wrong_depth_shape(root: Path) -> None:
    path = root / "val" / "depth" / "0.npy"
    np.save(path, np.load(path)[:, :, 0][:, :, None].repeat(2, axis=2))


@pytest.mark.parametrize(("damage", "expected"), [
    (nan_image, "train/image/3.npy: the image contains NaN or Inf"),
    (fractional_labels, "train/label/5.npy: a label map must hold integer class indices"),
    (no_images, "empty dataset"),
    (wrong_depth_shape, "val/depth/0.npy: expected a depth array of shape (H, W, 1)"),
], ids=["nan-image", "fractional-labels", "empty", "depth-shape"])
def test_damaged_data_on_disk_exits_2_naming_the_file(scenes, tmp_path, damage, expected):
    cfg = disk_config(tmp_path, damaged(scenes, tmp_path, damage))
    code, err = run_cli("train", cfg, "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("name", ["nyuv2", "cityscapes", "celeba"])
def test_a_missing_root_exits_2(tmp_path, name):
    cfg = disk_config(tmp_path, tmp_path / "nowhere", name=name)
    code, err = run_cli("train", cfg, "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1 and "nowhere" in err[0], err
