"""Unstructured multi-task sparsification (mtprune.sparsity): masks, scores, the unanimous decision, the dynamic
schedule, IMP rewinding, the task-agreement analysis and the .mtp encoding of masks."""

from __future__ import annotations

import json
import math

import pytest
import safetensors
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import mtprune
from mtprune.engine.trainer import TrainConfig, Trainer
from mtprune.sparsity import apply_masks, get_masks, sparsify
from mtprune.sparsity.analysis import agreement_falls, mean_pairwise_iou, watershed, watershed_share
from mtprune.sparsity.decision import TaskRanking, sparsity_of
from mtprune.sparsity.dynamic import DynamicSchedule, first_conv, initial_masks, regrowth_order
from mtprune.sparsity.erk import erk_counts, erk_densities
from mtprune.sparsity.masks import MASK_FORMAT, MASK_PREFIX, effective_weight, maskable_params
from mtprune.sparsity.parts import layer_parts
from mtprune.sparsity.scores import summed_scores, task_scores
from mtprune.sparsity.storage import stored_size
from mtprune.tasks.normal import NormalTask
from mtprune.tasks.segmentation import SegmentationTask

LOSSES = {"seg": F.cross_entropy, "normal": F.mse_loss}


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mtprune.build_model("deeplab_resnet18", {"seg": 5, "normal": 3}, width=0.125, head="conv",
                               head_kwargs={"hidden": 16, "width": 1.0})


def batches(n: int = 2, size: int = 4, seed: int = 1, hw: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), {"seg": torch.randint(0, 5, (size, hw, hw), generator=g),
                                                        "normal": torch.randn(size, 3, hw, hw, generator=g)})
            for _ in range(n)]


DATA = batches()
X = DATA[0][0]


