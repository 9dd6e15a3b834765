"""Conformance on torchvision: every classification and segmentation architecture that Torch-Pruning 1.6.1 can
prune, wrapped with two task heads, pruned with ``l1`` and then ``task_taylor``, saved and loaded back with
``base=``, and profiled; what cannot be pruned is refused in one line with the model untouched.

One model per architecture family (the other sizes of a family share its code), at tiny inputs; where torchvision
exposes the knobs, the family's own constructor is called with fewer blocks or channels (DenseNet, ResNet/ResNeXt,
EfficientNetV2, ConvNeXt) and the 4096-wide classifiers of VGG/AlexNet are narrowed, to keep the suite fast.
MobileNetV3-Large is the backbone of both MobileNet segmentation models; Wide-ResNet is the ResNet bottleneck at
another width. docs/architectures.md lists the results.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mtprune.io import load, save
from mtprune.measure import profile
from mtprune.models.zoo_wrap import TORCHVISION, TORCHVISION_REFUSED, TwoHeads, build, synthetic_data
from mtprune.pruning.prune import prune
from mtprune.utils.errors import MTPruneInputError

pytest.importorskip("torchvision")
FAST = {"resnet18", "mobilenet_v3_small", "squeezenet1_1", "densenet (2-2-2-2 blocks)",
        "vit (2 layers, width 32, 4 heads)"}
# name -> (constructor, dense output?, input size, fast?); the models are shared with `mtprune bench conformance`
CASES: dict[str, tuple[Callable[[], nn.Module], bool, int, bool]] = {
    n: (c.make, c.dense, c.size, n in FAST) for n, c in TORCHVISION.items()}
REFUSED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    n: (c.make, c.expect) for n, c in TORCHVISION_REFUSED.items()}


def _build(name: str) -> tuple[TwoHeads, Tensor]:
    return build(TORCHVISION[name])


def _data(model: TwoHeads, x: Tensor) -> tuple[list, dict]:
    return synthetic_data(model, x)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if fast else pytest.mark.slow) for n, (_, _, _, fast) in CASES.items()])
def test_prune_save_load_profile(name: str, tmp_path) -> None:
    model, x = _build(name)
    shapes = {k: v.shape for k, v in model(x).items()}
    params0 = _params(model)

    report = prune(model, x[:1], "l1", channel_ratio=0.3)
    assert report.params_after < params0 and _params(model) == report.params_after
    assert {k: v.shape for k, v in model(x).items()} == shapes  # the heads' outputs keep their shapes

    path = save(model, tmp_path / "m.mtp", example_inputs=x[:1])
    loaded = load(path, base=_build(name)[0]).eval()
    for task, out in model(x).items():
        torch.testing.assert_close(loaded(x)[task], out, rtol=1e-4, atol=1e-5)

    prof = profile(loaded, x[:1], latency=False)
    assert prof.params == report.params_after and prof.macs > 0
    assert set(prof.macs_per_subset) >= {"a", "b"}

    data, losses = _data(loaded, x)  # a second round, gradient-based, on the loaded model
    again = prune(loaded, x[:1], "task_taylor", channel_ratio=0.2, data=data, losses=losses, batches=1)
    assert again.params_after < report.params_after
    assert {k: v.shape for k, v in loaded(x).items()} == shapes
    assert all(m.weight.shape[0] > 0 for m in loaded.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.mark.parametrize("name", list(REFUSED))
def test_unprunable_models_are_refused_in_one_line(name: str) -> None:
    torch.manual_seed(0)
    make, message = REFUSED[name]
    model, x = TwoHeads(make(), dense=False).eval(), torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MTPruneInputError, match=message) as info:
        prune(model, x, "l1", channel_ratio=0.3)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
