"""Deployment (mtprune.export): a model computing only some tasks, ONNX export checked against PyTorch, ONNX
Runtime latency in ``mtprune profile``, and the clear refusals."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import mtprune
from mtprune.cli import main
from mtprune.export import export_onnx, extract_tasks
from mtprune.measure import count_macs
from mtprune.models import MultiTaskModel
from mtprune.utils.errors import MTPruneInputError

X = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))


def zoo(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return mtprune.build_model("vgg16", {"seg": 5, "depth": 1, "normal": 3}, width=0.0625, head="conv",
                               head_kwargs={"hidden": 8}).eval()


def subset_macs(model: nn.Module, tasks: list[str]) -> int:
    return mtprune.profile(model, X, latency=False, subsets=[tasks]).macs_per_subset["+".join(tasks)]


def test_extract_tasks_of_a_pruned_zoo_model_saves_and_loads(tmp_path) -> None:
    """A pruned zoo model cut to two tasks: same outputs, MACs equal to profile's subset cost (less than all
    tasks), still a MultiTaskModel that round-trips through .mtp; the original is untouched."""
    model = zoo()
    mtprune.prune(model, X[:1], "l1", target_macs=0.6)
    sub = extract_tasks(model, "seg,normal", X)
    assert isinstance(sub, MultiTaskModel) and sub.task_names == ("seg", "normal")
    assert model.task_names == ("seg", "depth", "normal")
    with torch.no_grad():
        want, got = model(X), sub(X)
    assert set(got) == {"seg", "normal"} and all(torch.equal(got[t], want[t]) for t in got)
    assert count_macs(sub, X) == subset_macs(model, ["seg", "normal"]) < count_macs(model, X)
    path = mtprune.save(sub, tmp_path / "sub.mtp", example_inputs=X[:1])
    back = mtprune.load(path).eval()
    with torch.no_grad():
        again = back(X)
    assert set(again) == {"seg", "normal"} and all(torch.allclose(again[t], want[t], atol=1e-6) for t in again)


class Branches(nn.Module):
    """No heads ModuleDict: a trunk, a branch only task ``b`` needs, and a head per task as attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 6, 3, padding=1)
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 2, 1)
        self.b = nn.Conv2d(6, 1, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = torch.relu(self.trunk(x))
        return {"a": self.a(f), "b": self.b(torch.relu(self.branch(f)))}


def test_extract_tasks_drops_a_branch_only_the_dropped_task_needs() -> None:
    """A user model without a heads ModuleDict: the branch and head that only ``b`` needs are removed (traced),
    so the MACs are the trunk and ``a``'s head, as profile reports for {a}."""
    torch.manual_seed(0)
    model = Branches().eval()
    sub = extract_tasks(model, ["a"], X)
    names = {n for n, _ in sub.named_modules()}
    assert "branch" not in names and "b" not in names and "trunk" in names
    assert count_macs(sub, X) == subset_macs(model, ["a"]) == 16 * 20 * (6 * 27 + 2 * 6)
    with torch.no_grad():
        assert torch.equal(sub(X)["a"], model(X)["a"])


class Untraceable(Branches):
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        if f.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            f = torch.relu(f)
        return {"a": self.a(f), "b": self.b(self.branch(f))}


def test_extract_tasks_refuses_clearly() -> None:
    """Unknown tasks, and models that cannot be cut, are one MTPruneInputError each."""
    with pytest.raises(MTPruneInputError, match=r"unknown task\(s\) \['nope'\]"):
        extract_tasks(zoo(), "seg,nope", X)
    with pytest.raises(MTPruneInputError, match="cannot be traced by torch.fx"):
        extract_tasks(Untraceable(), "a", X)


def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path) -> None:
    """The ONNX file of two of three tasks gives PyTorch's outputs (within 1e-4) at another batch size."""
    import onnxruntime as ort

    model = zoo()
    info = export_onnx(model, tmp_path / "m.onnx", X, tasks=["depth", "seg"])
    assert info["tasks"] == ["seg", "depth"] and info["max_abs_diff"] <= 1e-4
    assert info["macs"] == subset_macs(model, ["seg", "depth"])
    session = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["seg", "depth"]
    x3 = torch.randn(3, 3, 16, 20, generator=torch.Generator().manual_seed(3))
    seg, depth = session.run(None, {"input": x3.numpy()})
    with torch.no_grad():
        want = model(x3)
    np.testing.assert_allclose(seg, want["seg"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(depth, want["depth"].numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_export_refuses_outputs_that_differ(tmp_path, monkeypatch) -> None:
    """When ONNX Runtime's outputs differ from PyTorch's, export refuses and leaves no file."""
    import mtprune.export as ex

    real = ex._session

    class Off:
        def __init__(self, session) -> None:
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, names, feeds):
            return [o + 1e-3 for o in self.session.run(names, feeds)]

    monkeypatch.setattr(ex, "_session", lambda path, threads=None: Off(real(path, threads)))
    with pytest.raises(MTPruneInputError, match="differs from PyTorch"):
        export_onnx(zoo(), tmp_path / "bad.onnx", X)
    assert not (tmp_path / "bad.onnx").exists()


def test_cli_export_and_profile_with_onnx_runtime(tmp_path, capsys) -> None:
    """``mtprune export --tasks`` writes a checked file with only those outputs; ``mtprune profile --runtime onnx
    --tasks`` reports ONNX Runtime latency next to PyTorch's and the subset's MACs."""
    import onnx

    model = zoo()
    path = mtprune.save(model, tmp_path / "m.mtp", example_inputs=X[:1])
    out = tmp_path / "seg.onnx"
    assert main(["export", str(path), "--format", "onnx", "--tasks", "seg", "--out", str(out)]) == 0
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["seg"]
    capsys.readouterr()
    js = tmp_path / "p.json"
    assert main(["--quiet", "profile", str(path), "--runtime", "onnx", "--tasks", "seg,depth", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "ONNX Runtime" in text and "PyTorch" in text
    got = json.loads(js.read_text())
    assert got["runtime_latency_ms"]["onnx"] > 0 and got["latency_ms"] > 0
    assert got["macs_per_subset"] == {"seg+depth": subset_macs(model, ["seg", "depth"])}


def test_missing_onnx_is_one_clear_line(tmp_path, monkeypatch, capsys) -> None:
    """Without onnxruntime, export and profile --runtime onnx exit 2 with one line saying what to install."""
    path = mtprune.save(zoo(), tmp_path / "m.mtp", example_inputs=X[:1])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert main(["export", str(path)]) == 2
    assert main(["profile", str(path), "--runtime", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("pip install 'mtprune[onnx]'" in line for line in err)
    assert not (tmp_path / "m.onnx").exists()


class Sliced(nn.Module):
    """Each task's head reads its own slice of one feature map: the slice of a dropped task is dead."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.heads = nn.ModuleDict({"a": nn.Conv2d(4, 2, 1), "b": nn.Conv2d(4, 1, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = torch.relu(self.mid(torch.relu(self.trunk(x))))
        return {"a": self.heads["a"](f[:, :4]), "b": self.heads["b"](f[:, 4:])}


def test_extract_tasks_removes_channels_only_dropped_heads_read() -> None:
    """The 4 channels of ``mid`` that only ``b`` read are removed: fewer MACs than the subset's (which counts
    the whole of ``mid``), the same output for ``a``."""
    torch.manual_seed(0)
    model = Sliced().eval()
    sub = extract_tasks(model, "a", X)
    assert sub.mid.out_channels == 4 and model.mid.out_channels == 8
    pixels = 16 * 20
    assert count_macs(sub, X) == pixels * (8 * 27 + 4 * 8 + 2 * 4) < subset_macs(model, ["a"])
    with torch.no_grad():
        assert torch.allclose(sub(X)["a"], model(X)["a"], atol=1e-6)


class TwoScales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.deep = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = torch.relu(self.stem(x))
        return f, torch.relu(self.deep(f))


class PickScale(nn.Module):
    def __init__(self, i: int, out: int) -> None:
        super().__init__()
        self.i, self.conv = i, nn.Conv2d(4, out, 1)

    def forward(self, feats: tuple[Tensor, Tensor]) -> Tensor:
        return self.conv(feats[self.i])


def test_extract_tasks_traces_a_backbone_layer_only_a_dropped_head_reads() -> None:
    """A MultiTaskModel whose backbone returns two scales: keeping only the task on the shallow scale also drops
    the deep layer (traced), so the MACs equal profile's cost of that task."""
    torch.manual_seed(0)
    model = MultiTaskModel(TwoScales(), {"shallow": PickScale(0, 2), "deep": PickScale(1, 1)}).eval()
    sub = extract_tasks(model, "shallow", X)
    assert "backbone.deep" not in dict(sub.named_modules())
    assert count_macs(sub, X) == subset_macs(model, ["shallow"]) == 16 * 20 * (4 * 27 + 2 * 4)
    with torch.no_grad():
        assert torch.equal(sub(X)["shallow"], model(X)["shallow"])


def test_onnx_export_of_a_frozen_vit(tmp_path) -> None:
    """A frozen eval-mode ViT (whose MultiheadAttention would take the fused inference kernel, which ONNX lacks)
    exports, matches PyTorch, and its ONNX-side model is cut to one task."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    net.heads = nn.Identity()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.heads = nn.ModuleDict({"a": nn.Linear(16, 2), "b": nn.Linear(16, 3)})

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            f = self.net(x)
            return {t: h(f) for t, h in self.heads.items()}

    model = Net().eval().requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    info = export_onnx(model, tmp_path / "vit.onnx", x, tasks="b")
    assert info["tasks"] == ["b"] and info["max_abs_diff"] <= 1e-4
    assert not any(p.requires_grad for p in model.parameters())  # the model itself is left as it was
