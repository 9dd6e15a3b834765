"""MFIS (reconstruction of Cheng et al., Cognitive Computation 2021): encoding, operators, objectives by hand,
the built network against its index matrix, alignment, solver determinism and knee selection."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("pymoo")

from mtprune.measure import profile  # noqa: E402
from mtprune.merging.chain import read_chain  # noqa: E402
from mtprune.merging.mfis import (  # noqa: E402
    Landscape,
    LayerStats,
    Layout,
    ParetoFront,
    build_mfis,
    decode,
    encode,
    evaluate,
    fidelity_table,
    from_keep_sets,
    keep_counts,
    knee_point,
    load_mfis_config,
    merge_cost_table,
    mfis,
    run_from_config,
    select_solution,
    settle,
    solve,
    subset_macs,
    to_keep_sets,
)
from mtprune.merging.mfis.encoding import validity_problems  # noqa: E402
from mtprune.merging.mfis.operators import BlockCrossover, BlockMutation, KeepSetSampling  # noqa: E402
from mtprune.merging.mfis.run import merge_method, print_summary  # noqa: E402
from mtprune.merging.mfis.stats import activation_alignment, build_landscape, permute_chain  # noqa: E402
from mtprune.utils.errors import MTPruneInputError  # noqa: E402


def tiny_net(seed: int, out: int = 2) -> nn.Sequential:
    """conv(3→4, 3x3) - ReLU - pool - flatten - fc(36→5) - ReLU - fc(5→out), for 8×8 inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5), nn.ReLU(),
                        nn.Linear(5, out))
    with torch.no_grad():  # positive biases: no unit is dead on the test batch
        net[0].bias.uniform_(0.2, 0.5)
        net[4].bias.uniform_(0.5, 1.0)
    return net.eval()


def tiny_batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def random_landscape(rng: np.random.Generator, tasks=("a", "b", "c"), widths=(4, 6, 5)) -> Landscape:
    T = len(tasks)
    layers = []
    for k, w in enumerate(widths):
        mass = None if k == 0 else rng.random((T, w, widths[k - 1]))
        filters = rng.normal(size=(T, w, 7))
        layers.append(LayerStats(f"l{k}", w, int(rng.integers(1, 20)), rng.random((T, w)),
                                 merge_cost_table(filters), mass, 3 if k == 0 else 0, fidelity_table(filters)))
    return Landscape(tasks, layers, rng.integers(1, 5, T), 2)


def test_encoding_round_trip():
    rng = np.random.default_rng(0)
    layout = Layout(("a", "b", "c"), (3, 5, 2), ("c1", "c2", "fc"))
    for _ in range(20):
        mats = [rng.random((w, 3)) < 0.5 for w in layout.widths]
        x = encode(mats, layout)
        assert x.shape == (layout.n_var,) == (3 * 10,)
        back = decode(x, layout)
        assert all(np.array_equal(m, b) for m, b in zip(mats, back, strict=True))
        for k in range(layout.depth):  # each block is one task's keep set at one layer
            for t in range(3):
                assert np.array_equal(x[layout.block(k, t)], mats[k][:, t])
        keep = to_keep_sets(mats, layout)
        assert keep["b"][1] == np.flatnonzero(mats[1][:, 1]).tolist()
        assert all(np.array_equal(m, b) for m, b in zip(mats, from_keep_sets(keep, layout), strict=True))
    with pytest.raises(MTPruneInputError):
        decode(np.zeros(layout.n_var + 1, dtype=bool), layout)
    assert keep_counts(layout, 0.5) == [2, 2, 1]
    assert keep_counts(layout, [0.0, 0.8, 0.9]) == [3, 1, 1]


@pytest.mark.parametrize("rate", [None, 0.5])
def test_operators_keep_validity(rate):
    rng = np.random.default_rng(123)
    for trial in range(10):
        T = int(rng.integers(2, 5))
        widths = tuple(int(w) for w in rng.integers(1, 10, size=int(rng.integers(1, 5))))
        layout = Layout(tuple(f"t{i}" for i in range(T)), widths)
        counts = keep_counts(layout, rate)
        imp = [rng.random((T, w)) for w in widths]
        X = KeepSetSampling(layout, counts, imp)._do(None, 24, random_state=np.random.default_rng(trial))
        assert X.dtype == bool and X.shape == (24, layout.n_var)
        cross, mut = BlockCrossover(layout), BlockMutation(layout, counts, flips_per_block=2.0)
        for _ in range(6):
            assert not [p for x in X for p in validity_problems(x, layout, counts)]
            parents = X[rng.integers(0, len(X), size=(2, 12))]
            Q = cross._do(None, parents, random_state=rng).reshape(-1, layout.n_var)
            X = mut._do(None, Q, random_state=rng)
        assert not [p for x in X for p in validity_problems(x, layout, counts)]
    # the check itself catches an empty keep set and a wrong count
    layout = Layout(("a", "b"), (3,))
    assert validity_problems(np.array([1, 0, 0, 0, 0, 0], bool), layout)
    assert validity_problems(np.array([1, 1, 0, 1, 0, 0], bool), layout, counts=[2])