class TrunkNet(nn.Module):
    """A dict-returning user model (not a MultiTaskModel, no ``heads``): heads are found through autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dense = nn.Conv2d(8, 2, 1)
        self.cls = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        return {"dense": self.dense(f), "cls": self.cls(f)}


# ---------------------------------------------------------------------------------------------- masks
def test_only_conv_and_linear_weights_are_masked() -> None:
    model = TrunkNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sparsify(model, X, "random", 0.6)
    assert set(result.masks) == {"trunk.0.weight", "dense.weight", "cls.2.weight"}
    assert result.layers and {r["part"] for r in result.layers} == {"backbone", "dense", "cls"}
    after = model.state_dict()
    for key in ("trunk.0.bias", "trunk.1.weight", "trunk.1.bias", "trunk.1.running_var", "dense.bias", "cls.2.bias"):
        assert torch.equal(after[key], before[key]), key  # biases and BatchNorm untouched, never masked
    assert not any(k.endswith("_mask") and not k.endswith("weight_mask") for k in after)
    assert not hasattr(model.trunk[1], "weight_mask")


def test_masked_weights_stay_zero_through_optimizer_steps() -> None:
    model = tiny()
    sparsify(model, X, "random", 0.7, seed=3)
    masks = get_masks(model)
    layers = dict(model.named_modules())
    before = {p: effective_weight(layers[p.removesuffix(".weight")]).clone() for p in masks}
    for opt in (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)):
        for images, targets in DATA:
            out = model(images)
            loss = sum(LOSSES[t](out[t], targets[t]) for t in LOSSES)
            opt.zero_grad()
            loss.backward()
            opt.step()
    moved = 0
    for p, mask in masks.items():
        module = layers[p.removesuffix(".weight")]
        assert torch.equal(effective_weight(module)[~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(module.weight_orig.detach()[~mask], torch.zeros(int((~mask).sum())))
        moved += int((effective_weight(module)[mask] != before[p][mask]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in masks.values())
    assert get_masks(model).keys() == masks.keys()
    assert all(torch.equal(get_masks(model)[p], m) for p, m in masks.items())


class ListData(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(5)
        self.items = [(torch.randn(3, 32, 32, generator=g),
                       {"seg": torch.randint(0, 5, (32, 32), generator=g),
                        "normal": F.normalize(torch.randn(3, 32, 32, generator=g), dim=0)}) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_masks_survive_the_trainer_and_its_checkpoints(tmp_path) -> None:
    model = tiny()
    result = sparsify(model, X, "magnitude", 0.8)
    tasks = {"seg": SegmentationTask("seg", 5), "normal": NormalTask()}
    data = ListData(4)
    Trainer(model, tasks, data, data, tmp_path, TrainConfig(epochs=1, batch_size=4, device="cpu", quiet=True,
                                                            tensorboard=False)).fit()
    assert all(torch.equal(get_masks(model)[p], m) for p, m in result.masks.items())
    assert sparsity_of(get_masks(model)) == pytest.approx(0.8, abs=1e-3)
    assert all((effective_weight(m)[~m.weight_mask.bool()] == 0).all() for m in model.modules()
               if hasattr(m, "weight_mask"))
    restored = tiny(seed=9)
    apply_masks(restored, {p: torch.ones_like(m) for p, m in result.masks.items()})
    restored.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(get_masks(restored)[p], m) for p, m in result.masks.items())


def test_save_load_round_trip_restores_masks_and_outputs_and_packs_bits(tmp_path) -> None:
    model = tiny()
    result = sparsify(model, X, "random", 0.9, seed=1)
    mtprune.save(model, tmp_path / "sparse.mtp", example_inputs=X)
    mtprune.save(tiny(), tmp_path / "dense.mtp", example_inputs=X)
    loaded = mtprune.load(tmp_path / "sparse.mtp")
    assert get_masks(loaded).keys() == result.masks.keys()
    assert all(torch.equal(get_masks(loaded)[p], m) for p, m in result.masks.items())
    model.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = model(X), loaded(X)
    assert all(torch.equal(a[t], b[t]) for t in a)
    with safetensors.safe_open(str(tmp_path / "sparse.mtp"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["mtprune"])
        packed = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(MASK_PREFIX)}  # noqa: SIM118
    assert meta["masks"]["format"] == MASK_FORMAT and set(meta["masks"]["shapes"]) == set(result.masks)
    assert all(v.dtype == torch.uint8 for v in packed.values())
    numel = sum(m.numel() for m in result.masks.values())
    assert sum(v.numel() for v in packed.values()) == sum(math.ceil(m.numel() / 8) for m in result.masks.values())
    extra = (tmp_path / "sparse.mtp").stat().st_size - (tmp_path / "dense.mtp").stat().st_size
    assert extra < numel * 4 / 16  # float32 masks would add 4 bytes per weight; bits add 1/8 (+ header)
    with safetensors.safe_open(str(tmp_path / "dense.mtp"), framework="pt") as fh:
        assert "masks" not in json.loads(fh.metadata()["mtprune"])  # dense files unchanged
    user = TrunkNet()
    sparsify(user, X, "random", 0.5)
    mtprune.save(user, tmp_path / "user.mtp")
    again = mtprune.load(tmp_path / "user.mtp", base=TrunkNet())
    assert all(torch.equal(get_masks(again)[p], m) for p, m in get_masks(user).items())


# ---------------------------------------------------------------------------------------------- decision
def test_per_task_topk_and_unanimous_or_rule_on_a_constructed_case() -> None:
    parts = {"b.weight": "backbone", "ha.weight": "a", "hb.weight": "b"}
    scores = {
        "a": {"b.weight": torch.tensor([4.0, 3.0, 0.1, 0.2]), "ha.weight": torch.tensor([2.0, 0.05]),
              "hb.weight": torch.tensor([99.0, 99.0])},  # task a does not decide head b
        "b": {"b.weight": torch.tensor([0.1, 5.0, 6.0, 0.2]), "ha.weight": torch.tensor([99.0, 99.0]),
              "hb.weight": torch.tensor([0.3, 0.01])},
    }
    masks, task_masks = TaskRanking(scores, parts).masks(0.5)  # k = 3 of 6 weights per task
    assert task_masks["a"]["b.weight"].tolist() == [True, True, False, False]
    assert task_masks["a"]["ha.weight"].tolist() == [True, False]
    assert "hb.weight" not in task_masks["a"]
    assert task_masks["b"]["b.weight"].tolist() == [False, True, True, False]
    # weight 0 is pruned by task b only, weight 2 by task a only: both survive in the shared backbone
    assert masks["b.weight"].tolist() == [True, True, True, False]
    # each head keeps exactly its own task's decision
    assert masks["ha.weight"].tolist() == [True, False] and masks["hb.weight"].tolist() == [True, False]


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_overall_sparsity_within_a_tenth_of_a_point(target: float) -> None:
    for method in ("disparse_static", "disparse_pretrained"):
        model = tiny()
        result = sparsify(model, X, method, target, data=DATA, losses=LOSSES, batches=2)
        masks = get_masks(model)
        achieved = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert abs(achieved - target) <= 1e-3 and result.sparsity == pytest.approx(achieved)
        shared = [r["name"] for r in result.layers if r["part"] == "backbone"]
        per_task = [sum(int(b[p].sum()) for p in shared) for b in result.task_masks.values()]
        assert result.parts["backbone"]["kept"] >= max(per_task)  # OR: the backbone is denser than any B_t
        assert set(result.parts) == {"backbone", "seg", "normal", "overall"}


def test_head_mask_depends_only_on_its_own_task() -> None:
    model = tiny()
    parts = layer_parts(model, X)
    other = {"seg": F.cross_entropy, "normal": lambda p, t: 10 * F.l1_loss(p, t)}
    s1 = task_scores(model, "snip", ["seg", "normal"], DATA, LOSSES, 2)
    s2 = task_scores(model, "snip", ["seg", "normal"], DATA, other, 2)
    seg_head = [p for p, part in parts.items() if part == "seg"]
    normal_head = [p for p, part in parts.items() if part == "normal"]
    assert all(torch.equal(s1["seg"][p], s2["seg"][p]) for p in parts)  # task seg's scores ignore task normal
    m1, _ = TaskRanking(s1, parts).masks(0.1)
    m2, _ = TaskRanking(s2, parts).masks(0.1)
    assert all(torch.equal(m1[p], m2[p]) for p in seg_head)
    assert any(not torch.equal(m1[p], m2[p]) for p in normal_head)


# ---------------------------------------------------------------------------------------------- scores
def _hand_grads(model: nn.Module, data: list, losses: dict) -> dict[str, dict[str, Tensor]]:
    model.eval()
    out = {t: {} for t in losses}
    weights = {n + ".weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for images, targets in data:
        for t, fn in losses.items():
            model.zero_grad()
            fn(model(images)[t], targets[t]).backward()
            for p, w in weights.items():
                g = w.grad if w.grad is not None else torch.zeros_like(w)
                out[t].setdefault(p, []).append(g.clone())
    return out


def test_snip_and_pretrained_scores_equal_hand_computation() -> None:
    model = tiny()
    hand = _hand_grads(model, DATA, LOSSES)
    w = {n + ".weight": m.weight.detach() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    snip = task_scores(model, "snip", list(LOSSES), DATA, LOSSES, 2)
    pre = task_scores(model, "pretrained", list(LOSSES), DATA, LOSSES, 2)
    summed = summed_scores(model, "snip", DATA, LOSSES, 2)
    for p in w:
        for t in LOSSES:
            torch.testing.assert_close(snip[t][p], sum((g * w[p]).abs() for g in hand[t][p]), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(pre[t][p], w[p] ** 2 * sum(g.abs() for g in hand[t][p]), rtol=1e-4, atol=1e-9)
        by_batch = [sum(hand[t][p][b] for t in LOSSES) for b in range(len(DATA))]
        torch.testing.assert_close(summed[p], sum((g * w[p]).abs() for g in by_batch), rtol=1e-4, atol=1e-9)
    head = "heads.normal.conv.weight"
    assert snip["seg"][head].abs().sum() == 0 and snip["normal"][head].abs().sum() > 0


@pytest.mark.parametrize("method", ["disparse_static", "disparse_pretrained", "disparse_dynamic", "snip", "imp",
                                    "rigl"])
def test_gradient_methods_without_data_or_losses_raise_value_error(method: str) -> None:
    with pytest.raises(ValueError, match="needs gradients"):
        sparsify(tiny(), X, method, 0.5, losses=LOSSES)
    with pytest.raises(ValueError, match="needs gradients"):
        sparsify(tiny(), X, method, 0.5, data=DATA)


# ---------------------------------------------------------------------------------------------- dynamic
def test_erk_densities_fill_the_budget_with_the_first_conv_dense() -> None:
    model = tiny()
    shapes = maskable_params(model)
    first = first_conv(model)
    assert first == "backbone.conv1.weight"
    dens = erk_densities(shapes, 0.9, dense=[first])
    numel = {p: math.prod(s) for p, s in shapes.items()}
    total = sum(numel.values())
    assert sum(dens[p] * numel[p] for p in shapes) == pytest.approx(0.1 * total, rel=1e-9)
    assert dens[first] == 1.0 and all(0 < d <= 1 for d in dens.values())
    assert dens["backbone.layer4.1.conv2.weight"] < dens["backbone.layer1.0.conv1.weight"]
    assert sum(erk_counts(shapes, dens).values()) == round(0.1 * total)


def test_dynamic_updates_keep_counts_zero_regrown_weights_and_reset_optimizer_state() -> None:
    seen = []

    def check(update, loop) -> None:
        layers = dict(loop.model.named_modules())
        for p, grown in update.grown.items():
            module = layers[p.removesuffix(".weight")]
            mask = module.weight_mask.bool()
            assert int(mask.sum()) == counts[p]  # active weights per layer unchanged by drop/regrow
            assert (module.weight_orig.detach()[grown] == 0).all()  # regrown weights start at zero
            state = loop.optimizer.state[module.weight_orig]
            changed = grown | update.dropped[p]
            assert (state["exp_avg"][changed] == 0).all() and (state["exp_avg_sq"][changed] == 0).all()
            assert not mask[update.dropped[p]].any() and mask[grown].all()
        seen.append(update.summary())

    model = tiny()
    init, _ = initial_masks(model, 0.8, seed=0)  # what sparsify starts from (same seed)
    counts = {p: int(m.sum()) for p, m in init.items()}
    result = sparsify(model, X, "disparse_dynamic", 0.8, data=DATA, losses=LOSSES, seed=0,
                      train={"steps": 14, "lr": 1e-2}, schedule={"delta_t": 3, "t_end": 10}, on_update=check)
    assert [s["step"] for s in seen] == [3, 6, 9]  # every ΔT until T_end, none from T_end on
    assert all(s["moved"] > 0 for s in seen)
    assert result.extra["steps"] == 14  # training runs to the end, past T_end
    assert get_masks(model)[first_conv(model)].all()  # the first conv stays dense
    assert {p: int(m.sum()) for p, m in get_masks(model).items()} == counts
    assert result.sparsity == pytest.approx(0.8, abs=1e-5)


def test_schedule_decays_on_a_cosine_and_stops_at_t_end() -> None:
    s = DynamicSchedule(delta_t=50, t_end=1000, alpha=0.5)
    assert s.fraction(0) == 0.5 and s.fraction(500) == pytest.approx(0.25) and s.fraction(1000) == 0.0
    assert s.updates_at(50) and not s.updates_at(1000) and not s.updates_at(1050) and not s.updates_at(0)


def test_regrowth_takes_the_union_of_per_task_rankings() -> None:
    candidates = torch.tensor([True, True, True, True, False])
    ga = torch.tensor([9.0, 8.0, 1.0, 0.5, 100.0])  # task a prefers 0, then 1
    gb = torch.tensor([0.1, 0.2, 3.0, 4.0, 100.0])  # task b prefers 3, then 2
    order = regrowth_order(candidates, [ga, gb])
    assert set(order[:2].tolist()) == {0, 3} and set(order[:4].tolist()) == {0, 1, 2, 3}
    assert regrowth_order(candidates, [ga + gb])[:2].tolist() == [0, 1]  # RigL: the summed gradient


# ---------------------------------------------------------------------------------------------- IMP / LTH
def test_imp_rewinding_restores_initial_weights_on_survivors() -> None:
    model = tiny()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    result = sparsify(model, X, "imp", 0.75, data=DATA, losses=LOSSES, rounds=2, rewind=True,
                      train={"steps": 2, "lr": 1e-2})
    layers = dict(model.named_modules())
    for p, mask in result.masks.items():
        w = effective_weight(layers[p.removesuffix(".weight")])
        assert torch.equal(w[mask], init[p][mask]) and (w[~mask] == 0).all()
    assert torch.equal(model.state_dict()["backbone.bn1.weight"], init["backbone.bn1.weight"])
    assert result.sparsity == pytest.approx(0.75, abs=1e-5)
    assert [h["sparsity"] for h in result.history] == pytest.approx([0.5, 0.75])
    trained = tiny()
    sparsify(trained, X, "imp", 0.75, data=DATA, losses=LOSSES, rounds=2, rewind=False, train={"steps": 2})
    assert not torch.equal(effective_weight(trained.backbone.conv1)[get_masks(trained)["backbone.conv1.weight"]],
                           init["backbone.conv1.weight"][get_masks(trained)["backbone.conv1.weight"]])


# ---------------------------------------------------------------------------------------------- analysis
def test_mean_pairwise_iou_for_three_tasks_by_hand() -> None:
    m = {
        "a": {"l1": torch.tensor([1, 1, 0, 0]).bool(), "l2": torch.tensor([1, 0, 0, 0]).bool()},
        "b": {"l1": torch.tensor([1, 1, 1, 0]).bool(), "l2": torch.tensor([0, 1, 0, 0]).bool()},
        "c": {"l1": torch.tensor([0, 1, 1, 1]).bool(), "l2": torch.tensor([1, 1, 0, 0]).bool()},
    }
    # l1: IoU(a,b)=2/3, IoU(a,c)=1/4, IoU(b,c)=2/4; l2: 0/2, 1/2, 1/2
    got = mean_pairwise_iou(m)
    assert got["l1"] == pytest.approx((2 / 3 + 1 / 4 + 2 / 4) / 3)
    assert got["l2"] == pytest.approx((0 + 1 / 2 + 1 / 2) / 3)
    assert watershed(got) == "l2"


def test_watershed_follows_the_running_minimum_past_a_shortcut_layer() -> None:
    """ResNet order puts the shortcut projection (high agreement) between two main-path layers: the step from it
    to the next layer is no drop of the path; the path's own largest fall is."""
    agreement = {"c1": 0.98, "c2": 0.90, "c3": 0.55, "down": 0.92, "c4": 0.50, "c5": 0.45}
    assert watershed(agreement) == "c3"  # 0.90 -> 0.55; not "c4" (0.92 -> 0.50 follows the shortcut)
    assert watershed({"a": 0.5, "b": 0.6, "c": 0.7}) is None  # never falls
    assert watershed({"a": 0.9, "b": 0.9}) is None and watershed({}) is None
    falls = agreement_falls(agreement)  # running minimum 0.98, 0.90, 0.55, 0.55, 0.50, 0.45
    assert falls == pytest.approx({"c1": 0.0, "c2": 0.08, "c3": 0.35, "down": 0.0, "c4": 0.05, "c5": 0.05})
    assert watershed_share(agreement) == pytest.approx(0.35 / 0.53)  # of the whole fall, 0.98 -> 0.45
    assert watershed_share({"a": 0.9, "b": 0.95}) == 0.0 and watershed_share({"a": 1.0, "b": 0.2}) == 1.0


