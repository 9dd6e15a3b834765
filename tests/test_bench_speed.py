"""The ``speed`` suite at ``--scale small``, the statistics engine's memory behaviour and its refusal of bad batches."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from helpers import nyu_batches, zoo_model
from mtprune.bench import run_suite
from mtprune.bench.speed import MEMORY_MODES, SCALES, SPARSITIES, can_reset_peak, ceiling, dense_efficiency_fidelity
from mtprune.bench.speed_compare import COMPARE, HW_VARIANTS
from mtprune.pruning.criteria import Criterion
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.stats import TASK_WEIGHT_GRADS, StatisticsEngine
from mtprune.tasks import preset
from mtprune.utils.errors import MTPruneInputError

TARGETS = (0.5, 0.25, 0.1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    result = run_suite("speed", scale="small", out=str(out), threads=1, resume=False)
    return out, result


def test_latency_has_every_model_and_target(small):
    out, _ = small
    result = json.loads((out / "speed_small.json").read_text())
    rows = result["latency"]
    assert {r["model"] for r in rows} == set(SCALES["small"].models)
    for model in SCALES["small"].models:
        mine = {r["target_macs"]: r for r in rows if r["model"] == model}
        assert sorted(mine) == sorted(TARGETS)
        for target, r in mine.items():
            assert abs(r["macs_ratio"] - target) <= 0.05 * target
            assert r["macs_reduction"] == pytest.approx(1 / r["macs_ratio"])
            assert r["latency_dense_ms"] > 0 and r["latency_pruned_ms"] > 0
            assert len(r["speedup_per_pair"]) == SCALES["small"].repeats


def test_side_by_side_and_prune_time(small):
    """Section 5 (dense, mtprune at equal MACs and at equal latency, Torch-Pruning) and 6 (time to prune)."""
    out, result = small
    cmp = COMPARE["small"]
    side = result["side_by_side"]
    assert {(r["model"], r["target"]) for r in side} == {(m, t) for m in cmp.models for t in cmp.targets}
    for r in side:
        assert r["dense"]["speedup"] == pytest.approx(1.0) and r["dense"]["macs_kept"] == 1.0
        lat = r["mtprune_latency"]
        # the small models are mostly per-call overhead: their latency floor may lie above the target
        refused = "refused" in lat
        for k in ("mtprune_macs", "torch_pruning", *(() if refused else ("mtprune_latency",))):
            v = r[k]
            assert v["latency_ms"] > 0 and v["fidelity"] == pytest.approx(v["speedup"] * v["macs_kept"])
        assert abs(r["mtprune_macs"]["macs_kept"] - r["target"]) <= 0.05 * r["target"]
        assert abs(r["torch_pruning"]["macs_kept"] - r["target"]) <= 0.1 * r["target"]  # its ratio, bisected
        if refused:
            assert "below this model's latency floor" in lat["refused"] and not lat["within_5pct"]
            continue
        assert lat["within_5pct"] == (abs(lat["latency_ratio"] - r["target"]) <= 0.05 * r["target"])
        assert 0 < lat["predicted_ratio"] < 1 and lat["table"]["batch"] == SCALES["small"].batch
        assert lat["floor"]["measured_ms"] > 0 and lat["feedback"]
        cands = lat["candidates"]  # the knapsack against the MACs ranking, each timed to the goal
        assert cands["chosen"] in ("latency", "macs") and cands["macs"]["feedback"]
        assert all(cands[k]["measured_ms"] > 0 for k in ("latency", "macs"))
    assert list((out / "latency_tables").glob("*.json"))  # the measured tables are kept with the results
    times = result["prune_time"]
    assert [t["model"] for t in times] == list(cmp.prune_models)
    for t in times:
        assert t["mtprune_s"] > 0 and t["torch_pruning_s"] > 0
        assert t["ratio"] == pytest.approx(t["mtprune_s"] / t["torch_pruning_s"])
        assert abs(t["mtprune_macs_ratio"] - t["target_macs"]) <= 0.01
    md = (out / "speed_small.md").read_text()
    assert "## Side by side" in md and "## Time to prune" in md


def test_hardware_widths_rows_and_their_own_entries(small):
    """Section 5b: mtprune at equal MACs with measured channel blocks (and near-ties reordered by latency), timed
    beside dense and mtprune_macs, in entries of its own: dropping them leaves section 5's entries as they were,
    and a changed fingerprint reruns only them."""
    out, result = small
    for r in result["side_by_side"]:
        hw = r["hardware"]
        assert hw["variants"] == ["dense", "mtprune_macs", *(k for k in HW_VARIANTS if "refused" not in hw[k])]
        assert hw["dense"]["speedup"] == pytest.approx(1.0)
        for k in ("mtprune_macs", "mtprune_macs_hw", "mtprune_macs_hw_ties"):
            v = hw[k]
            assert abs(v["macs_kept"] - r["target"]) <= 0.05 * r["target"]
            assert v["latency_ms"] > 0 and v["fidelity"] == pytest.approx(v["speedup"] * v["macs_kept"])
        lat = hw["mtprune_latency_hw"]  # the small models' floor may lie above the target
        if "refused" in lat:
            assert "below this model's latency floor" in lat["refused"]
        else:
            assert lat["within_5pct"] == (abs(lat["latency_ratio"] - r["target"]) <= 0.05 * r["target"])
        for k in (k for k in HW_VARIANTS if "refused" not in hw[k]):
            assert hw[k]["round_to"]["default"] == 1 and set(hw[k]["round_to"]) >= {"depthwise", "pointwise"}
        ties = hw["mtprune_macs_hw_ties"]
        assert 0 < ties["predicted_ratio"] < 1 and 0 < ties["predicted_ratio_by_importance"] < 1
    md = (out / "speed_small.md").read_text()
    assert all(f"| {k} |" in md for k in HW_VARIANTS)  # a refused one too, saying so
    entries = out / "entries"
    hw_files = sorted(entries.glob("side_hw_*.json"))
    assert hw_files and all(json.loads(f.read_text())["fingerprint"] for f in hw_files)
    side_files = {f.name: f.read_text() for f in entries.glob("side_small_*.json")}
    stale = json.loads(hw_files[0].read_text())
    right = stale["fingerprint"]
    hw_files[0].write_text(json.dumps({**stale, "fingerprint": "stale"}))
    for f in hw_files[1:]:
        f.unlink()
    again = run_suite("speed", scale="small", out=str(out), threads=1, resume=True)
    assert {f.name: f.read_text() for f in entries.glob("side_small_*.json")} == side_files  # not rerun
    assert [{k: v for k, v in r.items() if k != "hardware"} for r in again["side_by_side"]] == \
        [{k: v for k, v in r.items() if k != "hardware"} for r in result["side_by_side"]]
    assert json.loads(hw_files[0].read_text())["fingerprint"] == right  # rerun with its settings' fingerprint
    assert all(f.is_file() for f in hw_files)


def test_latency_floor_and_fidelity_ceiling(small):
    """Section 7: per model, every prunable layer at its minimum width timed beside the dense model."""
    out, result = small
    floors = {f["model"]: f for f in result["floor"]}
    assert set(floors) == set(SCALES["small"].models)
    for f in floors.values():
        assert f["floor_ratio"] > 0 and f["max_speedup"] == pytest.approx(1 / f["floor_ratio"])
        assert 0 < f["macs_kept"] < 0.1  # (almost) everything prunable is gone
    assert ceiling(0.2, 0.1) == pytest.approx(0.5) and ceiling(0.05, 0.1) == 1.0  # capped at 1
    # compute above the floor at the dense cost per MAC: latency 0.1 + (0.5 - 0) x 0.9 = 0.55 at half the MACs
    assert dense_efficiency_fidelity(0.1, 0.0, 0.5) == pytest.approx(0.5 / 0.55)
    assert dense_efficiency_fidelity(0.0, 0.0, 0.3) == pytest.approx(1.0)  # no floor: linear, fidelity 1
    assert dense_efficiency_fidelity(0.2, 0.01, 0.01) == pytest.approx(0.05)  # at the floor: the floor's
    assert dense_efficiency_fidelity(0.1, 0.0, 0.25) < ceiling(0.1, 0.25)  # never above the hard ceiling
    md = (out / "speed_small.md").read_text()
    assert "## Latency floor and fidelity ceiling" in md and "at dense efficiency" in md
    assert f"Command: `{result['command']}`" in md and "mtprune.bench.speed" in result["command"]
    assert md.count("| MobileNetV2 + DeepLab-v3 ASPP | ") >= 1 + len(COMPARE["small"].targets)


def test_stored_size_shrinks_with_sparsity(small):
    _, result = small
    rows = result["storage"]["rows"]
    assert [r["sparsity"] for r in rows] == list(SPARSITIES)
    for r in rows:
        assert r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=0.01)
        assert r["mtp_bytes"] > r["dense_bytes"]  # the .mtp file: dense weights plus bit-packed masks
    for key in ("bitmask_ratio", "csr_ratio"):
        ratios = [r[key] for r in rows]
        assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False)), (key, ratios)
        assert ratios[-1] < 0.1  # 98 % sparse: a tenth of the dense bytes at most


def test_stats_engine_entry(small):
    _, result = small
    e = result["stats_engine"]
    assert e["tasks"] == 3 and e["engine_s_per_batch"] > 0 and e["loop_s_per_batch"] > 0
    assert e["ratio"] == pytest.approx(e["engine_s_per_batch"] / e["loop_s_per_batch"])


@pytest.mark.skipif(not can_reset_peak(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_against_model_size(small):
    _, result = small
    rows = result["memory"]["rows"]
    assert [r["width"] for r in rows] == list(SCALES["small"].memory_widths)
    assert rows[0]["params"] < rows[-1]["params"]
    for r in rows:
        assert set(r["peak_mb"]) == set(MEMORY_MODES) == set(r["retained_mb"])
    big = rows[-1]
    weights = big["weights_mb"]
    # the meter sees memory: a summed-loss backward keeps one gradient per weight
    assert big["retained_mb"]["backward"] > 0.5 * weights
    # cosprune needs the 3 tasks' weight gradients at once; taylor only per-channel gate statistics
    assert big["peak_mb"]["cosprune"] > 2.5 * weights
    assert big["peak_mb"]["taylor"] < big["peak_mb"]["cosprune"] / 3
    for mode in ("taylor", "cosprune"):  # across batches only per-channel scores are kept
        assert big["retained_mb"][mode] < 0.5 * weights


def test_figures_markdown_and_resume(small):
    out, first = small
    for name in ("speed_small.png", "speed_memory_small.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "speed_small.md").read_text()
    assert "## Latency against MACs" in md and "## Stored size" in md and "## Peak memory" in md
    again = run_suite("speed", scale="small", out=str(out), threads=1, resume=True)
    # finished entries are read back, not measured again (a new timing would differ)
    assert again["latency"] == first["latency"]
    assert again["stats_engine"] == first["stats_engine"]
    assert first["machine"]["cpu"] in md  # the CPU named with its instruction set: timings depend on both


def test_resume_on_another_machine_measures_again(small, monkeypatch):
    """A timed entry stored on one machine is not mixed into another machine's table: its fingerprint names the
    device, so --resume elsewhere measures it again."""
    out, _ = small
    entries = sorted((out / "entries").glob("*.json"))
    timed = ("latency_", "side_", "floor_", "prune_time_", "stats_engine_")
    before = {p.name: json.loads(p.read_text()).get("fingerprint") for p in entries if p.name.startswith(timed)}
    assert before and all(before.values())
    monkeypatch.setattr("mtprune.bench.common.device_name", lambda device="cpu": "Other CPU (x86_64 AVX512)")
    run_suite("speed", scale="small", out=str(out), threads=1, resume=True)
    after = {name: json.loads((out / "entries" / name).read_text())["fingerprint"] for name in before}
    assert all(after[name] != before[name] for name in before)


class _Spy(Criterion):
    """Counts how many earlier groups' gradient tensors are still alive when the next group is scored."""

    name, needs = "spy", frozenset({TASK_WEIGHT_GRADS})

    def __init__(self) -> None:
        super().__init__()
        self.previous: list[weakref.ref] = []
        self.alive: list[int] = []

    def batch_score(self, stats):
        self.alive.append(sum(ref() is not None for ref in self.previous))
        self.previous += [weakref.ref(t) for t in stats.task_weight_grads.values()]
        return stats.task_weight_grads["seg"].sum(1)


