"""Adversarial probes of bad input (issue 15): exit code 2 and one line, refusals before any training, nothing
accepted silently. Each test is one probe that used to exit 1 with a traceback, fail late, or go through."""

import errno
import json
import os

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import mtprune
from helpers import tiny_run, zoo_model
from mtprune.cli import main, os_error_line
from mtprune.config import load_config
from mtprune.data.conventions import dense_to_tensor, image_to_tensor
from mtprune.engine.batch import check_images
from mtprune.tasks import preset
from mtprune.utils.atomic import append_line
from mtprune.utils.errors import MTPruneInputError

TINY = tiny_run(train={"epochs": 1, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6})


def cli(*args):
    return main(["--quiet", *map(str, args)])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and "internal error" not in err[0]
    return err[0]


def rewrite(src, dst, edit_meta=None, edit_tensors=None) -> None:
    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()["mtprune"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"mtprune": json.dumps(meta)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return mtprune.save(zoo_model(), tmp_path_factory.mktemp("m") / "m.mtp", example_inputs=torch.zeros(1, 3, 32, 40))


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ------------------------------------------------------------------ exit 2 and one line
@pytest.mark.parametrize("shape", ["3,32,40", [-3, 32, 40], [[3, 32], [40]], [3, 32, 40.5]],
                         ids=["string", "negative", "nested", "fractional"])
def test_bad_input_shape_in_a_model_file_exits_2(saved, tmp_path, capsys, shape):
    bad = tmp_path / "shape.mtp"
    rewrite(saved, bad, lambda m: m.update(input_shape=shape))
    assert cli("profile", bad) == 2
    line = one_line(capsys)
    assert "shape.mtp" in line and "input shape" in line


def test_input_shape_that_does_not_fit_the_model_exits_2(saved, tmp_path, capsys):
    bad = tmp_path / "flat.mtp"
    rewrite(saved, bad, lambda m: m.update(input_shape=[32, 40]))  # 2-D: no channel dimension
    assert cli("profile", bad) == 2
    assert "does not fit the model" in one_line(capsys)


def test_sparse_mask_shape_that_is_a_string_names_the_file_and_layer(tmp_path, capsys):
    from mtprune.sparsity import apply_masks

    model = zoo_model()
    mask = torch.rand_like(model.backbone.conv1.weight) > 0.5
    apply_masks(model, {"backbone.conv1.weight": mask})
    path = mtprune.save(model, tmp_path / "sparse.mtp", example_inputs=torch.zeros(1, 3, 32, 40))
    assert mtprune.load(path) is not None
    for shape, expect in (("64,3,7,7", "is not a list of sizes"), ([1, 2], "differs from the weight's")):
        bad = tmp_path / "mask.mtp"
        rewrite(path, bad, lambda m, s=shape: m["masks"]["shapes"].update({"backbone.conv1.weight": s}))
        assert cli("profile", bad) == 2
        line = one_line(capsys)
        assert "mask.mtp" in line and "'backbone.conv1.weight'" in line and expect in line


@pytest.mark.parametrize(("override", "expect"), [
    ("tasks.kwargs.colours=3", "tasks.kwargs.colours': unknown key (accepted: num_classes)"),
    ("device=tpu9", "config key 'device': unknown device 'tpu9'"),
    ("prune.criterion=nonsense", "prune.criterion': unknown criterion 'nonsense'"),
    ("prune.criterion_kwargs.aggregate=median", "prune.criterion_kwargs': aggregate must be one of"),
    ("prune.criterion_kwargs.alpha=2", "prune.criterion_kwargs.alpha': unknown key"),
    ("prune.part_ratios.trunk=0.5", "prune.part_ratios.trunk': not a part of the model"),
    ("prune.part_ratios.seg=1.5", "prune.part_ratios': fractions must be in [0, 1)"),
])
def test_config_errors_exit_2_before_any_training(config, tmp_path, capsys, override, expect):
    """Unknown criterion, bad criterion_kwargs or part_ratios used to be refused only after dense training."""
    out = tmp_path / "run"
    extra = [] if override.startswith(("tasks", "device")) else ["--set", "prune.target_macs=0.5"]
    assert cli("prune", config, "--out", out, *extra, "--set", override) == 2
    assert expect in one_line(capsys)
    assert not out.exists()  # refused at validation: no run directory, no dense training


def test_demo_device_is_validated(tmp_path, capsys):
    assert cli("demo", "--out", tmp_path / "d", "--device", "tpu9") == 2
    assert "tpu9" in one_line(capsys) and not (tmp_path / "d").exists()


@pytest.mark.parametrize(("args", "expect"), [
    (["--batch-size", "0"], "--batch-size: 0 is not a positive integer"),
    (["--input-shape", "a,b"], "--input-shape: 'a,b' is not comma-separated integers"),
    (["--input-shape", "3,0,4"], "expected 1 to 4 positive sizes"),
    (["--threads", "-1"], "--threads: -1 is not a positive integer"),
])
def test_profile_arguments_are_validated(saved, capsys, args, expect):
    with pytest.raises(SystemExit) as exit_:
        cli("profile", saved, *args)
    assert exit_.value.code == 2 and expect in one_line(capsys)


def test_profile_json_into_a_directory_exits_2(saved, tmp_path, capsys):
    assert cli("profile", saved, "--json", tmp_path) == 2
    assert "is a directory" in one_line(capsys)


def test_bench_scale_is_validated(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("bench", "quick", "--scale", "bogus")
    assert exit_.value.code == 2 and "invalid choice: 'bogus'" in one_line(capsys)
    with pytest.raises(SystemExit):
        cli("bench", "nosuchsuite")
    assert "invalid choice: 'nosuchsuite'" in one_line(capsys)


def test_output_under_a_file_exits_2_naming_the_path(config, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli("train", config, "--out", blocker / "run") == 2
    line = one_line(capsys)
    assert str(blocker / "run") in line and "Not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_directory_exits_2_naming_the_path(config, tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert cli("train", config, "--out", locked / "run") == 2
        assert str(locked / "run") in one_line(capsys)
    finally:
        locked.chmod(0o755)


def test_read_only_file_system_exits_2_naming_the_path(config, tmp_path, capsys, monkeypatch):
    """EROFS (a read-only mount; root is refused too) while writing the run's config."""
    import mtprune.utils.atomic as atomic

    real = atomic.tempfile.mkstemp

    def read_only(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".config.yaml"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert cli("train", config, "--out", tmp_path / "run") == 2
    line = one_line(capsys)
    assert str(tmp_path / "run" / "config.yaml") in line and "Read-only file system" in line


def test_full_disk_is_named_disk_full(config, tmp_path, capsys, monkeypatch):
    """A real ENOSPC (writing to /dev/full) becomes "disk full: PATH", for appends and for torch.save."""
    with pytest.raises(OSError) as err:
        append_line("/dev/full", "{}")
    assert err.value.errno == errno.ENOSPC and os_error_line(err.value) == "disk full: /dev/full"

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real_save(obj, "/dev/full"))  # torch's own error
    full = os.statvfs(tmp_path)

    class Full:
        f_bavail, f_frsize = 0, full.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda path: Full)
    out = tmp_path / "run"
    assert cli("train", config, "--out", out) == 2
    line = one_line(capsys)
    assert line == f"mtprune: error: disk full: {out / 'checkpoints' / 'best.pt'}"
    assert "inline_container" not in line


# ------------------------------------------------------------------ clear refusals from the library
def test_label_minus_5_is_refused():
    seg = preset("synthetic_scenes")["seg"]
    with pytest.raises(MTPruneInputError, match="label -5 is negative"):
        seg.loss(torch.zeros(2, 7, 4, 4), torch.full((2, 4, 4), -5))
    labels = torch.full((2, 4, 4), -1)
    labels[0, 0, 0] = 3
    assert torch.isfinite(seg.loss(torch.zeros(2, 7, 4, 4), labels))  # -1 (ignore) is still accepted


def test_label_minus_5_on_disk_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    root, kwargs = tmp_path / "data", {"n_train": 6, "n_val": 6, "height": 32, "width": 40}
    mtprune.data.load("synthetic_scenes", root=root, split="train", **kwargs)
    for path in (root / "train" / "label").glob("*.npy"):
        labels = np.load(path)
        labels[0, 0] = -5
        np.save(path, labels)
    cfg = tmp_path / "disk.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {"name": "synthetic_scenes", "root": str(root), "augment": False,
                                                    "kwargs": kwargs}}))
    assert cli("train", cfg, "--out", tmp_path / "run") == 2
    assert "task 'seg': label -5 is negative" in one_line(capsys)


