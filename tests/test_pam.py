"""PAM (He et al., KDD 2021): the KDE mutual information (Kolchinsky & Tracey 2017 bound), the grouping, the
merged network (exactness, wiring, task subsets, pruning), refusals, the cost accounting and the config."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import mtprune
from mtprune.merging import (
    Partition,
    irrelevant_set,
    label_masks,
    merge_with_partitions,
    mi_from_distances,
    mutual_information,
    pam,
    partition,
)
from mtprune.merging.chain import read_chain
from mtprune.merging.cost import SubsetCost, cost_table, merged_costs, plot_costs, separate_costs, subset_keys
from mtprune.merging.mutual_info import pairwise_sq_dists
from mtprune.merging.naive import naive_merge
from mtprune.tasks import ClassificationTask, MultiLabelTask
from mtprune.utils.errors import MTPruneInputError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _entropy(y: torch.Tensor) -> float:
    p = torch.bincount(y).double() / len(y)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


# ---------------------------------------------------------------- mutual information


def test_mi_of_independent_variables_is_near_zero():
    g = _gen(0)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.randn(400, 1, generator=g) * 0.2  # dense compared with the KDE noise (σ² = 0.1)
    assert abs(mutual_information(x, y)) < 0.01


def test_mi_of_a_separated_copy_is_the_label_entropy():
    g = _gen(1)
    y = torch.randint(0, 5, (300,), generator=g)
    assert mutual_information(10.0 * y[:, None].float(), y) == pytest.approx(_entropy(y), abs=1e-4)
    # a copy of only some of the information: the label's parity
    assert mutual_information(10.0 * (y % 2)[:, None].float(), y) == pytest.approx(_entropy(y % 2), abs=1e-4)


def test_mi_of_multilabel_targets_sums_over_attributes():
    g = _gen(2)
    attrs = torch.randint(0, 2, (300, 3), generator=g)
    expected = sum(_entropy(attrs[:, a]) for a in range(3))
    assert mutual_information(10.0 * attrs.float(), attrs.float()) == pytest.approx(expected, abs=1e-4)
    signs = attrs.float() * 2 - 1  # the ±1 CelebA convention reads the same
    assert mutual_information(10.0 * attrs.float(), signs) == pytest.approx(expected, abs=1e-4)


def test_mi_batched_over_candidates_matches_one_at_a_time():
    g = _gen(3)
    y = torch.randint(0, 3, (64,), generator=g)
    x = torch.randn(64, 5, generator=g) + y[:, None].float() * torch.tensor([0.0, 0.3, 1.0, 2.0, 0.1])
    per = pairwise_sq_dists(x)
    batched = mi_from_distances(per, label_masks(y))
    single = torch.tensor([mutual_information(x[:, j:j + 1], y) for j in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert int(batched.argmax()) == 3
    pair = mi_from_distances(per[2] + per[3], label_masks(y))  # a set of neurons: distances add up
    assert float(pair) == pytest.approx(mutual_information(x[:, 2:4], y), abs=1e-5)


def test_mi_rejects_bad_inputs():
    with pytest.raises(MTPruneInputError):
        mutual_information(torch.zeros(4, 1), torch.zeros(5, dtype=torch.long))
    with pytest.raises(MTPruneInputError):
        mutual_information(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), noise_var=0.0)


# ---------------------------------------------------------------- grouping


def test_partition_sets_from_irrelevant_sets():
    p = partition({"a": [0, 1, 2], "b": [1, 2, 3]}, 5)
    assert p.dropped == [1, 2] and p.exclusive == {"a": [3], "b": [0]} and p.shared == [4]
    p3 = partition({"a": [0, 1, 2], "b": [0, 1], "c": [0, 2]}, 4)
    # D = {0}; E_a = R_b ∩ R_c − D = {}; E_b = R_a ∩ R_c − D = {2}; E_c = R_a ∩ R_b − D = {1}; C = {3}
    assert p3.dropped == [0] and p3.exclusive == {"a": [], "b": [2], "c": [1]} and p3.shared == [3]
    with pytest.raises(MTPruneInputError):
        partition({"a": [0]}, 2)


def test_greedy_grouping_on_constructed_activations():
    g = _gen(4)
    n = 256
    ya = torch.randint(0, 2, (n,), generator=g)
    yb = torch.randint(0, 3, (n,), generator=g)
    acts = torch.stack([
        10.0 * ya,  # 0: a copy of A's label
        10.0 * yb,  # 1: a copy of B's label
        10.0 * ya + 30.0 * yb,  # 2: both labels
        0.02 * torch.randn(n, generator=g),  # 3-4: noise, tiny against the KDE noise
        0.02 * torch.randn(n, generator=g),
        torch.zeros(n),  # 5: dead
    ], dim=1).float()
    masks = {"a": label_masks(ya), "b": label_masks(torch.nn.functional.one_hot(yb, 3).float())}  # B multi-label
    r = {t: irrelevant_set(acts, m, alpha=0.05) for t, m in masks.items()}
    assert 0 not in r["a"] and 2 not in r["a"] and 1 not in r["b"] and 2 not in r["b"]
    p = partition(r, acts.shape[1])
    assert 0 in p.exclusive["a"] + p.shared and 1 in p.exclusive["b"] + p.shared
    assert p.exclusive["a"] == [0] and p.exclusive["b"] == [1] and p.shared == [2]
    assert p.dropped == [3, 4, 5]


# ---------------------------------------------------------------- the merged network


def _lenet(task: str, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = mtprune.build_model("lenet5", {task: classes}, width=0.5, input_size=16)
    for m in model.modules():  # larger weights than the zoo init, so activations are far from 0
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return model


def _batch(n: int = 32, side: int = 16, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = _gen(seed)
    x = torch.rand(n, 3, side, side, generator=g)
    return x, {"a": torch.randint(0, 10, (n,), generator=g), "b": torch.randint(0, 2, (n, 2), generator=g).float()}


@pytest.mark.parametrize("arch", ["lenet5", "vgg16_cls"])
def test_merged_network_equals_originals_at_construction(arch):
    x, targets = _batch(side=16 if arch == "lenet5" else 32)
    if arch == "lenet5":
        models = {"a": _lenet("a", 10, 0), "b": _lenet("b", 2, 1)}
    else:
        models = {}
        for i, (t, k) in enumerate((("a", 10), ("b", 2))):
            torch.manual_seed(i)
            models[t] = mtprune.build_model("vgg16_cls", {t: k}, width=0.0625, fc_hidden=128)
    merged, report = pam(models, (x, targets), alpha_conv=-1.0, alpha_linear=-1.0)
    assert all(layer.dropped == 0 and layer.shared == sum(layer.widths.values()) for layer in report.layers)
    merged.eval()
    with torch.no_grad():
        out = merged(x)
        for t, m in models.items():
            m.eval()
            assert torch.allclose(out[t], m(x)[t], atol=1e-5), t
    assert set(out) == {"a", "b"}


def _tiny_chain(classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3), relu=nn.ReLU(), pool=nn.MaxPool2d(2), flatten=nn.Flatten(1),
        fc=nn.Linear(4 * 3 * 3, 6), relu2=nn.ReLU(), out=nn.Linear(6, classes)))


def _explicit_case():
    """A: all shared; B: exclusive; one neuron of each network dropped after its outgoing weights are zeroed."""
    models = {"a": _tiny_chain(5, 0), "b": _tiny_chain(3, 1)}
    with torch.no_grad():
        models["a"].fc.weight[:, 3 * 9:4 * 9] = 0  # A's conv channel 3 is read by nobody
        models["b"].fc.weight[:, 3 * 9:4 * 9] = 0  # B's conv channel 3 (global 7) too
    parts = [
        Partition(dropped=[3, 7], exclusive={"a": [], "b": [4, 5, 6]}, shared=[0, 1, 2]),
        Partition(dropped=[], exclusive={"a": [], "b": list(range(6, 12))}, shared=list(range(6))),
    ]
    return models, parts, torch.rand(8, 3, 8, 8, generator=_gen(6))


def test_merged_network_wiring_and_exactness_with_explicit_partitions():
    models, parts, x = _explicit_case()
    merged = merge_with_partitions(models, parts, x)
    shapes = {n: tuple(p.shape) for n, p in merged.named_parameters() if n.endswith("weight")}
    assert shapes == {
        "shared.l0.layer.weight": (3, 3, 3, 3),  # C_0 reads the input
        "shared.l1.layer.weight": (6, 3 * 9),  # C_1 reads C_0 (3 channels of 3x3)
        "heads.a.out.layer.weight": (5, 6),  # head A reads [E_A (empty), C_1]
        "heads.b.stages.l0.layer.weight": (3, 3, 3, 3),
        "heads.b.stages.l1.layer.weight": (6, (3 + 3) * 9),  # E_B,1 reads [E_B,0, C_0]
        "heads.b.out.layer.weight": (3, 6 + 6),  # head B reads [E_B,1, C_1]
    }
    # weights that cross networks start at 0: B's layers reading C (A's neurons)
    assert merged.heads.b.stages.l1.layer.weight[:, 3 * 9:].abs().sum() == 0
    assert merged.heads.b.out.layer.weight[:, 6:].abs().sum() == 0
    out = merged(x)
    with torch.no_grad():
        for t, m in models.items():
            assert torch.allclose(out[t], m(x), atol=1e-5), t


def test_subset_forward_runs_only_the_needed_partitions():
    models, parts, x = _explicit_case()
    merged = merge_with_partitions(models, parts, x)
    calls: list[str] = []
    for name, m in merged.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
    out = merged(x, tasks=["a"])
    assert set(out) == {"a"} and not any(c.startswith("heads.b") for c in calls)
    calls.clear()
    merged(x, tasks="b")
    assert not any(c.startswith("heads.a") for c in calls) and any(c.startswith("shared") for c in calls)
    costs = merged_costs(merged, x[:1], latency=False)
    assert costs["a"].macs < costs["a+b"].macs and costs["b"].macs < costs["a+b"].macs
    with pytest.raises(MTPruneInputError, match="unknown"):
        merged(x, tasks=["c"])


def test_settle_drops_partitions_that_read_or_feed_nothing():
    models, _, x = _explicit_case()
    parts = [
        Partition(dropped=[], exclusive={"a": [3], "b": []}, shared=[0, 1, 2, 4, 5, 6, 7]),  # E_a,0 feeds nothing
        Partition(dropped=[], exclusive={"a": [], "b": list(range(6, 12))}, shared=list(range(6))),
    ]
    merged = merge_with_partitions(models, parts, x)
    assert parts[0].dropped == [3] and "l0" not in merged.heads.a.stages
    starved = [Partition([], {"a": [], "b": list(range(8))}, []), Partition([], {"a": [], "b": list(range(12))}, [])]
    with pytest.raises(MTPruneInputError, match="no neuron for task"):
        merge_with_partitions(models, starved, x)


def test_merged_network_is_prunable():
    x, targets = _batch()
    models = {"a": _lenet("a", 10, 0), "b": _lenet("b", 2, 1)}
    merged, _ = pam(models, (x, targets), alpha_conv=-1.0, alpha_linear=-1.0)
    tasks = {"a": ClassificationTask("a", 10), "b": MultiLabelTask("b", 2)}
    data = [(x[:16], {t: v[:16] for t, v in targets.items()}), (x[16:], {t: v[16:] for t, v in targets.items()})]
    report = mtprune.prune(merged, x[:1], "taylor", channel_ratio=0.3, data=data, losses=tasks, min_channels=2)
    assert report.macs_after < report.macs_before
    assert any(report.widths_after[k] < w for k, w in report.widths_before.items())
    out = merged(x[:2], tasks=["b"])
    assert out["b"].shape == (2, 2)


def test_pam_reports_and_runs_on_trained_like_networks():
    """Network A's neurons copy A's label, B's copy B's: PAM keeps each in its own exclusive partition."""
    g = _gen(7)
    x = 0.5 * torch.rand(96, 3, 8, 8, generator=g)
    ya, yb = torch.randint(0, 2, (96,), generator=g), torch.randint(0, 2, (96,), generator=g)
    x[:, 0, 0, 0], x[:, 1, 7, 7] = 0.1 + 0.8 * ya, 0.1 + 0.8 * yb  # one bright pixel per label

    def detector(channel: int, row: int, col: int, classes: int) -> nn.Sequential:
        net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(1), nn.Linear(2 * 64, 3), nn.ReLU(),
                            nn.Linear(3, classes))
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
            net[0].weight[0, channel] = 20.0  # channel 0 sees the label's pixel; channel 1 is dead
            net[0].bias[0] = -10.0
            net[3].weight[0, row * 8 + col] = 1.0  # fc neuron 0 reads that pixel; neurons 1, 2 are dead
        return net

    models = {"a": detector(0, 0, 0, 2), "b": detector(1, 7, 7, 2)}
    merged, report = pam(models, (x, {"a": ya, "b": yb}))
    fc = report.layers[1]
    assert fc.exclusive == {"a": 1, "b": 1} and fc.shared == 0 and fc.dropped == 4
    assert report.layers[1].partition.exclusive == {"a": [0], "b": [3]}
    assert "| layer |" in report.table() and report.to_dict(indices=True)["layers"][1]["partition"]["D"]
    assert set(merged(x[:2])) == {"a", "b"}


# ---------------------------------------------------------------- refusals


def test_refuses_a_residual_network_naming_the_module():
    x, targets = _batch(side=32)
    models = {t: mtprune.build_model("deeplab_resnet18", {t: 2}, width=0.125, head="linear") for t in ("a", "b")}
    with pytest.raises(MTPruneInputError, match=r"chain networks only.*'a': backbone is a .*ResNet"):
        pam(models, (x, targets))


def test_refuses_a_custom_forward_and_mismatched_architectures():
    class Skip(nn.Sequential):
        def forward(self, x):
            return super().forward(x) + x.mean()

    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(MTPruneInputError, match="not the sequence of its layers"):
        read_chain("a", Skip(nn.Flatten(1), nn.Linear(192, 4), nn.ReLU(), nn.Linear(4, 2)), x)
    with pytest.raises(MTPruneInputError, match="same architecture"):
        merge_with_partitions({"a": _tiny_chain(2, 0), "b": nn.Sequential(nn.Flatten(1), nn.Linear(192, 2))}, [], x)
    with pytest.raises(MTPruneInputError, match="at least two"):
        pam({"a": _tiny_chain(2, 0)}, (x, {"a": torch.zeros(4, dtype=torch.long)}))


# ---------------------------------------------------------------- cost accounting


def _mlp(classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, classes))


def test_cost_accounting_on_a_hand_computed_example():
    x = torch.rand(2, 4)
    models = {"a": _mlp(2), "b": _mlp(2)}
    # hidden layer: 6 neurons (A: 0-2, B: 3-5); C = {0, 3}, E_a = {1}, E_b = {4}, D = {2, 5}
    merged = merge_with_partitions(models, [Partition([2, 5], {"a": [1], "b": [4]}, [0, 3])], x)
    pam_cost = merged_costs(merged, x[:1], latency=False)
    # C: 4*2 = 8; E_a, E_b: 4*1 = 4 each; each head reads [E_t (1), C (2)]: 3*2 = 6
    assert {k: c.macs for k, c in pam_cost.items()} == {"a": 8 + 4 + 6, "b": 8 + 4 + 6, "a+b": 8 + 4 + 4 + 6 + 6}
    separate = separate_costs(models, x[:1], latency=False)
    assert {k: c.macs for k, c in separate.items()} == {"a": 4 * 3 + 3 * 2, "b": 18, "a+b": 36}
    naive = naive_merge(models, x, split=1)  # one shared hidden layer of 3, two heads of 3*2
    assert {k: c.macs for k, c in merged_costs(naive, x[:1], latency=False).items()} == {"a": 18, "b": 18,
                                                                                          "a+b": 24}
    rows = cost_table({"no_merge": separate, "pam": pam_cost})
    assert rows[-1]["no_merge_over_pam"] == pytest.approx(36 / 28)


def test_cost_table_has_a_row_per_subset_and_a_figure(tmp_path):
    tasks = ["a", "b", "c"]
    keys = subset_keys(tasks)
    assert len(keys) == 2 ** 3 - 1 and keys[0] == "a" and keys[-1] == "a+b+c"
    costs = {name: {k: SubsetCost(100 * len(k.split("+")) + i, 1.0) for k in keys}
             for i, name in enumerate(("no_merge", "naive", "pam"))}
    rows = cost_table(costs)
    assert len(rows) == 7 and {r["subset"] for r in rows} == set(keys)
    path = plot_costs(costs, tmp_path / "cost.png")
    assert path.stat().st_size > 1000
    with pytest.raises(MTPruneInputError):
        cost_table({"pam": costs["pam"]})


# ---------------------------------------------------------------- config and command


def test_merge_config_and_command_parser(tmp_path):
    import argparse
    from pathlib import Path

    from mtprune.merging.command import register
    from mtprune.merging.experiment import load_merge_config

    cfg = load_merge_config(Path(__file__).parents[1] / "configs" / "merge_pam_multidigits.yaml")
    assert cfg.merge.method == "pam" and cfg.merge.alpha_conv == 0.01 and cfg.merge.noise_var == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge: {method: mtz}\n")
    with pytest.raises(MTPruneInputError, match="merge.method"):
        load_merge_config(bad)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["merge", "x.yaml", "--set", "train.epochs=1", "--out", "d"])
    assert args.config == "x.yaml" and args.overrides == ["train.epochs=1"] and args.out == "d"


def test_entropy_helper_is_consistent():
    assert _entropy(torch.tensor([0, 1, 0, 1])) == pytest.approx(math.log(2))


@pytest.mark.filterwarnings("ignore:target_macs")
def test_merge_run_end_to_end_on_tiny_multidigits(tmp_path):
    from mtprune.merging.experiment import MergeConfig, run_merge

    tiny = {"epochs": 1, "batch_size": 32, "lr": 0.002, "eval_batch_size": 128, "scheduler": "none"}
    cfg = MergeConfig.model_validate({
        "name": "tiny", "device": "cpu", "tasks": ["left", "parity"],
        "data": {"name": "multidigits", "augment": False, "kwargs": {"n_train": 128, "n_val": 64, "size": 16}},
        "model": {"name": "lenet5", "width": 0.5, "kwargs": {"input_size": 16}},
        "train": tiny,
        "merge": {"alpha_conv": -1.0, "alpha_linear": -1.0, "batch": 32, "naive_split": 2, "retrain": tiny},
        "prune": {"ladder": [0.5], "accuracy_drop": 100.0, "stats_batches": 1, "finetune": tiny},
        "cost": {"latency": False},
    })
    summary = run_merge(cfg, tmp_path, quiet=True)
    assert len(summary["table"]) == 3 and summary["budgets"]["pam"]["budget_met"]
    assert summary["budgets"]["pam"]["fraction"] < 0.6
    for name in ("report.md", "summary.json", "pam_partitions.json", "pam.mtp", "plots/cost_per_subset.png"):
        assert (tmp_path / name).is_file(), name
