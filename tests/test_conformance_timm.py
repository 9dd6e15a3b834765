"""Conformance on timm, and every criterion on CNNs (issue 14): each model, wrapped with two task heads, is pruned
30 % of channels with a registered criterion, saved and loaded back with ``base=`` and profiled; or it is refused
in one ``MTPruneInputError`` line with the model untouched.

timm models are built with ``pretrained=False`` at tiny inputs (32 px unless noted, 64 px where a model needs
it). The fast subset runs every criterion on torchvision ``resnet18``, timm ``mobilenetv3_small_100`` and
``convnext_atto`` (channels-last LayerNorm); the other families run one weight criterion and one gradient
criterion each, marked slow. docs/architectures.md lists the results, including the full criterion grid checked
once by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mtprune.io import load, save
from mtprune.measure import profile
from mtprune.models.zoo_wrap import EITHER, PRUNES, TIMM, TwoHeads, build, synthetic_data
from mtprune.pruning.criteria import CRITERIA
from mtprune.pruning.prune import prune
from mtprune.utils.errors import MTPruneInputError

pytest.importorskip("timm")
# name -> (constructor, input size, expected outcome); the models are shared with `mtprune bench conformance`
CASES: dict[str, tuple[Callable[[], nn.Module], int, str]] = {n: (c.make, c.size, c.expect) for n, c in TIMM.items()}
EVERY = sorted(CRITERIA)
FAST_ALL = ("tv_resnet18", "mobilenetv3_small_100", "convnext_atto")  # every criterion, in the default run


def _grid() -> list:
    out = []
    for name in CASES:
        crits = EVERY if name in FAST_ALL else ("l1", "task_taylor")
        for crit in crits:
            out.append(pytest.param(name, crit, id=f"{name}-{crit}",
                                    marks=() if name in FAST_ALL else pytest.mark.slow))
    return out


def _build(name: str) -> tuple[TwoHeads, Tensor]:
    return build(TIMM[name])


def _data(model: TwoHeads, x: Tensor) -> tuple[list, dict]:
    return synthetic_data(model, x)


@pytest.mark.parametrize(("name", "criterion"), _grid())
def test_prunes_or_refuses_cleanly(name: str, criterion: str, tmp_path) -> None:
    model, x = _build(name)
    expected = CASES[name][2]
    shapes = {k: v.shape for k, v in model(x).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs0 = profile(model, x[:1], latency=False).macs
    data, losses = _data(model, x)
    try:
        prune(model, x[:1], criterion, channel_ratio=0.3, data=data, losses=losses, batches=1, min_channels=2)
    except MTPruneInputError as err:
        assert expected != PRUNES, f"{name} with {criterion} was refused: {err}"
        assert "\n" not in str(err)
        if expected != EITHER:
            assert re.search(expected, str(err)), str(err)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    assert expected in (PRUNES, EITHER), f"{name} with {criterion} pruned, expected a refusal"
    with torch.no_grad():
        out = model(x)
    assert {k: v.shape for k, v in out.items()} == shapes
    assert all(torch.isfinite(v).all() for v in out.values())
    assert profile(model, x[:1], latency=False).macs < macs0

    path = save(model, tmp_path / "m.mtp", example_inputs=x[:1])
    loaded = load(path, base=_build(name)[0]).eval()
    with torch.no_grad():
        for task, want in loaded(x).items():
            torch.testing.assert_close(want, out[task], rtol=1e-4, atol=1e-5)
    prof = profile(loaded, x[:1], latency=False)
    assert prof.params == sum(p.numel() for p in model.parameters()) and prof.macs < macs0
    assert set(prof.macs_per_subset) >= {"a", "b"}


def test_a_channel_reached_by_two_paths_is_left_alone() -> None:
    """GhostNet concatenates a conv's output with a depthwise copy of it: channel i of the conv is channels i and
    C + i of the concat, so Torch-Pruning maps the conv and its BatchNorm to different channels of the residual
    group. The group is skipped (it used to reach the allocator and fail with a raw ValueError)."""
    from mtprune.pruning.graph import PruningGraph

    model, x = _build("ghostnet_050")
    graph = PruningGraph(model, x[:1], min_channels=2)
    why = graph.skipped["backbone.conv_stem"]
    assert "backbone.blocks.0.0.ghost2.primary_conv.0 and its norm" in why and "different channels" in why
    assert all(g.root != "backbone.conv_stem" for g in graph.groups) and graph.groups
