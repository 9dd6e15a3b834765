"""Determinism on CPU: the same seed, model and data give the same pruning decisions and weights, bit for bit;
the same config gives the same initial model in any process."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import mtprune
from mtprune.config import parse_config
from mtprune.data.transforms import Compose, RandomHorizontalFlip, RandomScaleCrop
from mtprune.pruning.graph import PruningGraph
from mtprune.recipe import build_configured_model, build_tasks
from mtprune.tasks import preset

NAMES = ["seg", "depth", "normal"]
TASKS = {n: preset("synthetic_scenes")[n] for n in NAMES}
X = torch.zeros(1, 3, 32, 40)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """Training scenes with random scale-crops and flips: the statistics depend on the global RNG too."""
    root = tmp_path_factory.mktemp("scenes")
    return mtprune.data.load("synthetic_scenes", root=root, split="train", tasks=NAMES,
                             transform=Compose([RandomScaleCrop(), RandomHorizontalFlip()]),
                             n_train=12, n_val=6, height=32, width=40)


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)
    return mtprune.build_model("deeplab_resnet18", {n: t.out_channels for n, t in TASKS.items()}, width=0.125,
                               head="conv")


def prune_once(criterion: str, data, rng_seed: int):
    model = fresh_model()
    torch.manual_seed(rng_seed)  # the global RNG drives the augmentation of the statistics batches
    loader = DataLoader(data, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(7))
    report = mtprune.prune(model, X, criterion, target_macs=0.6, data=loader, losses=TASKS, batches=2, seed=3)
    return model, report


@pytest.mark.parametrize("criterion", ["taylor", "cosprune"])
def test_same_seed_and_data_give_the_same_pruning_bit_for_bit(augmented, criterion):
    a, report_a = prune_once(criterion, augmented, rng_seed=11)
    b, report_b = prune_once(criterion, augmented, rng_seed=11)
    widths = PruningGraph(a, X).widths()
    assert widths == PruningGraph(b, X).widths() == report_a.widths_after == report_b.widths_after
    assert widths != report_a.widths_before  # channels were removed
    assert (report_a.params_after, report_a.macs_after) == (report_b.params_after, report_b.macs_after)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the decisions do depend on the statistics: other augmentation draws decide otherwise (so the equality
    # above is not vacuous)
    c, _ = prune_once(criterion, augmented, rng_seed=12)
    other = c.state_dict()
    assert PruningGraph(c, X).widths() != widths or not all(torch.equal(sa[k], other[k]) for k in sa)


def test_the_configured_model_does_not_depend_on_the_global_rng():
    """``recipe.build_configured_model`` initialises from the config's seed, whatever the global RNG holds (as in
    a fresh process), so a run killed before its first checkpoint restarts from the same weights."""
    cfg = parse_config({"seed": 5, "model": {"name": "deeplab_resnet18", "width": 0.125, "head": "conv"},
                        "tasks": {"names": ["seg", "depth"]}})
    states = []
    for global_seed in (123, 456):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        states.append(build_configured_model(cfg, build_tasks(cfg)).state_dict())
        assert torch.equal(before, torch.get_rng_state())  # the global RNG was left as it was
    a, b = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_configured_model(cfg.model_copy(update={"seed": 6}), build_tasks(cfg)).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)
