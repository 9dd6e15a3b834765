"""Adversarial probes of unbounded allocation (issue 15): every size is checked before anything is allocated.

Each probe used to try to allocate gigabytes (or recurse until the stack ran out); now it is refused with an
MTPruneInputError in well under a second. The model-size probes build on the meta device, so a test that broke
the check would try to allocate the huge model and fail loudly (MemoryError) rather than pass by accident.
"""

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import mtprune
from helpers import tiny_run, zoo_model
from mtprune import recipe
from mtprune.config import MAX_YAML_NODES, load_config
from mtprune.data.io import read_npy
from mtprune.utils.bounds import MAX_JSON_DEPTH, check_model_size, json_depth
from mtprune.utils.errors import MTPruneInputError


def rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a .mtp file with its metadata changed by ``edit(meta_dict)`` (in place) or replaced by a string."""
    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()["mtprune"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    new = edit(meta)
    save_file(tensors, str(dst), metadata={"mtprune": new if isinstance(new, str) else json.dumps(meta)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return mtprune.save(zoo_model(), tmp_path_factory.mktemp("m") / "m.mtp", example_inputs=torch.zeros(1, 3, 32, 40))


def quick(fn, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(MTPruneInputError, match=match):
        fn()
    assert time.perf_counter() - start < 30  # generous: the point is that nothing huge was built


@pytest.mark.parametrize("edit", [
    lambda m: m["spec"]["kwargs"].update(width=1e6),
    lambda m: m["spec"]["kwargs"].update(in_channels=10**9),
    lambda m: m["spec"]["kwargs"]["head_kwargs"].update(hidden=10**7),
    lambda m: m["spec"]["kwargs"]["head_kwargs"].update(width=1e6),
], ids=["width", "in_channels", "head_hidden", "head_width"])
def test_model_file_metadata_asking_for_a_huge_model_is_refused(saved, tmp_path, edit):
    bad = tmp_path / "huge.mtp"
    rewrite(saved, bad, edit)
    quick(lambda: mtprune.load(bad), r"huge.mtp.*(parameter elements.*above|overflow.*far above) the cap")


@pytest.mark.parametrize(("section", "value"), [
    ("kwargs", {"in_channels": 10**9}),
    ("head_kwargs", {"hidden": 10**7}),
    ("head_kwargs", {"width": 1e6}),
], ids=["model.kwargs.in_channels", "model.head_kwargs.hidden", "model.head_kwargs.width"])
def test_config_asking_for_a_huge_model_is_refused(tmp_path, section, value):
    path = tmp_path / "huge.yaml"
    raw = tiny_run()
    raw["model"][section] = value
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    quick(lambda: recipe.build_configured_model(cfg, recipe.build_tasks(cfg)), "config key 'model'.*above the cap")
    with pytest.raises(MTPruneInputError, match="width"):
        load_config(path, ["model.width=1e6"])  # the width multiplier itself is bounded by the schema


def test_the_cap_is_checked_on_the_meta_device_and_can_be_raised(monkeypatch):
    small = lambda: torch.nn.Linear(1000, 1000)  # noqa: E731  1e6 + 1e3 elements
    monkeypatch.setenv("MTPRUNE_MAX_MODEL_ELEMENTS", "1000")
    with pytest.raises(MTPruneInputError, match="1,001,000 parameter elements"):
        check_model_size(small, "probe")
    monkeypatch.setenv("MTPRUNE_MAX_MODEL_ELEMENTS", "2000000")
    check_model_size(small, "probe")


def test_mfis_description_asking_for_a_huge_layer_is_refused(tmp_path):
    from mtprune.merging.mfis import load_mfis, mfis
    from test_mfis import tiny_batch, tiny_net

    x = tiny_batch(16)
    y = {"a": torch.randint(0, 2, (16,)), "b": torch.randint(0, 2, (16,))}
    net, _ = mfis({t: tiny_net(i) for i, t in enumerate("ab")}, (x, y), pop_size=4, n_gen=1, seed=0)
    path = mtprune.save(net.eval(), tmp_path / "mfis.mtp", example_inputs=x[:1], extra={"mfis": net.structure()})

    def inflate(meta):
        for desc in meta["extra"]["mfis"]["modules"].values():
            if desc["layer"]["type"] == "Linear":
                desc["layer"].update(in_features=10**9, out_features=10**3)

    rewrite(path, tmp_path / "huge.mtp", inflate)
    quick(lambda: load_mfis(tmp_path / "huge.mtp"), r"huge.mtp.*above the cap")
    quick(lambda: mtprune.load(tmp_path / "huge.mtp"), r"huge.mtp.*above the cap")


def test_npy_header_claiming_more_than_the_file_holds(tmp_path):
    """A 200-byte .npy whose header claims 120 GB is refused before np.load allocates it."""
    path = tmp_path / "depth.npy"
    np.save(path, np.zeros((4, 4), np.float32))
    raw = path.read_bytes()
    header = raw.replace(b"(4, 4)", b"(30000, 1000000)")  # 30000 × 1e6 float32 = 120 GB
    path.write_bytes(header)
    quick(lambda: read_npy(path), r"depth.npy: its header claims shape \(30000, 1000000\)")
    np.save(path, np.arange(6, dtype=np.int64).reshape(2, 3))  # an honest file still loads
    assert read_npy(path).shape == (2, 3)


def test_synthetic_images_of_100000_pixels_a_side_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    quick(lambda: mtprune.data.load("synthetic_scenes", split="val", height=100000, width=100000, n_val=1),
          "height \\* width")


@pytest.mark.parametrize("where", ["model.kwargs", "prune.criterion_kwargs"])
def test_yaml_alias_bomb_is_refused(tmp_path, where):
    """A 'billion laughs' alias bomb: MemoryError in model.kwargs, a hang in prune.criterion_kwargs; now refused."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values
    section, key = where.split(".")
    body = "\n".join(f"  {ln}" for ln in lines)
    extra = "  target_macs: 0.5\n" if section == "prune" else ""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"{section}:\n{extra}  {key}:\n  {body.replace(chr(10), chr(10) + '  ')}\n")
    assert len(path.read_bytes()) < 1000
    quick(lambda: load_config(path), f"more than {MAX_YAML_NODES} values once its aliases are expanded")