def test_objectives_by_hand():
    """2 tasks, 2 layers of 2 slots; every number below is worked out by hand in the comments."""
    fid0 = np.zeros((2, 2, 4))
    fid0[0, :, 1] = fid0[1, :, 2] = 1.0  # a slot of one's own is one's own filter
    fid0[0, 0, 3], fid0[1, 0, 3] = 0.8, 0.6  # slot 0 shared: a finds cos 0.8 of its filter in it, b 0.6
    l0 = LayerStats("l0", 2, link_macs=10, importance=np.array([[3.0, 1.0], [1.0, 1.0]]),
                    merge_cost=np.array([[0, 0, 0, 0.2], [0, 0, 0, 0.6]]), fan_in=3, fidelity=fid0)
    l1 = LayerStats("l1", 2, link_macs=5, importance=np.array([[1.0, 3.0], [2.0, 2.0]]),
                    merge_cost=np.array([[0, 0, 0, 0.4], [0, 0, 0, 0.8]]),
                    mass=np.array([[[1.0, 3.0], [1.0, 1.0]], [[2.0, 5.0], [1.0, 1.0]]]))  # fidelity None: φ = 1
    land = Landscape(("a", "b"), [l0, l1], head_widths=np.array([4, 3]), head_link_macs=1)
    # one network: 2·3·10 + 2·2·5 = 80 MACs; heads 4·2 and 3·2 → no merging = 160 + 14 = 174
    assert land.reference_macs == 174
    # slot 0 shared by a and b, slot 1 used by a only, at both layers
    mats = [np.array([[1, 1], [1, 0]], bool), np.array([[1, 1], [1, 0]], bool)]
    ev = evaluate(mats, land)
    # task a, layer 0: importance 0.75, 0.25 → kept 0.75·0.8 + 0.25·1 = 0.85. Layer 1 (slot 0 {a,b} reads only
    # slot 0 of layer 0, slot 1 {a} reads both): κ = 1/(1+3) = 0.25 and 1 → kept 0.25·0.25 + 0.75·1 = 0.8125.
    # loss = 1 − sqrt(0.85 · 0.8125).
    # task b: layer 0 keeps slot 0: 0.5·0.6 = 0.3; layer 1 slot 0: 0.5 with κ = 2/2 = 1 → loss 1 − sqrt(0.15).
    # MACs: layer 0: 2 slots · 3 · 10 = 60; layer 1: fan-ins 1 + 2 → 3 · 5 = 15; heads: a 4·2, b 3·1 → 86.
    # dissimilarity: (0.2/2 + 0.4/2) / 2 = 0.15.
    np.testing.assert_allclose(ev.objectives, [1 - np.sqrt(0.85 * 0.8125), 1 - np.sqrt(0.15), 86 / 174, 0.15])
    assert ev.violation == 0 and ev.macs == 86
    assert subset_macs(ev.settled, land, 0b01) == 60 + 15 + 8  # a alone: everything but b's head
    assert subset_macs(ev.settled, land, 0b10) == 30 + 5 + 3  # b alone: the shared slots and b's head
    # merge cost: unit-normalised filters, Σ_t ||ŵ_t − mean||²; [1,0] and [0,5] → 2·(0.25 + 0.25) = 1
    table = merge_cost_table(np.array([[[1.0, 0.0]], [[0.0, 5.0]]]))
    np.testing.assert_allclose(table, [[0.0, 0.0, 0.0, 1.0]])
    # fidelity: cos([1, 0], [0.5, 0.5]) = 1/√2 for both; a slot of one's own: 1; a slot one does not use: 0
    fid = fidelity_table(np.array([[[1.0, 0.0]], [[0.0, 5.0]]]))
    np.testing.assert_allclose(fid[:, 0, :], [[0, 1, 0, 2 ** -0.5], [0, 0, 1, 2 ** -0.5]])
    # a slot whose task set no slot of the layer before contains is dropped; a task without slots is infeasible
    # (layer 1 slot 0 {a,b} has nothing to read; then b's slot at layer 0 has no reader)
    starved = [np.array([[1, 0], [0, 1]], bool), np.array([[1, 1], [1, 0]], bool)]
    s = settle(starved)
    assert s.dropped == [1, 1] and s.starved == [(0, 1), (1, 1)]
    assert evaluate(starved, land).violation == 2


