"""PAM's relevance test at any activation scale (issue 16): per-neuron distances (pooled or unpooled, unit scale)
and the per-layer label-permutation null; PAM with it finds exclusive neurons where the fixed α finds none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtprune.merging import pam
from mtprune.merging.chain import read_chain
from mtprune.merging.grouping import irrelevant_set
from mtprune.merging.mutual_info import label_masks
from mtprune.merging.pam import layer_activations
from mtprune.merging.relevance import neuron_distances, permutation_relevance
from mtprune.utils.errors import MTPruneInputError


def _signals(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two binary labels and activations [n, 3]: a noisy copy of y, pure noise, and a constant (dead) neuron."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    acts = torch.stack([y.float() + 0.3 * torch.randn(n, generator=g), torch.randn(n, generator=g),
                        torch.zeros(n)], dim=1)
    return acts, y


@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_permutation_test_separates_signal_from_noise_at_any_scale(scale):
    acts, y = _signals()
    found = permutation_relevance(neuron_distances(scale * acts, "unit"), y, permutations=20, quantile=0.95)
    assert found.relevant.tolist() == [True, False, False]
    summary = found.summary()
    assert summary["relevant"] == 1 and summary["neurons"] == 3 and summary["mi_max"] > summary["null_max"]


def test_unit_scale_makes_the_estimate_scale_free_and_the_fixed_alpha_is_not():
    acts, y = _signals()
    a = permutation_relevance(neuron_distances(acts, "unit"), y, permutations=5)
    b = permutation_relevance(neuron_distances(40.0 * acts, "unit"), y, permutations=5)
    torch.testing.assert_close(a.mi, b.mi)
    torch.testing.assert_close(a.threshold, b.threshold)
    # the paper's greedy set with a fixed α on raw distances: at scale 40 the pure-noise neuron carries far more
    # than α = 0.05 nats (the KDE noise floor), so it is no longer found irrelevant
    masks = label_masks(y)
    assert 1 in irrelevant_set(0.05 * acts, masks, 0.05)
    assert 1 not in irrelevant_set(40.0 * acts, masks, 0.05)


def test_distances_of_maps_and_of_pooled_values():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(10, 4, 6, generator=g)
    d = neuron_distances(maps)
    ref = torch.stack([torch.cdist(maps[:, j], maps[:, j]).square() for j in range(4)])
    torch.testing.assert_close(d, ref, atol=1e-4, rtol=1e-4)
    unit = neuron_distances(maps, "unit")
    n = maps.shape[0]
    torch.testing.assert_close(unit.sum((1, 2)) / (n * (n - 1)), torch.ones(4))
    assert neuron_distances(torch.ones(10, 2), "unit").abs().sum() == 0  # constant neurons: no distance


def test_bad_settings_are_refused():
    acts, y = _signals()
    d = neuron_distances(acts)
    with pytest.raises(MTPruneInputError, match="quantile"):
        permutation_relevance(d, y, quantile=0.0)
    with pytest.raises(MTPruneInputError, match="permutations"):
        permutation_relevance(d, y, permutations=0)
    with pytest.raises(MTPruneInputError, match="scale"):
        neuron_distances(acts, "median")
    with pytest.raises(MTPruneInputError, match="relevance"):
        pam({"a": nn.Sequential(nn.Linear(2, 2)), "b": nn.Sequential(nn.Linear(2, 2))},
            (torch.zeros(4, 2), {"a": torch.zeros(4), "b": torch.zeros(4)}), relevance="fixed")


def _copy_net(column: int, scale: float) -> nn.Sequential:
    """Hidden layer of 3 neurons that read input ``column`` (times ``scale``), then a 2-way output."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:, column] = torch.tensor([1.0, 2.0, 3.0]) * scale
        net[0].bias.fill_(1.0 * scale)
    return net


@pytest.mark.parametrize("scale", [0.2, 5.0])
def test_pam_with_the_permutation_test_finds_exclusive_neurons(scale):
    g = torch.Generator().manual_seed(3)
    n = 96
    ya, yb = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    x = torch.stack([ya.float(), yb.float()], 1) + 0.1 * torch.randn(n, 2, generator=g)
    models = {"a": _copy_net(0, scale), "b": _copy_net(1, scale)}
    merged, report = pam(models, (x, {"a": ya, "b": yb}), relevance="permutation", scale="unit", permutations=20,
                         batch=n)
    layer = report.layers[0]
    assert layer.exclusive == {"a": 3, "b": 3} and layer.shared == 0 and layer.alpha is None
    assert layer.relevance["a"]["relevant"] == 3 and layer.relevance["b"]["relevant"] == 3
    assert report.settings["relevance"] == "permutation" and "relevance" in report.to_dict()["layers"][0]
    with torch.no_grad():  # nothing crossed networks, so the merged network computes the originals exactly
        out = merged(x)
        for t, m in models.items():
            torch.testing.assert_close(out[t], m(x))


def test_unpooled_activations_keep_the_maps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU(),
                        nn.Linear(5, 2))
    x = torch.randn(6, 3, 8, 8)
    chains = {"a": read_chain("a", net, x), "b": read_chain("b", net, x)}
    pooled, maps = layer_activations(chains, x, "max"), layer_activations(chains, x, "none")
    assert pooled[0].shape == (6, 8) and maps[0].shape == (6, 8, 36) and maps[1].shape == (6, 10, 1)
    torch.testing.assert_close(maps[0].amax(-1), pooled[0])
    with pytest.raises(MTPruneInputError, match="pooling"):
        layer_activations(chains, x, "mean")