def test_duplicate_yaml_keys_and_recursive_aliases_are_refused(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 10\n")
    with pytest.raises(MTPruneInputError, match=r"dup.yaml: refused YAML at line 4.*duplicate key 'lr'"):
        load_config(dup)
    rec = tmp_path / "rec.yaml"
    rec.write_text("model:\n  kwargs: &k {x: *k}\n")
    with pytest.raises(MTPruneInputError, match="rec.yaml"):
        load_config(rec)
    with pytest.raises(MTPruneInputError, match="duplicate key"):
        load_config(tmp_path / "dup.yaml", [])
    merged = tmp_path / "merge.yaml"  # YAML merge keys may still override what they merge
    merged.write_text("name: m\nbase: &b {epochs: 1, lr: 0.1}\n")
    assert yaml.safe_load(merged.read_text())["base"]["epochs"] == 1


def test_metadata_nested_100000_deep_is_an_input_error_not_a_recursion_error(saved, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    assert json_depth(deep) == 100_000 and json_depth('{"a": "[[[["}') == 1
    bad = tmp_path / "deep.mtp"
    rewrite(saved, bad, lambda m: json.dumps(m)[:-1] + f', "extra2": {deep}}}')
    with pytest.raises(MTPruneInputError, match=f"deep.mtp: metadata: JSON nested 100001 levels .*{MAX_JSON_DEPTH}"):
        mtprune.load(bad)


def test_safetensors_header_is_not_trusted_either(saved, tmp_path):
    """A header whose tensor claims a larger byte range than the file holds is named, not read past the end."""
    raw = saved.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**11
    blob = json.dumps(header).encode()
    (tmp_path / "big.mtp").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    quick(lambda: mtprune.load(tmp_path / "big.mtp"), "big.mtp")
