"""``prune.refine`` (ours, issue 16): after the first rung out of the accuracy budget, bisection steps between it
and the last rung within the budget, for every walk alike (no merging, naive, PAM's joint ladder and its per-task
walks); MFIS's budget rescue (the nearest miss trained further when no front point tried meets the budget); and
the merge suites' fingerprints that let stored entries stand when only these options changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtprune
from mtprune.merging.continuation import exclusive_macs
from mtprune.merging.experiment import BudgetPruneSection, MergeConfig, _Runner
from test_merge_continuation import _widths
from test_merge_subsets import _pam_net

pytestmark = pytest.mark.filterwarnings("ignore:target_macs")
LADDER = [0.85, 0.7, 0.55, 0.45, 0.35, 0.25]


def _runner(monkeypatch, refine: int, score, x1: torch.Tensor) -> tuple[_Runner, list[str]]:
    r = object.__new__(_Runner)
    r.cfg = MergeConfig(prune=BudgetPruneSection(criterion="l1", ladder=LADDER, accuracy_drop=1.0, min_channels=1,
                                                 per_task=True, refine=refine))
    r.device, r.example, r.train_set = torch.device("cpu"), x1, [0] * 4
    trained: list[str] = []
    monkeypatch.setattr(r, "fit", lambda model, tasks, section, where: trained.append(where))
    monkeypatch.setattr(r, "score", score)
    return r, trained


def _per_task(monkeypatch, refine: int, limit: float):
    net, x = _pam_net()
    x1 = x[:1]
    dense = {t: exclusive_macs(net, t, x1) for t in net.task_names}
    start = _widths(net)

    def score(model, tasks):  # a and c out of the budget once touched; b within it down to `limit` of its part
        w = _widths(model)
        touched = {t: any(w[n] < start[n] for n in w if n.startswith(f"heads.{t}.")) for t in ("a", "c")}
        b = exclusive_macs(model, "b", x1) / dense["b"]
        return {"a": 80.0 if touched["a"] else 95.0, "b": 95.0 if b >= limit else 80.0,
                "c": 80.0 if touched["c"] else 95.0}

    r, trained = _runner(monkeypatch, refine, score, x1)
    tasks = dict.fromkeys(net.task_names)
    out, info = r.prune_per_task(net, tasks, {t: 95.0 for t in tasks}, dense, "per_task")
    return exclusive_macs(out, "b", x1) / dense["b"], info["walks"]["b"], trained


def test_per_task_walk_bisects_past_the_failed_rung(monkeypatch):
    plain, plain_walk, _ = _per_task(monkeypatch, 0, 0.5)
    kept, walk, trained = _per_task(monkeypatch, 2, 0.5)
    assert not any(st.get("refine") for st in plain_walk)
    rungs = [st for st in walk if not st.get("refine")]
    assert [st["fraction"] for st in rungs] == [st["fraction"] for st in plain_walk]  # the same rungs first
    bisect = [st for st in walk if st.get("refine")]
    assert 1 <= len(bisect) <= 2 and any(f"per_task/b/refine{j}" in trained for j in (1, 2))
    ok_before, failed = rungs[-2]["fraction"], rungs[-1]["fraction"]
    assert all(failed < st["fraction"] < ok_before for st in bisect)  # strictly between the two rungs
    assert 0.5 <= kept < plain == pytest.approx(ok_before)  # further than the rungs alone, still within budget
    assert kept == pytest.approx(min(st["fraction"] for st in walk if st["ok"]))


def _joint(monkeypatch, refine: int, limit: float):
    net, x = _pam_net()
    x1 = x[:1]
    macs0 = mtprune.profile(net, x1, latency=False).macs

    def score(model, tasks):
        ok = mtprune.profile(model, x1, latency=False).macs / macs0 >= limit
        return {t: 95.0 if ok else 80.0 for t in tasks}

    r, trained = _runner(monkeypatch, refine, score, x1)
    tasks = dict.fromkeys(net.task_names)
    out, info = r.prune_to_budget(net, tasks, {t: 95.0 for t in tasks}, "joint")
    return mtprune.profile(out, x1, latency=False).macs / macs0, info, trained


def test_joint_ladder_bisects_past_the_failed_rung(monkeypatch):
    plain, plain_info, _ = _joint(monkeypatch, 0, 0.5)
    kept, info, trained = _joint(monkeypatch, 2, 0.5)
    assert info["budget_met"] and info["fraction"] == pytest.approx(kept)
    rungs = [st for st in info["steps"] if not st.get("refine")]
    assert [st["fraction"] for st in rungs] == [st["fraction"] for st in plain_info["steps"]]
    bisect = [st for st in info["steps"] if st.get("refine")]
    assert bisect and "joint/refine1" in trained
    assert all(rungs[-1]["fraction"] < st["fraction"] < rungs[-2]["fraction"] for st in bisect)
    assert 0.5 <= kept < plain


def test_refine_must_be_a_count():
    with pytest.raises(ValueError, match="refine"):
        BudgetPruneSection(refine=-1)
    assert BudgetPruneSection().refine == 0  # off unless asked: the walks are the rungs only


def _mfis_budget(rescue):
    from mtprune.merging.mfis.budget import select_within_budget
    from test_mfis_budget import _front

    front, extra = _front(), []

    def build(i: int) -> nn.Module:
        net = nn.Linear(1, 1)
        net.macs, net.bonus = float(front.F[i, 2]), 0.0
        return net

    def score(net):  # every point misses task a by 1 point at MACs 0.7 and more elsewhere, until rescued
        return {"a": 87.0 - 10 * abs(net.macs - 0.7) + net.bonus, "b": 80.0}

    def train_more(net):
        extra.append(net.macs)
        net.bonus = 1.5

    choice = select_within_budget(front, build, score, lambda net, k: None, {"a": 90.0, "b": 80.0}, 2.0, 6,
                                  rescue=train_more if rescue else None)
    return choice, extra


def test_mfis_rescue_trains_the_nearest_miss_further():
    plain, extra = _mfis_budget(False)
    assert not plain.within_budget and not extra and len(plain.trials) == 6
    rescued, extra = _mfis_budget(True)
    assert extra == [0.7] and rescued.index == plain.index == 4  # only the nearest miss, once
    assert rescued.within_budget and rescued.acc["a"] == pytest.approx(88.5)
    assert len(rescued.trials) == 7 and rescued.trials[-1]["rescue"] and rescued.trials[-1]["within_budget"]


def test_suite_fingerprints_follow_what_each_result_depends_on():
    from pathlib import Path

    from mtprune.bench import merge_suites as ms
    from mtprune.merging.experiment import load_merge_config

    path = Path(__file__).resolve().parents[1] / "configs" / ms.PRESENCE_CONFIG
    plain, refined = (load_merge_config(path, [f"prune.refine={k}"]) for k in (0, 2))
    assert "refine" not in ms._dump(plain) and "refine: 2" in ms._dump(refined)  # old entries keep their key
    assert ms._base_fingerprint(plain) == ms._base_fingerprint(refined)  # networks, naive merging, MFIS's key
    assert ms._no_merge_fingerprint(plain) != ms._no_merge_fingerprint(refined)  # no merging walks it too
    assert ms._fingerprint(ms._dump(plain)) != ms._fingerprint(ms._dump(refined))
    walked = load_merge_config(path, ["prune.refine=2", "prune.per_task=true", "prune.shared_walk=true"])
    assert "shared_walk" not in ms._dump(refined) and "shared_walk: true" in ms._dump(walked)
    assert ms._base_fingerprint(walked) == ms._base_fingerprint(refined)  # the trunk's walk is PAM's alone
    assert ms._no_merge_fingerprint(walked) == ms._no_merge_fingerprint(refined)


@pytest.mark.parametrize("met", [True, False])
def test_mfis_entry_within_budget_stands_when_only_the_rescue_is_new(met, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from mtprune.bench import merge_suites as ms
    from mtprune.bench.common import Entries

    cfg = ms._presence_config(0, "cpu", 1)
    pam = {"fingerprint": "pam", "base_fingerprint": "networks"}
    probe = ms._mfis_config(cfg, ms.PRESENCE, "cpu", 1, Path("singles"))  # as the suite keys it
    assert probe.merge.budget.rescue_epochs > 0
    old = ms._fingerprint(ms._dump(ms._without_rescue(probe)), "networks")
    entries = Entries(tmp_path, resume=True)
    stored = {"fingerprint": old, "summary": {"budget": {"within_budget": met}}, "settings": {"select": "budget"}}
    entries.path(ms.PRESENCE + "_s0").parent.mkdir(parents=True)
    entries.path(ms.PRESENCE + "_s0").write_text(json.dumps(stored))

    def rerun(*args, **kwargs):
        raise RuntimeError("rerun")

    monkeypatch.setattr(ms, "prepare_singles", rerun)
    if not met:  # the rescue might have changed this run: it is done again
        with pytest.raises(RuntimeError, match="rerun"):
            ms._mfis_entry(entries, ms.PRESENCE + "_s0", ms.PRESENCE, "lenet", cfg, pam, "cpu", 1, tmp_path, tmp_path)
        return
    entry = ms._mfis_entry(entries, ms.PRESENCE + "_s0", ms.PRESENCE, "lenet", cfg, pam, "cpu", 1, tmp_path, tmp_path)
    assert entry["fingerprint"] != old and entry["rescue_not_needed"] == old
    assert entry["settings"]["budget"]["rescue_epochs"] == probe.merge.budget.rescue_epochs
    assert json.loads(entries.path(ms.PRESENCE + "_s0").read_text())["fingerprint"] == entry["fingerprint"]


@pytest.mark.parametrize("how", ["branch", "joint"])
def test_per_task_steps_fine_tune_the_branch_or_the_whole_network(how, monkeypatch):
    net, x = _pam_net()
    x1 = x[:1]
    dense = {t: exclusive_macs(net, t, x1) for t in net.task_names}
    r, _ = _runner(monkeypatch, 0, lambda model, tasks: dict.fromkeys(tasks, 95.0), x1)
    r.cfg.prune.per_task_finetune = how
    calls: list[tuple[set[str], set[str]]] = []
    monkeypatch.setattr(r, "fit", lambda model, tasks, section, where: calls.append(
        (set(tasks), {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and "." in n})))
    tasks = dict.fromkeys(net.task_names)
    r.prune_per_task(net, tasks, {t: 95.0 for t in tasks}, dense, "per_task")
    assert calls
    if how == "branch":  # one task's loss, one branch trainable
        assert all(len(t) == 1 and trainable == t for t, trainable in calls)
    else:  # every loss, every part trainable (the shared trunk too), as a joint rung
        assert all(t == set(tasks) and {"a", "b", "c"} <= trainable for t, trainable in calls)
