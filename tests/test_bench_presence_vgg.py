"""The ``presence_vgg`` entry of ``mtprune bench pam`` / ``mfis`` (issue 16): PAM (He et al., KDD 2021) and MFIS
(Cheng et al. 2021) on the CelebA-like VGG-16 testbed (object presence in synthetic_scenes), through the same
mechanism as ``presence_lenet``, at the small scale."""

from __future__ import annotations

import json

import pytest
import torch

from mtprune.bench import merge_suites as M
from mtprune.models import build_model

pytest.importorskip("pymoo")
pytestmark = pytest.mark.filterwarnings("ignore:target_macs")

KEYS = ("within_budget", "seeds", "exclusive_neurons", "no_merge_over_pam_all_tasks",
        "no_merge_over_pam_single_task_min")


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """The ``mfis`` suite on presence_vgg alone (one seed), which runs its ``pam`` entry first; then the ``pam``
    suite with --resume on the same folder, which reuses that entry and writes the pam summary."""
    root = tmp_path_factory.mktemp("presence_vgg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTPRUNE_CACHE", str(root / "cache"))
        mfis = M.run_mfis(scale="small", out=root / "mfis", threads=1, models=[], presence=[M.PRESENCE_VGG],
                          seeds=[0])
        pam = M.run_pam(scale="small", out=root / "mfis" / "pam", threads=1, resume=True, models=[],
                        presence=[M.PRESENCE_VGG], seeds=[0])
    return root / "mfis", mfis, pam


def test_pam_summary_entry_is_computed_from_the_run(suites):
    out, _, result = suites
    summary = json.loads((out / "pam" / "summary.json").read_text())
    assert list(summary["entries"]) == [M.PRESENCE_VGG]  # presence_lenet was not asked for
    e = summary["entries"][M.PRESENCE_VGG]
    entry = json.loads((out / "pam" / "entries" / "presence_vgg_s0.json").read_text())
    assert entry["model"] == "vgg" and entry["seed"] == 0 and entry["tasks"] == ["objects_a", "objects_b"]
    assert entry["settings"]["model"]["name"] == "vgg16_cls" and entry["settings"]["per_task"]
    run = entry["summary"]
    table = {r["subset"]: r for r in run["table"]}
    assert list(table) == ["objects_a", "objects_b", "objects_a+objects_b"]
    assert e["seeds"] == [0]
    assert e["no_merge_over_pam_all_tasks"] == pytest.approx(
        table["objects_a+objects_b"]["no_merge_macs"] / table["objects_a+objects_b"]["pam_macs"])
    assert e["no_merge_over_pam_single_task_min"] == pytest.approx(
        min(table[t]["no_merge_macs"] / table[t]["pam_macs"] for t in ("objects_a", "objects_b")))
    b = run["budgets"]
    assert e["within_budget"] == (b["pam"]["budget_met"] and all(v["budget_met"] for v in b["no_merge"].values()))
    layers = run["pam"]["partitions"]["layers"]
    assert e["exclusive_neurons"] == sum(sum(layer["exclusive"].values()) for layer in layers)
    assert {layer["name"] for layer in layers} >= {f"backbone.{n}" for n in ("conv1_1", "conv5_3", "fc6", "fc7")}
    again = M.presence_digest({"s0": {**M._pam_digest(entry), "seed": 0}})
    assert {k: e[k] for k in (*KEYS, "targets_met")} == {k: again[k] for k in (*KEYS, "targets_met")}
    assert result[M.PRESENCE_VGG] == {k: v for k, v in e.items() if k != "runs"}
    report = (out / "pam" / "report.md").read_text()
    assert "## presence_vgg: object presence in synthetic scenes" in report
    assert "## presence_vgg s0: vgg16_cls" in report


def test_mfis_summary_entry_on_the_same_networks(suites):
    out, result, _ = suites
    e = json.loads((out / "summary.json").read_text())["entries"][M.PRESENCE_VGG]
    pam = json.loads((out / "pam" / "summary.json").read_text())["entries"][M.PRESENCE_VGG]
    assert {k: e[k] for k in KEYS if k != "within_budget"} == {k: pam[k] for k in KEYS if k != "within_budget"}
    assert e["pam_within_budget"] == pam["within_budget"]
    run = e["runs"]["s0"]
    assert run["model"] == "vgg" and run["same_networks"] and run["budget"]["trials"]
    assert e["within_budget"] == run["mfis_within_budget"]
    assert e["no_merge_over_mfis_all_tasks"] == pytest.approx(run["table"][2]["no_merge_over_mfis"])
    assert result[M.PRESENCE_VGG]["no_merge_over_mfis_all_tasks"] == e["no_merge_over_mfis_all_tasks"]
    mfis = json.loads((out / "entries" / "presence_vgg_s0.json").read_text())
    assert mfis["settings"]["select"] == "budget" and all(v["reused"] for v in mfis["singles"].values())
    assert "## presence_vgg: MFIS on the presence testbed (object presence" in (out / "report.md").read_text()


def test_testbeds_share_one_mechanism():
    assert M._testbeds(True) == [M.PRESENCE, M.PRESENCE_VGG] and M._testbeds(False) == []
    assert M._testbeds(M.PRESENCE_VGG) == [M.PRESENCE_VGG]
    with pytest.raises(ValueError, match="presence_resnet"):
        M._testbeds(["presence_resnet"])
    lenet, vgg = (M._presence_config(1, "cpu", 1, t) for t in (M.PRESENCE, M.PRESENCE_VGG))
    assert (lenet.name, vgg.name) == ("pam_presence_lenet_s1", "pam_presence_vgg_s1") and lenet.seed == vgg.seed == 1
    assert (lenet.data.name, vgg.data.name) == ("presence", "scene_presence")
    assert vgg.model.name == "vgg16_cls" and vgg.merge.relevance is not None
    assert vgg.prune.per_task == lenet.prune.per_task and vgg.prune.per_task_finetune == lenet.prune.per_task_finetune
    assert M._presence_config(1, "small", 1, M.PRESENCE_VGG).merge.relevance is None  # small: keep every neuron
    assert set(M.MFIS_SETTINGS["cpu"]) >= set(M.PRESENCE_TESTBEDS) <= set(M.MFIS_SETTINGS["small"])


def test_vgg16_cls_takes_a_batch_norm_after_every_conv():
    plain = build_model("vgg16_cls", {"t": 5}, width=0.125, fc_hidden=1024)
    bn = build_model("vgg16_cls", {"t": 5}, width=0.125, fc_hidden=1024, batch_norm=True)
    assert not [m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    names = [n.split(".")[-1] for n, m in bn.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(names) == 13 and names[0] == "bn1_1" and names[-1] == "bn5_3"
    x = torch.rand(2, 3, 32, 40)
    assert bn.eval()(x)["t"].shape == plain(x)["t"].shape == (2, 5)
