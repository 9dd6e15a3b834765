"""Task subsets you can deploy (issue 16): a merged network (PAM / naive ``MergedNet``, ``MFISNet``) cut down to a
subset of its tasks computes what the merged network computes for them, at exactly the subset's MACs, and saves
and loads as ``.mtp`` through ``mtprune.io``'s model-kind registry."""

from __future__ import annotations

import ast
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mtprune
from mtprune.io import MODEL_KINDS, load, register_model_kind, save
from mtprune.merging import merge_with_partitions
from mtprune.merging.chain import read_chain
from mtprune.merging.cost import merged_costs
from mtprune.merging.grouping import Partition
from mtprune.merging.mfis import build_mfis
from mtprune.merging.subsets import deploy_costs, extract_tasks, merged_structure
from mtprune.utils.errors import MTPruneInputError


def _chain(classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), relu=nn.ReLU(), pool=nn.MaxPool2d(2), flatten=nn.Flatten(1),
        fc=nn.Linear(4 * 3 * 3, 6), relu2=nn.ReLU(), out=nn.Linear(6, classes))).eval()


def _pam_net() -> tuple[nn.Module, torch.Tensor]:
    models = {"a": _chain(5, 0), "b": _chain(3, 1), "c": _chain(2, 2)}
    parts = [Partition(dropped=[11], exclusive={"a": [3], "b": [4, 5], "c": [8, 9, 10]}, shared=[0, 1, 2, 6, 7]),
             Partition(dropped=[], exclusive={"a": [0, 1], "b": list(range(6, 12)), "c": [12]},
                       shared=[2, 3, 4, 5, *range(13, 18)])]
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    return merge_with_partitions(models, parts, x).eval(), x


def _mfis_net() -> tuple[nn.Module, torch.Tensor]:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    chains = {t: read_chain(t, _chain(2, i), x) for i, t in enumerate(("a", "b", "c"))}
    m0 = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]], bool)
    m1 = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1], [0, 1, 1]], bool)
    return build_mfis(chains, [m0, m1]).eval(), x


@pytest.mark.parametrize("make", [_pam_net, _mfis_net])
def test_extracted_subsets_compute_the_same_at_exactly_the_claimed_macs(make, tmp_path):
    net, x = make()
    claimed = merged_costs(net, x[:1], latency=False)
    for key, cost in claimed.items():
        tasks = key.split("+")
        sub = extract_tasks(net, tasks).eval()
        assert set(sub.task_names) == set(tasks)
        assert mtprune.profile(sub, x[:1], latency=False).macs == cost.macs, key
        with torch.no_grad():
            want, got = net(x, tasks=tasks), sub(x)
        assert set(got) == set(tasks)
        for t in tasks:
            torch.testing.assert_close(got[t], want[t])
    # the other tasks' weights are not in the extracted model
    alone = extract_tasks(net, ["a"])
    assert sum(p.numel() for p in alone.parameters()) < sum(p.numel() for p in net.parameters())
    assert not any(n.startswith(("heads.b", "heads.c")) for n, _ in alone.named_parameters())
    # deploy_costs measures every subset's own model against the claim
    deployed = deploy_costs(net, x[:1], claimed, latency=False)
    assert {k: v["macs"] for k, v in deployed.items()} == {k: c.macs for k, c in claimed.items()}


@pytest.mark.parametrize("make", [_pam_net, _mfis_net])
def test_extracted_subset_saves_and_loads_as_mtp(make, tmp_path):
    net, x = make()
    sub = extract_tasks(net, ["b", "c"]).eval()
    extra = {"merged": merged_structure(sub)} if hasattr(sub, "depth") else {"mfis": sub.structure()}
    path = save(sub, tmp_path / "bc.mtp", example_inputs=x[:1], extra=extra)
    back = load(path)
    assert type(back) is type(sub) and set(back.task_names) == {"b", "c"}
    with torch.no_grad():
        want, got = sub(x), back(x)
    for t in ("b", "c"):
        torch.testing.assert_close(got[t], want[t])
    assert mtprune.profile(back, x[:1], latency=False).macs == mtprune.profile(sub, x[:1], latency=False).macs


def test_bad_extractions_are_refused():
    net, _ = _pam_net()
    with pytest.raises(MTPruneInputError, match="unknown or empty"):
        extract_tasks(net, ["a", "zzz"])
    with pytest.raises(MTPruneInputError, match="unknown or empty"):
        extract_tasks(net, [])
    with pytest.raises(MTPruneInputError, match="merged network"):
        extract_tasks(_chain(2, 0), ["a"])


def test_io_loads_model_kinds_through_a_registry_without_importing_merging():
    source = Path(mtprune.io.__file__).read_text()
    imported = [n for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom | ast.Import)
                for n in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])]
    assert not any("merging" in name for name in imported)
    assert {"mfis", "merged"} <= set(MODEL_KINDS)
    with pytest.raises(MTPruneInputError, match="module:function"):
        register_model_kind("x", "no_colon")
