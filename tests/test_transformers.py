"""Vision transformers prune with attention heads as units (issue 14; pruning/attention.py).

Tiny configs, no pretrained weights: timm ``VisionTransformer`` (qkv/proj attention), torchvision
``VisionTransformer`` (``nn.MultiheadAttention``) and a multi-task ViT whose tokens are reshaped to a map for
dense heads.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtprune
from mtprune.pruning.attention import HeadSpec, head_layout, select_heads, snap_to_heads
from mtprune.pruning.criteria import CRITERIA
from mtprune.pruning.graph import PruningGraph
from mtprune.utils.errors import MTPruneInputError

timm = pytest.importorskip("timm")
tv_vit = pytest.importorskip("torchvision.models.vision_transformer")


class DenseViT(nn.Module):
    """A ViT trunk with a classification head and two dense heads on the token map (seg, depth)."""

    def __init__(self, trunk: nn.Module, dim: int, grid: int) -> None:
        super().__init__()
        self.trunk, self.grid = trunk, grid
        self.heads = nn.ModuleDict({"cls": nn.Linear(dim, 3), "seg": nn.Conv2d(dim, 4, 1),
                                    "depth": nn.Conv2d(dim, 1, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        tokens = self.trunk.forward_features(x)  # [B, 1 + grid², C]
        fmap = tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        return {"cls": self.heads["cls"](tokens[:, 0]), "seg": self.heads["seg"](fmap),
                "depth": self.heads["depth"](fmap)}


class TwoHeads(nn.Module):
    def __init__(self, trunk: nn.Module, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict({"a": nn.Linear(dim, 3), "b": nn.Linear(dim, 2)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        return {k: h(f) for k, h in self.heads.items()}


def timm_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                            num_heads=4, mlp_ratio=2.0, num_classes=0)


def tv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    trunk = tv_vit.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                     mlp_dim=64)
    trunk.heads = nn.Identity()
    return TwoHeads(trunk, 32).eval()


MODELS = {"timm": lambda: TwoHeads(timm_vit(), 32).eval(), "torchvision": tv_model,
          "dense": lambda: DenseViT(timm_vit(), 32, 4).eval()}


def batch(model: nn.Module, seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = model(x)
    return x, {k: torch.randn(v.shape, generator=gen) for k, v in out.items()}


def heads_consistent(model: nn.Module) -> int:
    """Check every attention module's head attributes against its weights; return how many there are."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            assert m.num_heads * m.head_dim == m.embed_dim == m.in_proj_weight.shape[1]
            assert m.in_proj_weight.shape[0] == 3 * m.embed_dim == 3 * m.out_proj.in_features
            n += 1
        elif hasattr(m, "qkv") and hasattr(m, "num_heads"):
            assert m.qkv.out_features == 3 * m.num_heads * m.head_dim == 3 * m.proj.in_features == 3 * m.attn_dim
            assert m.scale == pytest.approx(m.head_dim ** -0.5)
            n += 1
    return n


def attention_group(graph: PruningGraph, block: int = 0):
    return next(g for g in graph.groups if g.heads is not None and g.heads.kind == "qkv" and f".{block}." in g.root)


def test_timm_attention_is_one_group_with_heads() -> None:
    model = MODELS["timm"]()
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 32))
    g = attention_group(graph)
    assert g.root == "trunk.blocks.0.attn.qkv" and g.channels == 32
    assert g.heads == HeadSpec("qkv", ("trunk.blocks.0.attn",), 4, 8, via="trunk.blocks.0.attn.proj")
    assert g.consumers == ["trunk.blocks.0.attn.proj"]
    cmap = g.out_maps["trunk.blocks.0.attn.qkv"]  # channel i <-> q, k, v rows i, 32 + i, 64 + i
    assert sorted(zip(cmap.root, cmap.local, strict=True))[:3] == [(0, 0), (0, 32), (0, 64)]


def test_whole_head_removal_equals_masking_that_head() -> None:
    """Removing head 1 of block 0 gives exactly the model whose head-1 q, k, v rows are zero."""
    model = MODELS["timm"]()
    x, _ = batch(model)
    masked = copy.deepcopy(model)
    qkv = masked.trunk.blocks[0].attn.qkv
    with torch.no_grad():
        for j in range(3):
            qkv.weight[j * 32 + 8: j * 32 + 16] = 0
            qkv.bias[j * 32 + 8: j * 32 + 16] = 0
        want = masked(x)
    graph = PruningGraph(model, x[:1])
    graph.prune({attention_group(graph).index: list(range(8, 16))})
    attn = model.trunk.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features) == (3, 8, 72)
    assert heads_consistent(model) == 2
    with torch.no_grad():
        got = model(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_head_dim_removal_keeps_each_channel_in_its_head() -> None:
    model = MODELS["timm"]()
    before = model.trunk.blocks[0].attn.qkv.weight.detach().clone()
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 32))
    drop = [h * 8 + d for h in range(4) for d in (1, 6)]  # two channels from every head
    graph.prune({attention_group(graph).index: drop})
    attn = model.trunk.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (4, 6, 24)
    kept = [i for i in range(32) if i not in drop]
    rows = [j * 32 + i for j in range(3) for i in kept]  # q, k, v blocks, heads in order, each head's dims in order
    torch.testing.assert_close(attn.qkv.weight, before[rows])
    assert model(torch.zeros(2, 3, 32, 32))["a"].shape == (2, 3)