def _tiny_chains(tasks=("a", "b")) -> tuple[dict, torch.Tensor]:
    x = tiny_batch()
    return {t: read_chain(t, tiny_net(i), x) for i, t in enumerate(tasks)}, x


def test_built_network_matches_index_matrix():
    chains, x = _tiny_chains()
    wa, wb = chains["a"].stages[0].layer.weight.detach(), chains["b"].stages[0].layer.weight.detach()
    fa = chains["a"].stages[1].layer.weight.detach()
    m0 = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], bool)  # slot 0 shared, 1: a, 2: b, 3: pruned
    m1 = np.array([[1, 1], [1, 0], [0, 1], [1, 0], [0, 0]], bool)
    net = build_mfis(chains, [m0, m1])
    assert all(np.array_equal(a, b) for a, b in zip(net.index_matrices(), [m0, m1], strict=True))
    shared = net.shared["l0_a+b"].layer
    assert shared.weight.shape == (1, 3, 3, 3)
    torch.testing.assert_close(shared.weight[0], (wa[0] + wb[0]) / 2)  # one row, the mean of the merged filters
    assert net.heads["a"].stages["l0_a"].layer.weight.shape == (1, 3, 3, 3)
    assert net.shared["l1_a+b"].layer.weight.shape == (1, 9)  # reads only the shared conv slot (1 channel · 3·3)
    l1a = net.heads["a"].stages["l1_a"].layer.weight
    assert l1a.shape == (2, 18)  # slots 1 and 3 of a; reads the conv groups {a} (slot 1) and {a,b} (slot 0)
    group = next(g for g in net.groups() if g.key == "l1_a")
    assert group.slots == (1, 3) and group.inputs == ("l0_a", "l0_a+b") and group.owner == "a"
    torch.testing.assert_close(l1a, torch.cat([fa[[1, 3]][:, 9:18], fa[[1, 3]][:, 0:9]], dim=1))
    assert net.heads["a"].out.layer.weight.shape == (2, 3) and net.heads["b"].out.layer.weight.shape == (2, 2)

    out = net(x)
    assert set(out) == {"a", "b"}
    torch.testing.assert_close(net(x, tasks=["a"])["a"], out["a"])
    assert list(net(x, tasks="b")) == ["b"]
    # the shared row is used by both tasks
    for t in ("a", "b"):
        (g,) = torch.autograd.grad(net(x)[t].sum(), shared.weight)
        assert g.abs().sum() > 0
    # a task ignores the slots it does not use: changing b's exclusive filters leaves a's output unchanged
    with torch.no_grad():
        net.heads["b"].stages["l0_b"].layer.weight.add_(1.0)
        net.heads["b"].stages["l1_b"].layer.weight.add_(1.0)
    after = net(x)
    torch.testing.assert_close(after["a"], out["a"])
    assert not torch.allclose(after["b"], out["b"])
    # the objectives' cost model is what mtprune.profile measures, for every task subset
    imp = {t: [np.ones(4), np.ones(5)] for t in chains}
    land = build_landscape(chains, imp, x)
    settled = settle([m0, m1])
    prof = profile(net, x[:1], latency=False)
    for key, macs in prof.macs_per_subset.items():
        mask = sum(1 << ("a", "b").index(t) for t in key.split("+"))
        assert macs == subset_macs(settled, land, mask)
    assert prof.macs == evaluate([m0, m1], land).macs