def test_edited_tensors_and_missing_tasks_name_the_key(saved, tmp_path):
    bad = tmp_path / "edited.mtp"
    key = "heads.seg.out.weight"
    rewrite(saved, bad, edit_tensors=lambda t: t.update({key: t[key][:, :3].contiguous()}))
    with pytest.raises(MTPruneInputError, match=r"edited.mtp: tensor 'heads.seg.out.weight' has shape"):
        mtprune.load(bad, base=zoo_model())
    other = mtprune.build_model("deeplab_resnet18", {"seg": 5, "depth": 1}, width=0.125, head="conv",
                                head_kwargs={"hidden": 16, "width": 1.0})  # no 'normal' head
    with pytest.raises(MTPruneInputError, match=r"m.mtp: tensor 'heads.normal.* is not in the model \(the model has "
                                                r"no task 'normal'\)"):
        mtprune.load(saved, base=other)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_int8_and_bool_weights_are_refused_not_cast(saved, tmp_path, dtype):
    bad = tmp_path / "cast.mtp"
    key = "backbone.conv1.weight"
    rewrite(saved, bad, edit_tensors=lambda t: t.update({key: (t[key] > 0).to(dtype)}))
    with pytest.raises(MTPruneInputError, match=f"cast.mtp: tensor '{key}' has dtype {str(dtype)[6:]}.*not cast"):
        mtprune.load(bad)


