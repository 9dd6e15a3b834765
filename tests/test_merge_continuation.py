"""PAM's per-task continuation (``merging/continuation.py``): after the joint ladder, one task's exclusive part is
pruned and fine-tuned alone; the shared trunk and the other tasks' branches keep their widths and weights, and the
task subsets still cost exactly what an extracted model costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtprune
from mtprune.merging.continuation import exclusive_macs, frozen_except, prune_exclusive, prune_shared, shared_macs
from mtprune.merging.cost import merged_costs
from mtprune.merging.subsets import deploy_costs
from mtprune.utils.errors import MTPruneInputError
from test_merge_subsets import _pam_net  # the same tiny 3-task PAM network (conv + BN + linear)

pytestmark = pytest.mark.filterwarnings("ignore:target_macs")


def _widths(net: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) for n, m in net.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}


def _state(net: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(prefix)}


def test_prune_exclusive_prunes_only_that_tasks_branch():
    net, x = _pam_net()
    x1 = x[:1]
    before, costs0 = _widths(net), merged_costs(net, x1, latency=False)
    total0, excl0 = mtprune.profile(net, x1, latency=False).macs, exclusive_macs(net, "b", x1)
    assert 0 < excl0 < total0
    prune_exclusive(net, "b", x1, target_macs=1 - 0.5 * excl0 / total0, criterion="l1", min_channels=1)
    after = _widths(net)
    changed = {n for n in before if after[n] != before[n]}
    assert changed and all(n.startswith("heads.b.stages.") for n in changed)  # only b's exclusive layers shrank
    assert all(after[n] < before[n] for n in changed)
    assert after["heads.b.out.layer"] == before["heads.b.out.layer"]  # the output stays whole
    costs1 = merged_costs(net, x1, latency=False)
    assert {k: c.macs for k, c in costs1.items() if "b" not in k.split("+")} == \
        {k: c.macs for k, c in costs0.items() if "b" not in k.split("+")}  # a, c, a+c cost the same
    drop = total0 - mtprune.profile(net, x1, latency=False).macs
    assert drop > 0 and exclusive_macs(net, "b", x1) == excl0 - drop  # all of it from b's exclusive MACs
    assert all(costs0[k].macs - costs1[k].macs == drop for k in costs0 if "b" in k.split("+"))
    deploy_costs(net.eval(), x1, costs1, latency=False)  # raises if an extracted subset costs other MACs
    assert net(x)["b"].shape == (4, 3)


def test_frozen_except_trains_only_that_branch_and_restores():
    net, x = _pam_net()
    net.train()
    others = _state(net, "heads.a.")
    mine = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("heads.a.")}
    with frozen_except(net, "a"):
        assert {n.split(".")[1] for n, p in net.named_parameters() if p.requires_grad} == {"a"}
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        out = net(x)
        sum(o.square().mean() for o in out.values()).backward()
        opt.step()
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in others.items())  # incl. BN running statistics
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in mine.items() if v.is_floating_point())


def test_prune_shared_prunes_only_the_trunk():
    net, x = _pam_net()
    x1 = x[:1]
    before, costs0 = _widths(net), merged_costs(net, x1, latency=False)
    total0, shared0 = mtprune.profile(net, x1, latency=False).macs, shared_macs(net, x1)
    excl0 = {t: exclusive_macs(net, t, x1) for t in net.task_names}
    assert shared0 == total0 - sum(excl0.values()) > 0
    prune_shared(net, x1, target_macs=1 - 0.4 * shared0 / total0, criterion="l1", min_channels=1)
    after = _widths(net)
    changed = {n for n in before if after[n] != before[n]}
    assert changed and all(n.startswith("shared.") for n in changed)  # no branch lost an output channel
    drop = total0 - mtprune.profile(net, x1, latency=False).macs
    assert drop > 0 and shared_macs(net, x1) < shared0
    costs1 = merged_costs(net, x1, latency=False)
    assert all(costs1[k].macs < costs0[k].macs for k in costs0)  # every subset pays for the trunk
    deploy_costs(net.eval(), x1, costs1, latency=False)  # extracted subsets still cost what the table says
    assert {t: v.shape for t, v in net(x).items()} == {"a": (4, 5), "b": (4, 3), "c": (4, 2)}


def test_continuation_refuses_other_models_and_tasks():
    net, x = _pam_net()
    with pytest.raises(MTPruneInputError, match="unknown task"):
        prune_exclusive(net, "z", x[:1], target_macs=0.9, criterion="l1")
    with pytest.raises(MTPruneInputError, match="MergedNet"):
        exclusive_macs(nn.Linear(2, 2), "a", x[:1])
    with pytest.raises(MTPruneInputError, match="MergedNet"):
        prune_shared(nn.Linear(2, 2), x[:1], target_macs=0.9, criterion="l1")


def test_runner_walks_each_task_to_its_own_limit(monkeypatch):
    """``_Runner.prune_per_task`` with a stand-in evaluation: task a leaves the budget as soon as its branch is
    pruned (so it is restored), task b stays within it down to half of its exclusive MACs; the shared trunk and a's
    branch end as they started, b's branch at the last rung within the budget, and fine-tuning trained only the
    branch being pruned."""
    from mtprune.merging.experiment import BudgetPruneSection, MergeConfig, _Runner

    net, x = _pam_net()
    x1 = x[:1]
    dense = {t: exclusive_macs(net, t, x1) for t in net.task_names}
    start = _widths(net)
    r = object.__new__(_Runner)
    r.cfg = MergeConfig(prune=BudgetPruneSection(criterion="l1", ladder=[0.85, 0.7, 0.55, 0.45, 0.35, 0.25],
                                                 accuracy_drop=1.0, min_channels=1, per_task=True))
    r.device, r.example, r.train_set = torch.device("cpu"), x1, [0] * 4
    trained: list[set[str]] = []

    def fit(model, tasks, section, where):
        trained.append({n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad})

    def score(model, tasks):
        w = _widths(model)
        a_pruned = any(w[n] < start[n] for n in w if n.startswith("heads.a."))
        b_kept = exclusive_macs(model, "b", x1) / dense["b"]
        return {"a": 80.0 if a_pruned else 95.0, "b": 95.0 if b_kept >= 0.5 else 80.0, "c": 95.0}

    monkeypatch.setattr(r, "fit", fit)
    monkeypatch.setattr(r, "score", score)
    tasks = dict.fromkeys(net.task_names)
    out, info = r.prune_per_task(net, tasks, {t: 95.0 for t in tasks}, dense, "per_task")
    end = _widths(out)
    assert all(end[n] == start[n] for n in start if n.startswith(("shared.", "heads.a.")))
    assert any(end[n] < start[n] for n in start if n.startswith("heads.b."))
    walks = info["walks"]
    assert [st["ok"] for st in walks["a"]] == [True, False]  # one rung, out of budget, restored
    assert walks["b"][-1]["ok"] is False and all(st["ok"] for st in walks["b"][:-1]) and len(walks["b"]) >= 3
    kept_b = exclusive_macs(out, "b", x1) / dense["b"]
    assert 0.5 <= kept_b == pytest.approx(walks["b"][-2]["fraction"])  # the last rung within the budget
    assert info["acc"] == {"a": 95.0, "b": 95.0, "c": 95.0}
    assert trained and all(len(s) == 1 for s in trained)  # each fine-tuning trained one branch only


def test_shared_walk_follows_the_per_task_walks_to_the_trunks_limit(monkeypatch):
    """``prune.shared_walk``: after every task's walk, the shared trunk walks the ladder alone, every branch
    protected, the whole network fine-tuned; it stops where the stand-in evaluation says the trunk is too thin."""
    from mtprune.merging.experiment import BudgetPruneSection, MergeConfig, _Runner

    with pytest.raises(ValueError, match="per_task"):
        BudgetPruneSection(shared_walk=True)
    net, x = _pam_net()
    x1 = x[:1]
    dense = {t: exclusive_macs(net, t, x1) for t in net.task_names}
    dense_shared = shared_macs(net, x1)
    start = _widths(net)
    r = object.__new__(_Runner)
    r.cfg = MergeConfig(prune=BudgetPruneSection(criterion="l1", ladder=[0.85, 0.7, 0.55, 0.45, 0.35, 0.25],
                                                 accuracy_drop=1.0, min_channels=1, per_task=True,
                                                 shared_walk=True))
    r.device, r.example, r.train_set = torch.device("cpu"), x1, [0] * 4
    trained: list[set[str]] = []

    def fit(model, tasks, section, where):
        trained.append({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})

    def score(model, tasks):  # every branch leaves the budget when pruned; the trunk at below 0.6 of its MACs
        w = _widths(model)
        branch_pruned = any(w[n] < start[n] for n in w if n.startswith("heads."))
        ok = not branch_pruned and shared_macs(model, x1) / dense_shared >= 0.6
        return dict.fromkeys(tasks, 95.0 if ok else 80.0)

    monkeypatch.setattr(r, "fit", fit)
    monkeypatch.setattr(r, "score", score)
    tasks = dict.fromkeys(net.task_names)
    out, info = r.prune_per_task(net, tasks, dict.fromkeys(tasks, 95.0), dense, "per_task", dense_shared)
    end = _widths(out)
    assert all(end[n] == start[n] for n in start if n.startswith("heads."))
    assert any(end[n] < start[n] for n in start if n.startswith("shared."))
    steps = info["shared_walk"]
    assert steps[0]["fraction"] == pytest.approx(1.0) and steps[-1]["ok"] is False
    kept = shared_macs(out, x1) / dense_shared
    assert kept == pytest.approx(steps[-2]["fraction"])  # the last rung within the budget
    assert 0.6 <= kept < 0.9
    assert set(info["walks"]) == set(tasks)
    assert trained[-1] == {"shared", "heads"}  # the trunk's steps fine-tune the whole network