def test_alignment_recovers_a_permutation():
    x = tiny_batch(64)
    a = tiny_net(0)
    b = copy.deepcopy(a)
    chain_b = read_chain("b", b, x)
    rng = np.random.default_rng(1)
    shuffle = [rng.permutation(4), rng.permutation(5)]
    before = b(x)
    permute_chain(chain_b, shuffle)
    torch.testing.assert_close(b(x), before)  # a permutation changes no function
    chains = {"a": read_chain("a", a, x), "b": chain_b}
    perms, quality = activation_alignment(chains, x)
    permute_chain(chains["b"], perms["b"])
    for sa, sb in zip(chains["a"].stages, chains["b"].stages, strict=True):
        torch.testing.assert_close(sa.layer.weight, sb.layer.weight)
    assert min(quality) > 0.999
    # with aligned identical networks, sharing every slot reproduces them exactly
    net = build_mfis(chains, [np.ones((4, 2), bool), np.ones((5, 2), bool)])
    out = net(x)
    torch.testing.assert_close(out["a"], a(x))
    torch.testing.assert_close(out["b"], a(x))


@pytest.mark.parametrize("counts", [None, [2, 3, 2]])
def test_solver_is_deterministic_with_a_seed(counts):
    land = random_landscape(np.random.default_rng(5))
    runs = [solve(land, pop_size=16, n_gen=6, seed=3, counts=counts) for _ in range(2)]
    assert np.array_equal(runs[0].X, runs[1].X) and np.array_equal(runs[0].F, runs[1].F)
    front = runs[0]
    assert front.F.shape[1] == 5 and len(front.F) >= 1
    layout = land.layout()
    for x, f in zip(front.X, front.F, strict=True):
        assert not validity_problems(x, layout, counts)
        ev = evaluate(decode(x, layout), land)
        assert ev.violation == 0
        np.testing.assert_allclose(ev.objectives, f)
    # non-dominated
    for i, fi in enumerate(front.F):
        assert not any(np.all(fj <= fi) and np.any(fj < fi) for j, fj in enumerate(front.F) if j != i)


def test_knee_on_a_constructed_front():
    assert knee_point(np.array([[0.0, 1.0], [0.1, 0.3], [0.5, 0.2], [1.0, 0.0]])) == 1
    # three objectives: points on the plane Σf = 1 and one bulging towards the ideal point
    F = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.4, 0.3, 0.3], [0.2, 0.2, 0.3], [0.3, 0.5, 0.2]])
    assert knee_point(F) == 4
    # selection by bounds on [loss_a, loss_b, macs, dissimilarity]: the knee of the points within them
    front = ParetoFront(np.zeros((4, 3), bool), np.array([[0.0, 0.1, 0.9, 0.5], [0.1, 0.1, 0.5, 0.3],
                                                          [0.3, 0.2, 0.3, 0.2], [0.9, 0.8, 0.1, 0.0]]),
                        ["loss[a]", "loss[b]", "macs", "dissimilarity"])
    assert select_solution(front, {"max_macs": 0.35}) in (2, 3)
    assert select_solution(front, {"max_macs": 0.35, "max_loss": 0.5}) == 2
    with pytest.raises(MTPruneInputError):
        select_solution(front, {"max_macs": 0.05})
    with pytest.raises(MTPruneInputError):
        select_solution(front, {"min_macs": 0.5})


def test_mfis_end_to_end_on_tiny_networks():
    x = tiny_batch(32)
    y = {"a": torch.randint(0, 2, (32,)), "b": torch.randint(0, 2, (32,)), "c": torch.randint(0, 2, (32,))}
    models = {t: tiny_net(i) for i, t in enumerate(("a", "b", "c"))}
    before = {t: copy.deepcopy(m.state_dict()) for t, m in models.items()}
    net, report = mfis(models, (x, y), pop_size=16, n_gen=4, seed=0)
    for t, m in models.items():  # the caller's networks are untouched
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before[t].items())
    out = net(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (32, 2) for t in ("a", "b", "c")}
    assert set(report.objectives) == {"loss[a]", "loss[b]", "loss[c]", "macs", "dissimilarity"}
    for row in report.sharing:
        assert row["pruned"] + sum(row["shared_by"].values()) == row["width"]
    assert profile(net, x[:1], latency=False).macs_per_subset == report.subset_macs
    assert "| subset |" in report.markdown()