def test_static_result_reports_agreement_storage_and_parts() -> None:
    model = tiny()
    result = sparsify(model, X, "disparse_static", 0.9, data=DATA, losses=LOSSES, batches=1)
    assert set(result.agreement) == {p for p, part in layer_parts(model).items() if part == "backbone"}
    assert all(0 <= v <= 1 for v in result.agreement.values())
    st = stored_size(model)
    assert st["bitmask_bytes"] < st["dense_bytes"] / 3 and st["nonzero_masked"] == sum(
        int(m.sum()) for m in result.masks.values())
    json.dumps(result.to_dict())  # JSON-ready
    assert "storage, not time" in result.speed_note


def test_csr_export_computes_the_masked_function_on_sparse_kernels():
    """export_csr swaps masked conv/linear layers for CSR products and keeps the outputs."""
    from mtprune.sparsity.export import CSRConv2d, CSRLinear, export_csr
    from mtprune.sparsity.masks import apply_masks, maskable_params

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=2, dilation=2, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 5))
    masks = {p: torch.rand(shape) > 0.8 for p, shape in maskable_params(net).items()}
    apply_masks(net, masks)
    x = torch.randn(2, 3, 8, 8)
    sparse = export_csr(net)
    assert isinstance(sparse[0], CSRConv2d) and isinstance(sparse[3], CSRLinear)
    assert sparse[0].weight_csr.layout == torch.sparse_csr
    torch.testing.assert_close(sparse(x), net(x), rtol=1e-4, atol=1e-5)
