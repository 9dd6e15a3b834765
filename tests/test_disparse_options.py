"""DiSparse options that follow the released code (SHI-Labs/DiSparse-Multitask-Model-Compression; Sun et al., CVPR
2022), each against its default:

- ``erk_power``: the ERK ratio raised to 0.9 (``googleAI_ERK(..., erk_power_scale=0.9)``);
- ``score_init="xavier_normal"``: static scores taken on a Xavier-normal re-initialised copy
  (``disparse_prune_static``);
- ``regrowth="per_task_union"``: each task regrows its own top-n, the backbone takes the union
  (``dynamic_disparse``), back to the ERK counts at T_end.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mtprune.config import DynamicSection, SparsifySection
from mtprune.sparsity import apply_masks, get_masks, sparsify
from mtprune.sparsity.disparse import xavier_copy
from mtprune.sparsity.dynamic import DropRegrow, DynamicSchedule, first_conv, initial_masks
from mtprune.sparsity.erk import erk_densities
from mtprune.sparsity.masks import maskable_layers, maskable_params, trainable_weight
from mtprune.sparsity.parts import layer_parts
from mtprune.utils.errors import MTPruneInputError
from test_sparsity import DATA, LOSSES, X, tiny  # the same tiny model and data


# ---------------------------------------------------------------- ERK power
def test_erk_power_flattens_the_densities_and_fills_the_same_budget():
    shapes = maskable_params(tiny())
    first = "backbone.conv1.weight"
    d1 = erk_densities(shapes, 0.9, dense=[first])
    d09 = erk_densities(shapes, 0.9, dense=[first], power=0.9)
    numel = {p: math.prod(s) for p, s in shapes.items()}
    total = sum(numel.values())
    assert sum(d09[p] * numel[p] for p in shapes) == pytest.approx(0.1 * total, rel=1e-9)
    sparse = [p for p in shapes if d09[p] < 1 and d1[p] < 1]
    a, b = "backbone.layer4.1.conv2.weight", "backbone.layer1.0.conv1.weight"
    raw = {p: sum(shapes[p]) / numel[p] for p in (a, b)}
    assert d09[a] / d09[b] == pytest.approx((raw[a] / raw[b]) ** 0.9, rel=1e-9)  # ε · raw^0.9
    assert d1[a] / d1[b] == pytest.approx(raw[a] / raw[b], rel=1e-9)
    spread = lambda d: max(d[p] for p in sparse) / min(d[p] for p in sparse)  # noqa: E731
    assert spread(d09) < spread(d1)
    assert d09[a] > d1[a]  # the largest layer (lowest density) gets denser
    with pytest.raises(MTPruneInputError, match="ERK power"):
        erk_densities(shapes, 0.9, power=0.0)


def test_erk_power_reaches_dynamic_sparse_training():
    model = tiny()
    result = sparsify(model, X, "disparse_dynamic", 0.8, data=DATA, losses=LOSSES, seed=0, train={"steps": 1},
                      schedule={"erk_power": 0.9})
    shapes = maskable_params(tiny())
    want = erk_densities(shapes, 0.8, dense=[first_conv(model)], power=0.9)
    assert result.extra["erk_densities"] == want != erk_densities(shapes, 0.8, dense=[first_conv(model)])
    assert result.sparsity == pytest.approx(0.8, abs=1e-5)
    assert DynamicSection(erk_power=0.9).erk_power == 0.9


# ---------------------------------------------------------------- static scores on a Xavier-normal copy
def test_static_scores_on_a_xavier_normal_copy():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sparsify(model, X, "disparse_static", 0.9, data=DATA, losses=LOSSES, batches=1, seed=3,
                      score_init="xavier_normal")
    assert result.extra["score_init"] == "xavier_normal"
    for name, module in maskable_layers(model).items():  # the kept weights are the model's own initialisation
        kept = module.weight_mask.bool()
        assert torch.equal(trainable_weight(module)[kept], before[f"{name}.weight"][kept])

    by_hand = tiny()  # the same copy, built by hand: every conv/linear weight re-drawn in module order
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in maskable_layers(by_hand).values():
            module.weight.copy_(nn.init.xavier_normal_(torch.empty(module.weight.shape), generator=gen))
    sparsify(by_hand, X, "disparse_static", 0.9, data=DATA, losses=LOSSES, batches=1)
    masks, hand = get_masks(model), get_masks(by_hand)
    assert masks.keys() == hand.keys() and all(torch.equal(masks[p], hand[p]) for p in masks)

    plain = tiny()
    sparsify(plain, X, "disparse_static", 0.9, data=DATA, losses=LOSSES, batches=1, seed=3)
    assert any(not torch.equal(masks[p], m) for p, m in get_masks(plain).items())  # the option changes the masks


def test_xavier_copy_draws_xavier_normal_weights_and_refuses_other_methods():
    model = tiny()
    copied = xavier_copy(model, 0)
    w = maskable_layers(copied)["backbone.layer4.1.conv2"].weight
    fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    assert not torch.equal(w, maskable_layers(model)["backbone.layer4.1.conv2"].weight)
    with pytest.raises(MTPruneInputError, match="score_init"):
        sparsify(tiny(), X, "snip", 0.5, data=DATA, losses=LOSSES, score_init="xavier_normal")
    with pytest.raises(ValueError, match="score_init"):
        SparsifySection(method="snip", score_init="xavier_normal")


# ---------------------------------------------------------------- regrowth: each task's own top-n, united
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(2, 4, 1, bias=False)
        self.heads = nn.ModuleDict({"a": nn.Conv2d(4, 2, 1, bias=False), "b": nn.Conv2d(4, 2, 1, bias=False)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.backbone(x)
        return {t: h(f) for t, h in self.heads.items()}


PARTS = {"backbone.weight": "backbone", "heads.a.weight": "a", "heads.b.weight": "b"}
SHAPES = {"backbone.weight": (4, 2, 1, 1), "heads.a.weight": (2, 4, 1, 1), "heads.b.weight": (2, 4, 1, 1)}


def updater(regrowth: str) -> tuple[nn.Module, DropRegrow]:
    """Every layer: 8 weights 0.1 … 0.8, the first four active (count K = 4)."""
    model = Tiny()
    with torch.no_grad():
        for name, m in maskable_layers(model).items():
            m.weight.copy_(torch.arange(1, 9, dtype=torch.float).div(10).reshape(SHAPES[f"{name}.weight"]))
    apply_masks(model, {p: torch.arange(8).lt(4).reshape(s) for p, s in SHAPES.items()})
    opt = torch.optim.Adam([trainable_weight(m) for m in maskable_layers(model).values()])
    return model, DropRegrow(model, PARTS, opt, per_task=True, regrowth=regrowth, counts=dict.fromkeys(PARTS, 4))


def grads() -> dict[str, dict[str, Tensor]]:
    a = torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0, 8.0, 1.0, 0.5])  # task a prefers 4, then 5
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 3.0, 4.0])  # task b prefers 7, then 6
    zero = torch.zeros(8)
    flat = {"a": {"backbone.weight": a, "heads.a.weight": a, "heads.b.weight": zero},
            "b": {"backbone.weight": b, "heads.a.weight": zero, "heads.b.weight": b}}
    return {t: {p: g.reshape(SHAPES[p]) for p, g in gs.items()} for t, gs in flat.items()}


def active(model: nn.Module) -> dict[str, list[int]]:
    return {p: get_masks(model)[p].reshape(-1).nonzero().flatten().tolist() for p in PARTS}


def test_per_task_union_regrows_each_tasks_own_top_n_united_in_the_backbone():
    model, up = updater("per_task_union")
    up.update(1, 0.5, grads())
    # n = 2: drop the two smallest (0, 1); backbone grows a's {4, 5} ∪ b's {6, 7}; each head its own task's top 2
    assert active(model) == {"backbone.weight": [2, 3, 4, 5, 6, 7], "heads.a.weight": [2, 3, 4, 5],
                             "heads.b.weight": [2, 3, 6, 7]}
    assert up.over_count()
    up.update(2, 0.5, grads())  # drops to (1 - f)·K = 2 (the grown weights are 0), regrows the same union
    assert active(model)["backbone.weight"] == [2, 3, 4, 5, 6, 7]
    up.update(3, 0.0, None)  # T_end: a drop only, back to K = 4 (zero weights first, in index order)
    assert active(model) == {"backbone.weight": [2, 3, 6, 7], "heads.a.weight": [2, 3, 4, 5],
                             "heads.b.weight": [2, 3, 6, 7]}
    assert not up.over_count()

    model, up = updater("rank_union")  # the default: exactly n, by the best per-task rank
    up.update(1, 0.5, grads())
    assert active(model)["backbone.weight"] == [2, 3, 4, 7] and not up.over_count()


def test_per_task_union_in_training_ends_at_the_erk_counts_and_rigl_refuses_it():
    denser = []

    def watch(update, loop) -> None:
        masks = get_masks(loop.model)
        denser.append(any(int(masks[p].sum()) > counts[p] for p in masks if parts[p] == "backbone"))

    model = tiny()
    init, _ = initial_masks(model, 0.8, seed=0)
    counts = {p: int(m.sum()) for p, m in init.items()}
    parts = layer_parts(model, X, list(LOSSES))
    result = sparsify(model, X, "disparse_dynamic", 0.8, data=DATA, losses=LOSSES, seed=0,
                      train={"steps": 8, "lr": 1e-2}, schedule={"delta_t": 3, "t_end": 7, "regrowth": "per_task_union"},
                      on_update=watch)
    assert denser == [True, True]  # after each update the backbone holds the union (steps 3 and 6)
    assert {p: int(m.sum()) for p, m in get_masks(model).items()} == counts  # trimmed at T_end
    assert result.sparsity == pytest.approx(0.8, abs=1e-5)
    assert result.history[-1]["step"] == 7 and result.history[-1]["fraction"] == 0.0
    with pytest.raises(MTPruneInputError, match="RigL"):
        sparsify(tiny(), X, "rigl", 0.8, data=DATA, losses=LOSSES, train={"steps": 1},
                 schedule={"regrowth": "per_task_union"})
    with pytest.raises(MTPruneInputError, match="regrowth"):
        DynamicSchedule(regrowth="union")
    assert DynamicSection(regrowth="per_task_union").regrowth == "per_task_union"


# ---------------------------------------------------------------- the suite (mtprune.bench.disparse2022)
def test_the_suite_runs_the_released_variants_through_the_config():
    from pathlib import Path

    from mtprune.bench import disparse2022

    base = Path(__file__).resolve().parents[1] / "configs" / "sparsify_synthetic.yaml"
    static = disparse2022._config(base, disparse2022.method_overrides("disparse_static_released")).sparsify
    dynamic = disparse2022._config(base, disparse2022.method_overrides("disparse_dynamic_released")).sparsify
    plain = disparse2022._config(base, disparse2022.method_overrides("disparse_dynamic")).sparsify
    assert (static.method, static.score_init) == ("disparse_static", "xavier_normal")
    assert (dynamic.method, dynamic.dynamic.erk_power, dynamic.dynamic.regrowth) == \
        ("disparse_dynamic", 0.9, "per_task_union")
    assert (plain.score_init, plain.dynamic.erk_power, plain.dynamic.regrowth) == ("model", 1.0, "rank_union")
    assert set(disparse2022.VARIANTS) <= set(disparse2022.METHODS)
    with pytest.raises(MTPruneInputError, match="scale"):
        disparse2022.run(scale="huge")


def test_the_suite_reports_each_runs_watershed_layer():
    from mtprune.bench import disparse2022

    rows = [{"method": "disparse_static", "target": 0.9, "watershed": w} for w in ("layer4.conv1", "layer4.conv1",
                                                                                     "layer3.conv2")]
    rows += [{"method": "snip", "target": 0.9, "watershed": None},
             {"method": "disparse_dynamic", "target": 0.5, "watershed": "layer4.conv1"}]
    text = disparse2022._watersheds(rows)
    assert text[0] == "- Most frequent: `layer4.conv1` in 3 of 4 DiSparse runs."
    assert "- disparse_static 90%: `layer4.conv1` (2 of 3 seeds), `layer3.conv2` (1 of 3 seeds)" in text
    assert not any("snip" in line for line in text)
    assert disparse2022._watersheds(rows[3:4])[0].startswith("- No run recorded")


def test_the_suite_recomputes_watersheds_and_reports_the_agreement_span():
    """A run's watershed comes from its recorded agreement (not a stale stored name), and each method's line
    gives the mean agreement of the first and the last shared layer over its seeds."""
    from mtprune.bench import disparse2022

    agreement = {"c1": 0.98, "c2": 0.90, "c3": 0.55, "down": 0.92, "c4": 0.50}
    assert disparse2022._watershed_of({"agreement": agreement, "watershed": "c4"}) == "c3"
    assert disparse2022._watershed_of({"watershed": "old"}) == "old"  # nothing to recompute from
    rows = [{"method": "disparse_static", "target": 0.7, "watershed": "c3", "agreement": agreement},
            {"method": "disparse_static", "target": 0.7, "watershed": "c3",
             "agreement": {**agreement, "c1": 0.96, "c4": 0.30}}]
    text = disparse2022._watersheds(rows)
    # falls: 0.98 -> 0.50 with steps 0.08, 0.35, 0.05 (share 0.35/0.48); 0.96 -> 0.30: 0.06, 0.35, 0.25 (0.35/0.66)
    share = (0.35 / 0.48 + 0.35 / 0.66) / 2
    assert (f"- disparse_static 70%: `c3` (2 of 2 seeds); agreement 0.97 at the first shared layer, 0.40 at the "
            f"last; the watershed's step is {share:.0%} of the whole fall") in text


def test_a_run_directory_of_other_settings_is_stale(tmp_path):
    """The suite skips finished run directories; one made with other overrides must be rerun, not reported."""
    import json

    from mtprune.bench import disparse2022

    run = tmp_path / "snip_90_seed0"
    run.mkdir()
    assert not disparse2022._stale(run, ["seed=0"])  # no record (made before it existed): taken as it is
    (run / "overrides.json").write_text(json.dumps(["seed=0", "sparsify.sparsity=0.9"]))
    assert not disparse2022._stale(run, ["seed=0", "sparsify.sparsity=0.9"])
    assert disparse2022._stale(run, ["seed=0", "sparsify.sparsity=0.9", "train.epochs=30"])