def test_engine_keeps_one_group_of_gradient_copies_at_a_time():
    torch.manual_seed(0)
    model = zoo_model().eval()
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 40))
    spy = _Spy()
    tasks = preset("nyuv2", num_classes=5)
    engine = StatisticsEngine(model, graph, {t: k.loss for t, k in tasks.items()}, [spy])
    engine.run(nyu_batches(2))
    assert len(spy.alive) == 2 * len(graph.groups)
    assert max(spy.alive) == 0  # each group's statistics were dropped before the next group was built
    assert engine.batches == 2 and all(v.shape == (g.channels,) for g, v in
                                       ((graph.groups[k], v) for k, v in engine.averaged(spy).items()))


def _bad(kind: str):
    images, targets = nyu_batches(1)[0]
    if kind == "images_list":
        return [images.tolist(), targets], "images must be a tensor, got list"
    if kind == "images_int":
        return [images.to(torch.uint8), targets], "dtype torch.uint8"
    if kind == "images_nan":
        images[0, 0, 3, 4] = float("nan")
        return [images, targets], "images contain NaN or Inf"
    if kind == "targets_list":
        return [images, list(targets.values())], "targets of a batch must be a mapping"
    if kind == "missing_target":
        return [images, {k: v for k, v in targets.items() if k != "depth"}], r"no target for tasks \['depth'\]"
    if kind == "target_not_tensor":
        return [images, {**targets, "normal": targets["normal"].numpy()}], "task 'normal' must be a tensor"
    if kind == "target_nan":
        targets["depth"][0, 0, 1, 1] = float("inf")
        return [images, targets], "task 'depth' contains NaN or Inf"
    if kind == "not_a_pair":
        return images, "must be a pair"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["images_list", "images_int", "images_nan", "targets_list", "missing_target",
                                  "target_not_tensor", "target_nan", "not_a_pair"])
def test_bad_batch_is_refused_with_a_reason(kind):
    model = zoo_model().eval()
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 40))
    tasks = preset("nyuv2", num_classes=5)
    engine = StatisticsEngine(model, graph, {t: k.loss for t, k in tasks.items()}, [_Spy()])
    batch, message = _bad(kind)
    with pytest.raises(MTPruneInputError, match=message):
        engine.run([batch])
    assert engine.batches == 0
