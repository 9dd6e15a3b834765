"""Models with several inputs: ``example_inputs`` may be a tensor, a tuple or a dict everywhere (prune, profile,
save/load, sparsify). The stand-in is an RGB + depth network (two stems, concatenated), called positionally or
with keywords."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtprune.engine.evaluate import evaluate
from mtprune.io import load, read, save
from mtprune.measure import profile
from mtprune.pruning.prune import count, prune
from mtprune.sparsity.api import sparsify
from mtprune.sparsity.parts import layer_parts
from mtprune.tasks import preset
from mtprune.utils.errors import MTPruneInputError
from mtprune.utils.inputs import example_from_spec, first_samples, input_spec

H = W = 8


class RGBD(nn.Module):
    """``forward(rgb, depth)``; heads are plain attributes (not ``heads.<task>``), so parts come from autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depth = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.seg_head = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
        self.normal_head = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, rgb: Tensor, depth: Tensor) -> dict[str, Tensor]:
        f = self.fuse(torch.cat([self.rgb(rgb), self.depth(depth)], 1))
        return {"seg": self.seg_head(f), "normal": self.normal_head(f)}


class RGBDKeywords(RGBD):
    """The same network, called as ``model(image=..., depth=...)``."""

    def forward(self, image: Tensor, depth: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return super().forward(image, depth)


def inputs(kind: str, batch: int = 2) -> tuple[nn.Module, object]:
    g = torch.Generator().manual_seed(0)
    rgb, depth = torch.randn(batch, 3, H, W, generator=g), torch.rand(batch, 1, H, W, generator=g)
    torch.manual_seed(0)
    if kind == "tuple":
        return RGBD().eval(), (rgb, depth)
    return RGBDKeywords().eval(), {"image": rgb, "depth": depth}


def run(model: nn.Module, x: object) -> dict[str, Tensor]:
    return model(**x) if isinstance(x, dict) else model(*x)


def conv_macs(model: nn.Module) -> int:
    """Analytic per-sample MACs: every conv here keeps the H x W resolution."""
    return sum(m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1] * H * W
               for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_prune_profile_save_load(kind: str, tmp_path) -> None:
    model, x = inputs(kind)
    params0, macs0 = count(model, x)
    assert macs0 == conv_macs(model)  # both stems are counted, per sample
    report = prune(model, x, "l1", target_macs=0.6, min_channels=1)
    assert model.rgb[0].out_channels < 8 and model.depth[0].out_channels < 4
    assert report.macs_after == conv_macs(model) and abs(report.macs_ratio - 0.6) < 0.1
    assert run(model, x)["seg"].shape == (2, 5, H, W)

    prof = profile(model, x, latency=True, warmup=0, repeats=1)
    assert prof.macs == conv_macs(model)
    assert prof.macs_per_subset["seg"] < prof.macs  # the normal head is not needed for seg alone
    assert prof.setting["batch_size"] == 2

    path = save(model, tmp_path / "m.mtp", example_inputs=x)
    _, meta = read(path)
    assert meta["inputs"] == input_spec(x) and meta["input_shape"] is None
    loaded = load(path, base=inputs(kind)[0]).eval()
    for task, out in run(model, x).items():
        assert torch.equal(run(loaded, x)[task], out)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_sparsify_attributes_heads_through_both_inputs(kind: str) -> None:
    """DiSparse static (Sun et al., CVPR 2022): per-task gradient scores from multi-input batches."""
    model, x = inputs(kind)
    g = torch.Generator().manual_seed(3)
    targets = {"seg": torch.randn(2, 5, H, W, generator=g), "normal": torch.randn(2, 3, H, W, generator=g)}
    result = sparsify(model, x, "disparse_static", 0.5, data=[(x, targets)],
                      losses={"seg": F.mse_loss, "normal": F.mse_loss}, batches=1)
    assert abs(result.sparsity - 0.5) < 0.02
    assert set(result.task_masks) == {"seg", "normal"}  # each task scored over its own head and the backbone
    owner = layer_parts(model, x)
    assert owner["seg_head.0.weight"] == "seg" and owner["normal_head.2.weight"] == "normal"
    assert owner["depth.0.weight"] == "backbone"


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_gradient_statistics_and_evaluate_take_multi_input_batches(kind: str) -> None:
    model, x = inputs(kind)
    tasks = {t: k for t, k in preset("nyuv2", num_classes=5).items() if t in ("seg", "normal")}
    g = torch.Generator().manual_seed(3)
    normal = F.normalize(torch.randn(2, 3, H, W, generator=g), dim=1)
    targets = {"seg": torch.randint(0, 5, (2, H, W), generator=g), "normal": normal}
    report = prune(model, x, "task_taylor", channel_ratio=0.3, data=[(x, targets)], losses=tasks, min_channels=1)
    assert report.batches == 1 and report.params_after < report.params_before
    samples = [({k: v[i] for k, v in x.items()} if isinstance(x, dict) else tuple(v[i] for v in x),
                {t: v[i] for t, v in targets.items()}) for i in range(2)]
    metrics = evaluate(model, samples, tasks, device="cpu", batch_size=2, with_loss=True)
    assert set(metrics) == {"seg", "normal"}
    assert all(torch.isfinite(torch.tensor(v)) for m in metrics.values() for v in m.values())


def test_input_helpers() -> None:
    x = {"image": torch.zeros(4, 3, 5, 6), "ids": torch.zeros(4, 7, dtype=torch.long)}
    spec = input_spec(x)
    assert spec == {"kwargs": {"image": {"shape": [3, 5, 6], "dtype": "float32"},
                               "ids": {"shape": [7], "dtype": "int64"}}}
    rebuilt = example_from_spec(spec)
    assert rebuilt["ids"].dtype == torch.long and rebuilt["image"].shape == (1, 3, 5, 6)
    assert [t.shape[0] for t in first_samples((torch.zeros(4, 2), torch.zeros(4, 3)))] == [1, 1]
    assert input_spec(torch.zeros(2, 3, 4)) == [3, 4]
    with pytest.raises(MTPruneInputError, match="not an input description"):
        example_from_spec({"args": [{"dtype": "float32"}]})