def test_complex_images_are_refused():
    image = np.zeros((8, 8, 3), np.complex64)
    with pytest.raises(MTPruneInputError, match="complex"):
        image_to_tensor(image, "img.npy")
    with pytest.raises(MTPruneInputError, match="non-real dtype complex64"):
        dense_to_tensor(np.zeros((8, 8), np.complex64), "depth", "depth.npy")
    with pytest.raises(MTPruneInputError, match="complex64"):
        check_images(torch.zeros(1, 3, 8, 8, dtype=torch.complex64))


def test_gradient_criterion_without_data_is_an_input_error():
    with pytest.raises(MTPruneInputError, match="criterion 'taylor' needs gradients"):
        mtprune.prune(zoo_model(), torch.zeros(1, 3, 32, 40), "taylor", channel_ratio=0.5)


def test_float32_input_to_a_float64_model_is_named():
    model = zoo_model().double()
    with pytest.raises(MTPruneInputError, match="dtype float32 but the model's parameters are float64"):
        mtprune.prune(model, torch.zeros(1, 3, 32, 40), "l1", channel_ratio=0.5)
    from mtprune.measure import profile

    with pytest.raises(MTPruneInputError, match="float32 but the model's parameters are float64"):
        profile(model, torch.zeros(1, 3, 32, 40))
    assert profile(model, torch.zeros(1, 3, 32, 40, dtype=torch.float64), latency=False).macs > 0


def test_duplicate_yaml_key_exits_2(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(TINY) + "seed: 4\n")  # a second top-level 'seed'
    with pytest.raises(MTPruneInputError, match="duplicate key 'seed'"):
        load_config(path)
    assert cli("train", path, "--out", tmp_path / "r") == 2
    assert "duplicate key 'seed'" in one_line(capsys)

