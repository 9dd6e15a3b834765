"""The merge benchmark suites (``mtprune bench pam`` / ``mfis``), the shared single-task networks, and the data
that PAM (He et al., KDD 2021) and MFIS (Cheng et al. 2021) merge on: synthetic_scenes attribute tasks and CelebA
with PAM's attribute split, through the merge config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtprune import data as D
from mtprune.bench import merge_suites as M
from mtprune.data.synthetic_scenes import scene_attributes
from mtprune.merging.experiment import load_merge_config, render_report, run_merge, tasks_of
from mtprune.tasks import ClassificationTask, MultiLabelTask
from mtprune.utils.errors import MTPruneInputError

pytest.importorskip("pymoo")
pytestmark = pytest.mark.filterwarnings("ignore:target_macs")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_MERGE = ["train.epochs=1", "train.batch_size=8", "train.eval_batch_size=64", "merge.alpha_conv=-1",
              "merge.alpha_linear=-1", "merge.batch=16", "merge.retrain.epochs=1", "merge.retrain.batch_size=8",
              "prune.ladder=[0.5]", "prune.accuracy_drop=100", "prune.stats_batches=1", "prune.stats_batch_size=8",
              "prune.finetune.epochs=1", "prune.finetune.batch_size=8", "cost.latency=false", "device=cpu"]


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """One small ``mfis`` suite run (LeNet-5, 2 tasks, and the presence testbed with one seed), which runs the
    matching ``pam`` entries first."""
    out = tmp_path_factory.mktemp("bench") / "mfis"
    result = M.run_mfis(scale="small", out=out, threads=1, models=["lenet"], task_sets=["2tasks"], seeds=[0],
                        presence=[M.PRESENCE])
    return out, result


def test_pam_entry_reports_every_subset_and_keeps_no_weights(suites):
    out, _ = suites
    pam = out / "pam"
    summary = json.loads((pam / "lenet_2tasks" / "summary.json").read_text())
    assert [r["subset"] for r in summary["table"]] == ["left", "right", "left+right"]
    for row in summary["table"]:
        assert row["no_merge_over_pam"] == pytest.approx(row["no_merge_macs"] / row["pam_macs"])
    assert set(summary["budgets"]) == {"no_merge", "naive", "pam"}
    assert (pam / "lenet_2tasks" / "report.md").is_file() and (pam / "lenet_2tasks" / "plots").is_dir()
    assert not list((pam / "lenet_2tasks").rglob("*.mtp")) and not list((pam / "lenet_2tasks").rglob("*.pt"))
    assert len(list((pam / "runs" / "singles").glob("left-*.mtp"))) == 1  # the shared store keeps the networks


def test_mfis_entry_compares_on_the_same_networks(suites):
    out, result = suites
    summary = json.loads((out / "summary.json").read_text())
    e = summary["entries"]["lenet_2tasks"]
    assert e["same_networks"] and e["solver_seconds"] > 0
    assert set(e["accuracy"]) == {"single-task", "no merging (pruned)", "PAM (pruned)", "MFIS (merged)",
                                  "MFIS (fine-tuned)"}
    pam = json.loads((out / "pam" / "entries" / "lenet_2tasks.json").read_text())
    mfis = json.loads((out / "entries" / "lenet_2tasks.json").read_text())
    assert {t: v["key"] for t, v in mfis["singles"].items()} == {t: v["key"] for t, v in pam["singles"].items()}
    assert all(v["reused"] for v in mfis["singles"].values())  # trained once, by the pam entry
    for row in e["table"]:
        assert row["no_merge_over_mfis"] == pytest.approx(row["no_merge_macs"] / row["mfis_macs"])
        assert row["no_merge_dense_macs"] >= row["no_merge_macs"]  # pruning no merging never adds MACs
    assert result["no_merge_over_mfis"]["lenet_2tasks"]["left+right"] == e["table"][2]["no_merge_dense_over_mfis"]
    for name in ("report.md", "mfis_vs_pam.png", "lenet_2tasks/report.md", "lenet_2tasks/plots/cost_per_subset.png"):
        assert (out / name).is_file(), name
    assert "Solver wall time" in (out / "report.md").read_text()


def test_pam_suite_resumes_and_reruns_changed_settings(suites, monkeypatch, tmp_path):
    import shutil

    out, _ = suites
    pam = shutil.copytree(out / "pam", tmp_path / "pam")  # the reruns below must not touch the shared run
    before = json.loads((pam / "entries" / "lenet_2tasks.json").read_text())

    def boom(*a, **k):
        raise RuntimeError("recomputed")

    monkeypatch.setattr(M, "run_merge", boom)
    again = M.run_pam(scale="small", out=pam, threads=1, resume=True, models=["lenet"], task_sets=["2tasks"], seeds=[0],
                      presence=[M.PRESENCE])
    assert again["no_merge_over_pam"]["lenet_2tasks"] == {r["subset"]: r["no_merge_over_pam"]
                                                          for r in before["summary"]["table"]}
    assert (pam / "report.md").is_file() and (pam / "pam_cost_per_subset.png").is_file()
    rows = json.loads((pam / "summary.json").read_text())["entries"]["lenet_2tasks"]["sensitivity"]
    assert [(r["noise_var"], r["alpha_conv"], r["alpha_linear"]) for r in rows] == M.SENSITIVITY
    assert "| noise variance |" in (pam / "report.md").read_text()
    presence = json.loads((pam / "summary.json").read_text())["entries"][M.PRESENCE]  # reused too, not recomputed
    assert presence["seeds"] == [0] and again[M.PRESENCE]["seeds"] == [0] and "per_seed" in presence
    with pytest.raises(RuntimeError, match="recomputed"):  # without --resume every entry reruns
        M.run_pam(scale="small", out=pam, threads=1, resume=False, models=["lenet"], task_sets=["2tasks"], seeds=[0],
                  presence=[M.PRESENCE])
    monkeypatch.setitem(M.SCALE_OVERRIDES, "small", [*M.SCALE_OVERRIDES["small"], "prune.accuracy_drop=3"])
    with pytest.raises(RuntimeError, match="recomputed"):  # other settings: the stored entry is not reused
        M.run_pam(scale="small", out=pam, threads=1, resume=True, models=["lenet"], task_sets=["2tasks"], seeds=[0],
                  presence=[M.PRESENCE])


def test_merge_reuses_given_single_task_networks(suites, tmp_path):
    out, _ = suites
    pam = json.loads((out / "pam" / "entries" / "lenet_2tasks.json").read_text())
    cfg = M._pam_config("lenet", "2tasks", "small", 1)
    from mtprune.merging.singles import prepare_singles

    info = prepare_singles(cfg, out / "pam" / "runs" / "singles", tmp_path / "singles")
    assert all(v["reused"] for v in info.values())
    cfg = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"singles": str(tmp_path / "singles")})})
    summary = run_merge(cfg, tmp_path / "run", quiet=True)
    assert summary["reference_acc"] == pam["summary"]["reference_acc"]
    assert not (tmp_path / "run" / "singles").exists()  # nothing was trained


def test_presence_entries_in_both_suites(suites):
    out, result = suites
    e = json.loads((out / "summary.json").read_text())["entries"][M.PRESENCE]
    assert e["seeds"] == [0] and set(e["runs"]) == {"s0"}
    run = e["runs"]["s0"]
    assert run["same_networks"] and run["budget"]["trials"]  # MFIS tried front points against the budget
    assert run["tasks"] == ["low", "high"] and [r["subset"] for r in run["table"]] == ["low", "high", "low+high"]
    assert e["no_merge_over_mfis_all_tasks"] == pytest.approx(run["table"][2]["no_merge_over_mfis"])
    assert result[M.PRESENCE]["no_merge_over_mfis_all_tasks"] == e["no_merge_over_mfis_all_tasks"]
    assert "presence_lenet" in (out / "report.md").read_text()
    mfis_run = json.loads((out / "entries" / "presence_lenet_s0.json").read_text())["summary"]
    deploy = mfis_run["mfis_deploy"]  # every subset as its own model costs what the table claims
    assert {k: v["macs"] for k, v in deploy.items()} == {r["subset"]: r["mfis_macs"] for r in mfis_run["table"]}
    pam_run = json.loads((out / "pam" / "entries" / "presence_lenet_s0.json").read_text())["summary"]
    assert {k: v["macs"] for k, v in pam_run["pam_deploy"].items()} == {r["subset"]: r["pam_macs"]
                                                                        for r in pam_run["table"]}
    # the pam digest states the verdict on issue 16's targets and the ladder PAM walked
    entry = json.loads((out / "pam" / "entries" / "presence_lenet_s0.json").read_text())
    digests = {"s0": {**M._pam_digest(entry), "seed": 0}}
    pam = M.presence_digest(digests)
    ladder = pam["per_seed"]["s0"]["pam_ladder"]
    assert [st["fraction"] for st in ladder] == [st["fraction"] for st in pam_run["budgets"]["pam"]["steps"]]
    assert pam["targets_met"] == (pam["within_budget"] and pam["no_merge_over_pam_all_tasks"] >= 1.16
                                  and pam["no_merge_over_pam_single_task_min"] >= 1.0)
    text = "\n".join(M._render_presence({**pam, "runs": digests}))
    assert "Issue 16's targets" in text and ("**met**" if pam["targets_met"] else "**not met**") in text
    # PAM's per-task continuation after the joint ladder, and the joint-only figures beside it
    b = pam_run["budgets"]["pam"]
    assert entry["settings"] and M.PRESENCE_PAM_LADDER == "per_task" and b["budget_met"]
    assert set(b["per_task"]) == {"low", "high"} and b["joint"]["fraction"] >= b["fraction"]
    assert b["per_task_finetune"] == M.PRESENCE_PER_TASK_FINETUNE == "joint"  # the report says how they trained
    assert "other branches protected, the whole network fine-tuned on every loss" in render_report(pam_run, "")
    joint = pam_run["pam_joint"]
    assert joint["no_merge_over_pam"]["low+high"] == pytest.approx(pam["joint_only"]["no_merge_over_pam_all_tasks"])
    assert "The joint ladder alone" in text and "per-task walks" in text


def _rerun_changed(suites, monkeypatch, tmp_path, change, spied: str):
    """A copy of the small suites' results rerun (MFIS over presence_lenet seed 0, which must not be recomputed)
    after ``change(monkeypatch)``; returns the copy, the PAM entry before and after, and the ``spied`` keyword of
    every ``run_merge`` call."""
    import shutil

    out, _ = suites
    copy = shutil.copytree(out, tmp_path / "mfis")
    entry = copy / "pam" / "entries" / "presence_lenet_s0.json"
    old, seen = json.loads(entry.read_text()), []

    def spy(*args, **kwargs):
        seen.append(kwargs.get(spied))
        return run_merge(*args, **kwargs)

    def boom(*a, **k):
        raise RuntimeError("MFIS recomputed")

    monkeypatch.setattr(M, "run_merge", spy)
    monkeypatch.setattr(M, "run_from_config", boom)
    change(monkeypatch)
    M.run_mfis(scale="small", out=copy, threads=1, resume=True, models=[], seeds=[0], presence=[M.PRESENCE])
    return copy, old, json.loads(entry.read_text()), seen


def test_new_pam_ladder_reruns_only_pam(suites, monkeypatch, tmp_path):
    """Changing how PAM is pruned (``prune.per_task``) reruns the PAM entry reusing its no merging and naive
    results (and their training logs), and keeps the MFIS entry of the same networks."""
    no_merge = suites[0] / "pam" / "presence_lenet_s0" / "prune" / "no_merge"
    logs = sorted(p.relative_to(suites[0]) for p in no_merge.rglob("*"))
    mfis, old, new, seen = _rerun_changed(suites, monkeypatch, tmp_path,
                                          lambda mp: mp.setattr(M, "PRESENCE_PAM_LADDER", "joint"), "reuse")
    assert len(seen) == 1 and seen[0] == old["summary"]  # recomputed once, from the old entry's no merging / naive
    assert new["fingerprint"] != old["fingerprint"] and new["base_fingerprint"] == old["base_fingerprint"]
    assert new["reused_from"] == old["fingerprint"] and new["summary"]["reused"] == ["no_merge", "naive"]
    for key in ("no_merge", "naive"):
        assert new["summary"]["budgets"][key] == old["summary"]["budgets"][key]
        column = f"{key}_macs"
        assert [r[column] for r in new["summary"]["table"]] == [r[column] for r in old["summary"]["table"]]
    assert "per_task" not in new["summary"]["budgets"]["pam"] and "pam_joint" not in new["summary"]  # joint only
    assert [r["subset"] for r in new["summary"]["table"]] == ["low", "high", "low+high"]
    assert logs == sorted(p.relative_to(mfis) for p in (mfis / "pam" / "presence_lenet_s0" / "prune" / "no_merge")
                          .rglob("*"))


def test_new_refine_reruns_no_merging_and_keeps_naive(suites, monkeypatch, tmp_path):
    """A changed ``prune.refine`` (which every walk takes) reruns PAM and no merging, reusing only naive merging's
    results, and keeps the MFIS entry of the same networks."""
    change = lambda mp: mp.setitem(M.PRESENCE_SCALE, "small", [*M.PRESENCE_SCALE["small"], "prune.refine=0"])  # noqa: E731
    _, old, new, seen = _rerun_changed(suites, monkeypatch, tmp_path, change, "reuse_only")
    assert seen == [["naive"]] and new["summary"]["reused"] == ["naive"]
    assert new["base_fingerprint"] == old["base_fingerprint"]
    assert new["no_merge_fingerprint"] != old["no_merge_fingerprint"] and new["naive_refine"] == old["naive_refine"]
    assert new["summary"]["budgets"]["naive"] == old["summary"]["budgets"]["naive"]
    assert all("refine" not in st for v in new["summary"]["budgets"]["no_merge"].values() for st in v["steps"])


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("testbed", sorted(M.PRESENCE_TESTBEDS))
def test_committed_presence_summaries_are_computed_from_their_entries(testbed):
    """benchmarks/results/{pam,mfis}/summary.json: each presence testbed's verdicts recomputed from the stored
    entries."""
    if not (RESULTS / "pam" / "entries" / f"{testbed}_s0.json").is_file():
        pytest.skip(f"the {testbed} benchmark has not been run here")
    pam = json.loads((RESULTS / "pam" / "summary.json").read_text())["entries"][testbed]
    runs = {f"s{s}": json.loads((RESULTS / "pam" / "entries" / f"{testbed}_s{s}.json").read_text())
            for s in pam["seeds"]}
    again = M.presence_digest({k: {**M._pam_digest(v), "seed": v["seed"]} for k, v in runs.items()})
    for key in ("within_budget", "seeds", "exclusive_neurons", "no_merge_over_pam_all_tasks",
                "no_merge_over_pam_single_task_min"):
        assert pam[key] == pytest.approx(again[key]), key
    mfis = json.loads((RESULTS / "mfis" / "summary.json").read_text())["entries"].get(testbed)
    if mfis is None:
        pytest.skip(f"the mfis {testbed} entries have not been run here")
    both = {k: {"pam": v, "mfis": json.loads((RESULTS / "mfis" / "entries" / f"{testbed}_{k}.json").read_text())}
            for k, v in runs.items()}
    again = M.mfis_presence_digest(both)
    for key in ("within_budget", "seeds", "exclusive_neurons", "no_merge_over_pam_all_tasks",
                "no_merge_over_pam_single_task_min", "no_merge_over_mfis_all_tasks"):
        assert mfis[key] == pytest.approx(again[key]), key


# ---------------------------------------------------------------- synthetic_scenes attribute tasks


def test_scene_attributes_by_hand():
    label = np.zeros((20, 20), dtype=np.int64)
    label[10:, :] = 1  # ground
    label[0:5, 0:10] = 2  # 50 px: visible, the largest
    label[6, 0:3] = 4  # 3 px < 1 % of 400: not visible
    label[12:14, 0:5] = 5  # 10 px: visible
    a = scene_attributes(label, 7)
    assert a["objects"].tolist() == [1, 0, 0, 1, 0] and int(a["count"]) == 2 and int(a["dominant"]) == 0
    none = scene_attributes(np.ones((20, 20)), 7)
    assert not none["objects"].any() and int(none["count"]) == 0 and int(none["dominant"]) == 5


def test_synthetic_attribute_tasks_are_read_and_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    kw = {"n_train": 16, "n_val": 8, "height": 32, "width": 40}
    ds = D.load("synthetic_scenes", tasks=["seg", "objects", "count", "dominant"], **kw)
    assert ds.kinds == {"seg": "seg", "objects": "multilabel", "count": "class", "dominant": "class"}
    seen = set()
    for i in range(len(ds)):
        _, y = ds[i]
        want = scene_attributes(y["seg"].numpy(), 7)
        assert torch.equal(y["objects"], torch.from_numpy(want["objects"])) and y["objects"].dtype == torch.float32
        assert int(y["count"]) == int(y["objects"].sum()) and int(y["dominant"]) == int(want["dominant"])
        seen.add(int(y["count"]))
    assert len(seen) > 1  # the attributes vary across scenes
    assert D.load("synthetic_scenes", **kw).tasks == ["seg", "depth", "normal", "edge"]  # default: dense tasks
    tasks = tasks_of(ds, ["objects", "count"])
    assert isinstance(tasks["objects"], MultiLabelTask) and tasks["objects"].out_channels == 5
    assert isinstance(tasks["count"], ClassificationTask) and tasks["count"].out_channels == 6
    cfg = load_merge_config(CONFIGS / "merge_pam_multidigits.yaml", [
        "data.name=synthetic_scenes", f"data.kwargs={json.dumps(kw)}", "tasks=[objects,count]",
        "model.width=0.5", "model.kwargs={input_size: [32, 40]}", *TINY_MERGE])
    summary = run_merge(cfg, tmp_path / "run", quiet=True)
    assert summary["tasks"] == ["objects", "count"] and len(summary["table"]) == 3


# ---------------------------------------------------------------- CelebA, PAM's split, through the merge config


def write_fake_celeba(root: Path, n_train: int = 12, n_val: int = 6) -> np.ndarray:
    """A small CelebA in the torchvision layout (random 20×24 JPEGs); returns the ±1 attribute table."""
    rng = np.random.default_rng(3)
    (root / "img_align_celeba").mkdir(parents=True)
    n = n_train + n_val + 2
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    attrs = rng.choice([-1, 1], size=(n, 40))
    for name in names:
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
    header = [str(n), " ".join(f"Attr_{j}" for j in range(40))]
    rows = [f"{f} " + " ".join(f"{v:2d}" for v in a) for f, a in zip(names, attrs, strict=True)]
    (root / "list_attr_celeba.txt").write_text("\n".join(header + rows) + "\n")
    parts = [0] * n_train + [1] * n_val + [2, 2]
    (root / "list_eval_partition.txt").write_text("\n".join(f"{f} {p}" for f, p in zip(names, parts, strict=True)))
    return attrs


def test_celeba_pam_split_through_the_merge_config(tmp_path):
    attrs = write_fake_celeba(tmp_path / "celeba")
    tiny = [f"data.root={tmp_path / 'celeba'}", "data.kwargs.size=32", "model.width=0.0625",
            "model.kwargs.fc_hidden=256", "prune.min_channels=1", *TINY_MERGE]
    cfg = load_merge_config(CONFIGS / "merge_pam_celeba.yaml", tiny)
    val = D.load("celeba", root=cfg.data.root, split="val", tasks=cfg.tasks, **cfg.data.kwargs)
    _, y = val[0]
    row = attrs[12] > 0  # the first validation image
    assert y["attr_a"].tolist() == row[:20].tolist() and y["attr_b"].tolist() == row[20:].tolist()
    summary = run_merge(cfg, tmp_path / "run", quiet=True)
    assert summary["tasks"] == ["attr_a", "attr_b"]
    assert [r["subset"] for r in summary["table"]] == ["attr_a", "attr_b", "attr_a+attr_b"]
    assert all(0 <= summary["reference_acc"][t] <= 100 for t in cfg.tasks)
    with pytest.raises(MTPruneInputError, match="root"):
        run_merge(load_merge_config(CONFIGS / "merge_pam_celeba.yaml", TINY_MERGE), tmp_path / "none", quiet=True)