def test_a_plan_that_splits_heads_is_snapped_to_heads() -> None:
    model = MODELS["timm"]()
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 32))
    graph.prune({attention_group(graph).index: [0, 1, 2, 3, 4, 5, 6, 9]})  # 8 channels, not one head
    attn = model.trunk.blocks[0].attn
    assert attn.num_heads * attn.head_dim == attn.proj.in_features == 24
    assert heads_consistent(model) == 2


def test_select_heads() -> None:
    spec = HeadSpec("qkv", ("a",), 3, 4)
    scores = torch.tensor([5.0, 6, 7, 8, 0.1, 0.2, 0.1, 0.3, 9, 9, 9, 9])
    assert select_heads(spec, scores, 4) == [4, 5, 6, 7]  # the weakest head, whole
    spread = torch.tensor([0.0, 5, 5, 5, 5, 0, 5, 5, 5, 5, 0, 5])
    assert select_heads(spec, spread, 3) == [0, 5, 10]  # one channel from every head
    assert select_heads(HeadSpec("qkv", ("a",), 3, 4, whole_heads_only=True), spread, 3) == [0, 1, 2, 3]
    assert snap_to_heads(spec, [0, 5, 10]) == [0, 5, 10]  # a head-consistent plan is kept as it is
    assert select_heads(spec, scores, 11, keep_at_least=2) != list(range(11))  # never below the minimum


@pytest.mark.parametrize("name", sorted(CRITERIA))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_vit_family_prunes_with_every_criterion(kind: str, name: str) -> None:
    model = MODELS[kind]()
    x, targets = batch(model)
    shapes = {k: v.shape for k, v in model(x).items()}
    params = sum(p.numel() for p in model.parameters())
    losses = {k: F.mse_loss for k in targets}
    report = mtprune.prune(model, x, name, channel_ratio=0.3, data=[(x, targets)], losses=losses, min_channels=2)
    assert report.params_after < params
    assert heads_consistent(model) == 2
    out = model(x)
    assert {k: v.shape for k, v in out.items()} == shapes
    sum(F.mse_loss(out[k], targets[k]) for k in out).backward()  # trainable after pruning


def test_window_attention_is_refused_before_any_change() -> None:
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    trunk = swin.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                                 num_classes=4)
    model = TwoHeads(trunk, 4)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(MTPruneInputError, match="window attention"):
        mtprune.prune(model, torch.zeros(1, 3, 16, 16), "l1", channel_ratio=0.3)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
def test_head_pruned_model_round_trips_through_save_load_and_profile(kind: str, tmp_path) -> None:
    model = MODELS[kind]()
    x, _ = batch(model)
    graph = PruningGraph(model, x[:1])
    if kind == "timm":  # 3 heads of 8 and 4 heads of 6: one width (24), two layouts only the metadata tells apart
        graph.prune({attention_group(graph, 0).index: list(range(24, 32))})
        graph.prune({attention_group(graph, 1).index: [h * 8 + d for h in range(4) for d in (0, 7)]})
    else:  # the embedding group: one channel from every head of every MultiheadAttention
        g = next(g for g in graph.groups if g.heads is not None)
        graph.prune({g.index: [h * 8 + 3 for h in range(4)]})
    layout = head_layout(model)
    assert len(layout) == 2 and len({tuple(v) for v in layout.values()}) == (2 if kind == "timm" else 1)
    mtprune.save(model, tmp_path / "m.mtp", example_inputs=x[:1])
    loaded = mtprune.load(tmp_path / "m.mtp", base=MODELS[kind]()).eval()
    assert head_layout(loaded) == layout
    heads_consistent(loaded)
    with torch.no_grad():
        want, got = model(x), loaded(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    assert mtprune.profile(loaded, x[:1]).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
def test_target_macs_is_reached_on_vits(kind: str) -> None:
    """The cost model scales attention products and MultiheadAttention's in_proj with the pruned widths."""
    model = MODELS[kind]()
    x, _ = batch(model)
    report = mtprune.prune(model, x[:1], "l1", target_macs=0.5, min_channels=2)
    assert abs(report.macs_ratio - 0.5) < 0.05
    assert heads_consistent(model) == 2


@pytest.mark.slow
def test_vit_bench_suite_runs_at_small_scale(tmp_path) -> None:
    from mtprune.bench import vit

    result = vit.run(scale="small", out=tmp_path, threads=1, methods=["l1", vit.TP_METHOD])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "l1", vit.TP_METHOD}
    for name in ("l1", vit.TP_METHOD):  # both at the same MACs, measured by one counter
        assert abs(rows[name]["macs_ratio"] - 0.5) < 0.05
    assert (tmp_path / "results.json").is_file() and "| l1 |" in (tmp_path / "results.md").read_text()


def test_attention_with_qk_norm_is_left_alone_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    trunk = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                             num_heads=4, mlp_ratio=2.0, num_classes=0, qk_norm=True)
    model = TwoHeads(trunk, 32).eval()
    x, _ = batch(model)
    graph = PruningGraph(model, x[:1])
    assert "trunk.blocks.0.attn.qkv" in graph.skipped and not any(g.heads for g in graph.groups)
    report = mtprune.prune(model, x[:1], "l1", target_macs=0.7, min_channels=2)
    assert report.macs_ratio < 0.8
    assert [(b.attn.num_heads, b.attn.head_dim) for b in trunk.blocks] == [(4, 8), (4, 8)]
    assert model(x)["a"].shape == (2, 3)