def test_config_and_pipeline(tmp_path):
    cfg = load_mfis_config("configs/merge_mfis_multidigits.yaml")
    assert cfg.merge.method == "mfis" and len(cfg.tasks) == 3
    assert merge_method("configs/merge_mfis_multidigits.yaml") == "mfis"
    assert merge_method("configs/merge_mfis_multidigits.yaml", ["merge.method=pam"]) == "pam"
    with pytest.raises(MTPruneInputError, match="merge.pop_sizee"):
        load_mfis_config("configs/merge_mfis_multidigits.yaml", ["merge.pop_sizee=3"])
    raw = {"name": "tiny", "device": "cpu", "tasks": ["left", "right"],
           "data": {"name": "multidigits", "augment": False, "kwargs": {"n_train": 64, "n_val": 32}},
           "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64},
           "merge": {"pop_size": 8, "generations": 2, "batch": 32, "finetune": {"epochs": 1, "batch_size": 32}},
           "cost": {"latency": False}}
    summary = run_from_config(raw, tmp_path, quiet=True)
    assert set(summary["acc_after_finetune"]) == {"left", "right"}
    print_summary(summary)
    for name in ("report.md", "summary.json", "mfis.mtp", "plots/pareto_pairs.png", "plots/pareto_parallel.png",
                 "plots/cost_per_subset.png", "singles/left.mtp"):
        assert (tmp_path / name).is_file(), name
    # the saved network rebuilds from its file alone: same cost per subset, same accuracy
    from mtprune import data as D
    from mtprune.engine.evaluate import evaluate as evaluate_model
    from mtprune.merging.experiment import tasks_of
    from mtprune.merging.mfis import load_mfis

    loaded = load_mfis(tmp_path / "mfis.mtp")
    val = D.load("multidigits", split="val", tasks=["left", "right"], n_train=64, n_val=32)
    assert profile(loaded, val[0][0][None], latency=False).macs_per_subset == {
        r["subset"]: r["mfis_macs"] for r in summary["table"]}
    acc = evaluate_model(loaded, val, tasks_of(val, ["left", "right"]), device=torch.device("cpu"))
    assert {t: acc[t]["acc"] for t in ("left", "right")} == pytest.approx(summary["acc_after_finetune"])
    # the same single-task networks, loaded instead of trained, give the same search
    raw = {**raw, "train": {"epochs": 0}, "merge": {**raw["merge"], "singles": str(tmp_path / "singles")}}
    again = run_from_config(raw, tmp_path / "again", quiet=True)
    assert again["reference_acc"] == summary["reference_acc"]
    assert again["mfis"]["front"]["F"] == summary["mfis"]["front"]["F"]


def test_saved_mfis_network_loads_without_its_base_models(tmp_path):
    import json

    from safetensors import safe_open

    from mtprune.io import load as mtprune_load
    from mtprune.io import save
    from mtprune.merging.mfis import load_mfis

    x = tiny_batch(32)
    y = {"a": torch.randint(0, 2, (32,)), "b": torch.randint(0, 2, (32,))}
    models = {t: tiny_net(i) for i, t in enumerate(("a", "b"))}
    models["b"].insert(3, nn.BatchNorm2d(4))  # a per-channel op with parameters and buffers
    with torch.no_grad():
        models["b"][3].running_mean.uniform_(-0.1, 0.1)
    models["a"].insert(3, nn.BatchNorm2d(4))
    net, _ = mfis(models, (x, y), pop_size=8, n_gen=3, seed=1)
    net.eval()
    path = save(net, tmp_path / "mfis.mtp", example_inputs=x[:1], extra={"mfis": net.structure()})
    again = load_mfis(path)
    assert type(again) is type(net) and not again.training
    generic = mtprune_load(path)  # mtprune.io.load knows an MFIS file by its metadata: no base needed
    assert type(generic) is type(net)
    assert all(torch.equal(generic(x)[t], net(x)[t]) for t in ("a", "b"))
    assert [[g.key for g in gs] for gs in again.plan] == [[g.key for g in gs] for gs in net.plan]
    for subset in (None, ["a"], ["b"]):
        want, got = net(x, tasks=subset), again(x, tasks=subset)
        assert set(got) == set(want) and all(torch.equal(got[t], want[t]) for t in want)
    assert profile(again, x[:1], latency=False).macs_per_subset == profile(net, x[:1], latency=False).macs_per_subset
    # the metadata is plain JSON: a module outside the allowed table is refused, not imported
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["mtprune"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    key = next(iter(meta["extra"]["mfis"]["modules"]))
    meta["extra"]["mfis"]["modules"][key]["post"][0] = {"type": "os.system", "command": "true"}
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bad.mtp"), metadata={"mtprune": json.dumps(meta)})
    with pytest.raises(MTPruneInputError, match="unsupported module 'os.system'"):
        load_mfis(tmp_path / "bad.mtp")
    plain = save(models["a"], tmp_path / "plain.mtp", example_inputs=x[:1])
    with pytest.raises(MTPruneInputError, match="not an MFIS network"):
        load_mfis(plain)
