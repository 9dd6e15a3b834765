"""Attention heads as pruning units.

Multi-head attention splits its inner width into ``num_heads`` blocks of ``head_dim`` channels, and q, k and v
are read with one reshape, so channels cannot be removed one by one: channel ``(h, d)`` of q is paired with
channel ``(h, d)`` of k (their dot product) and every head must keep the same ``head_dim``. The allowed removals
are whole heads, and the same number of channels from every remaining head, q, k, v and the output projection's
inputs together (the head-pruning recipe of Torch-Pruning, Fang et al., "DepGraph", CVPR 2023; head pruning as in
Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019).

Two layouts are recognised:

- ``"qkv"``: a timm-style ``Attention`` (``qkv`` and ``proj`` Linear layers, ``num_heads``, ``head_dim``): its
  inner width is a channel group of its own, rooted at ``proj``'s input channels so that channel ``i`` maps to
  rows ``i``, ``C + i`` and ``2C + i`` of ``qkv``; ``num_heads``, ``head_dim``, ``attn_dim`` and ``scale``
  (``head_dim ** -0.5``, as the fused kernel uses) are updated.
- ``"mha"``: ``nn.MultiheadAttention`` (torchvision ViT): its inner width *is* its embedding width, so the heads
  constrain the embedding (residual) group; ``num_heads`` and ``head_dim`` are updated.

Window attention (Swin, MaxViT) is refused before anything is traced (:func:`refuse_unsupported`): Torch-Pruning's
index mapping through their window partitions exceeded 16 GB (issue 14).

``pruning/graph.py`` builds the groups and calls this module (it alone imports Torch-Pruning); the allocator picks
head-consistent removals with :func:`select_heads`; the cost model scales attention products with
:func:`cost_touch` / :func:`cost_shape`; model files record :func:`head_layout`, rebuilt with :func:`layout_plan`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..utils.errors import MTPruneInputError

__all__ = ["HeadSpec", "cost_shape", "cost_touch", "find_qkv_attention", "head_layout", "head_spec", "hidden_layers",
           "is_qkv_map", "layout_plan", "refuse_unsupported", "select_heads", "snap_to_heads", "sync_widths",
           "update_heads"]

# class names of window-attention models whose tracing does not fit in bounded memory (issue 14)
_WINDOW_ATTENTION = {"ShiftedWindowAttention", "ShiftedWindowAttentionV2", "SwinTransformerBlock",
                     "SwinTransformerBlockV2", "SwinTransformerV2Block", "WindowAttention", "WindowMultiHeadAttention",
                     "MaxVitBlock", "PartitionAttentionLayer", "MaxxVitBlock", "ParallelMaxxVitBlock",
                     "PartitionAttention2d", "PartitionAttentionCl", "ParallelPartitionAttention"}


@dataclass(frozen=True)
class HeadSpec:
    """How a channel group's channels split into attention heads: head ``h`` is channels ``h*head_dim`` to
    ``(h+1)*head_dim - 1``."""

    kind: str  # "qkv" (timm-style Attention, its own group) or "mha" (nn.MultiheadAttention on the group)
    modules: tuple[str, ...]  # the attention modules whose num_heads / head_dim follow the group
    num_heads: int
    head_dim: int
    whole_heads_only: bool = False  # q/k normalised over head_dim: only whole heads may go
    via: str = ""  # "qkv": the output projection whose input channels root the group


def refuse_unsupported(model: nn.Module) -> None:
    """Refuse window-attention models (Swin, MaxViT) with one line, before anything is traced or changed."""
    for name, module in model.named_modules():
        if type(module).__name__ in _WINDOW_ATTENTION:
            raise MTPruneInputError(
                f"{name or 'the model'} is window attention ({type(module).__name__}, Swin/MaxViT family): not "
                "supported for structured pruning (Torch-Pruning's index mapping through window partitions does not "
                "fit in bounded memory); prune the convolutional or plain-attention parts of another model")


def _is_qkv_attention(m: nn.Module) -> bool:
    qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    return (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0
            and qkv.out_features == 3 * proj.in_features and proj.in_features % heads == 0
            and getattr(m, "head_dim", proj.in_features // heads) * heads == proj.in_features)


def find_qkv_attention(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{qkv layer name: (attention module name, proj layer name)}`` for every timm-style attention."""
    out = {}
    for name, m in model.named_modules():
        if _is_qkv_attention(m):
            prefix = f"{name}." if name else ""
            out[prefix + "qkv"] = (name, prefix + "proj")
    return out


def is_qkv_map(cmap: tuple[Sequence[int], Sequence[int]], channels: int) -> bool:
    """Whether a qkv layer's channel map is exactly channel ``i`` -> rows ``i``, ``C + i``, ``2C + i``."""
    roots, locs = cmap
    return set(zip(roots, locs, strict=True)) == {(i, i + j * channels) for i in range(channels) for j in range(3)}


def hidden_layers(model: nn.Module) -> set[str]:
    """Layers that run through a functional call inside an attention module (``nn.MultiheadAttention.out_proj``):
    they are not traced as layers, and are pruned with their attention module."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def _has_qk_norm(m: nn.Module) -> bool:
    return any(not isinstance(getattr(m, a, None), nn.Identity | type(None)) for a in ("q_norm", "k_norm"))


class _Submodules:
    """``dict(model.named_modules())``'s ``[]`` and ``get``, one name at a time (``get_submodule``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def get(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def __getitem__(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)


def head_spec(model: nn.Module, root: str, channels: int, members: Iterable[str],
              qkv: Mapping[str, tuple[str, str]]) -> HeadSpec | None:
    """The head structure a group must respect, ``None`` if it holds no attention. ``members``: the names of the
    group's out modules. Raises ``ValueError`` when attention modules on one group disagree on their heads (the
    group is then left unpruned)."""
    modules = _Submodules(model)  # looked up by name: listing every module for each group costs O(groups x modules)
    if root in qkv:
        attn_name, proj = qkv[root]
        attn = modules[attn_name]
        return HeadSpec("qkv", (attn_name,), attn.num_heads, channels // attn.num_heads,
                        whole_heads_only=_has_qk_norm(attn), via=proj)
    mhas = [n for n in members if isinstance(modules.get(n), nn.MultiheadAttention)]
    if not mhas:
        return None
    shapes = {(modules[n].num_heads, modules[n].embed_dim) for n in mhas}
    if len(shapes) != 1 or next(iter(shapes))[1] != channels:
        raise ValueError(f"attention modules {mhas} on one channel group have different head layouts {shapes}")
    heads, embed = shapes.pop()
    return HeadSpec("mha", tuple(mhas), heads, embed // heads)


def _options(spec: HeadSpec, keep_at_least: int) -> list[tuple[int, int]]:
    """Every ``(whole heads removed, channels removed from each remaining head)`` that keeps enough channels."""
    h, d = spec.num_heads, spec.head_dim
    dims = [0] if spec.whole_heads_only else range(d)
    return [(n, r) for n in range(h) for r in dims if (h - n) * (d - r) >= max(keep_at_least, 1)]


def select_heads(spec: HeadSpec, scores: Tensor, k: int, keep_at_least: int = 1) -> list[int]:
    """The head-consistent removal nearest to ``k`` channels with the lowest total score: ``n`` whole heads of
    lowest summed score, then the ``r`` lowest channels of every remaining head. Channel indices, sorted."""
    h, d = spec.num_heads, spec.head_dim
    if k <= 0:
        return []
    s = scores.detach().double().reshape(h, d)
    per_head, order = s.sort(dim=1)
    cum = torch.cat([per_head.new_zeros(h, 1), per_head.cumsum(1)], dim=1)  # cum[h, r]: its r lowest channels
    head_rank = s.sum(1).argsort(stable=True)
    best: tuple[int, float, int, int] | None = None
    for n, r in _options(spec, keep_at_least):
        removed = n * d + r * (h - n)
        cost = float(s.sum(1)[head_rank[:n]].sum() + cum[head_rank[n:], r].sum())
        key = (abs(removed - k), cost)
        if best is None or key < best[:2]:
            best = (key[0], key[1], n, r)
    if best is None:
        return []
    _, _, n, r = best
    gone = [int(x) * d + j for x in head_rank[:n] for j in range(d)]
    gone += [int(x) * d + int(j) for x in head_rank[n:] for j in order[int(x), :r]]
    return sorted(gone)


def snap_to_heads(spec: HeadSpec, idxs: Sequence[int], keep_at_least: int = 1) -> list[int]:
    """A head-consistent removal that covers as many of ``idxs`` as possible with about as many channels
    (``idxs`` itself when it already is one)."""
    scores = torch.ones(spec.num_heads * spec.head_dim)
    scores[list(idxs)] = 0.0
    return select_heads(spec, scores, len(idxs), keep_at_least)


def removed_heads(spec: HeadSpec, idxs: Sequence[int]) -> tuple[int, int]:
    """``(whole heads removed, channels removed per remaining head)`` of a head-consistent removal."""
    per_head = torch.bincount(torch.tensor(list(idxs), dtype=torch.long) // spec.head_dim,
                              minlength=spec.num_heads)
    whole = int((per_head == spec.head_dim).sum())
    rest = per_head[per_head < spec.head_dim]
    if len(rest) and not bool((rest == rest[0]).all()):
        raise ValueError(f"removal of {len(idxs)} channels is not head-consistent for {spec.modules}")
    return whole, int(rest[0]) if len(rest) else 0


def update_heads(model: nn.Module, spec: HeadSpec, idxs: Sequence[int]) -> None:
    """Set ``num_heads`` / ``head_dim`` (and timm's ``attn_dim`` and ``scale``) of the group's attention modules for
    the removal of ``idxs``. Called before Torch-Pruning removes the channels (its MultiheadAttention pruner checks
    divisibility by ``num_heads`` and derives ``head_dim`` from it)."""
    whole, per_head = removed_heads(spec, idxs)
    heads, dim = spec.num_heads - whole, spec.head_dim - per_head
    for name in spec.modules:
        m = model.get_submodule(name)
        m.num_heads = heads
        m.head_dim = dim
        if spec.kind == "qkv":
            if hasattr(m, "attn_dim"):
                m.attn_dim = heads * dim
            if hasattr(m, "scale"):
                m.scale = dim ** -0.5


def sync_widths(model: nn.Module) -> None:
    """After pruning, set the embedding widths that vision transformers read from attributes rather than from
    their layers: torchvision ``VisionTransformer.hidden_dim`` (used by its patch reshape), timm's ``embed_dim`` /
    ``num_features`` (informational)."""
    for m in model.modules():
        stem = getattr(m, "conv_proj", None)
        if isinstance(stem, nn.Conv2d) and isinstance(getattr(m, "hidden_dim", None), int):
            m.hidden_dim = stem.out_channels
        patch = getattr(getattr(m, "patch_embed", None), "proj", None)
        if isinstance(patch, nn.Conv2d) and isinstance(getattr(m, "embed_dim", None), int):
            m.embed_dim = patch.out_channels
            for attr in ("num_features", "head_hidden_size"):
                if getattr(m, attr, None) == getattr(m, "embed_dim", None) or isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, patch.out_channels)


def head_layout(model: nn.Module) -> dict[str, list[int]]:
    """``{attention module: [num_heads, head_dim]}`` of every timm-style attention and ``nn.MultiheadAttention``:
    what a model file records, since the weights' shapes alone do not tell 3 heads of 8 from 4 heads of 6."""
    return {n: [int(m.num_heads), int(m.head_dim)] for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) or _is_qkv_attention(m)}


def layout_plan(spec: HeadSpec, layout: object) -> list[int]:
    """The channels to remove from a fresh group so that its attention has ``layout = [num_heads, head_dim]``:
    the last heads, and the last channels of every kept head (the weights are loaded afterwards)."""
    if (not isinstance(layout, list | tuple) or len(layout) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in layout)
            or not (1 <= layout[0] <= spec.num_heads and 1 <= layout[1] <= spec.head_dim)):
        raise MTPruneInputError(f"head layout {layout!r} of {spec.modules[0]} must be [num_heads, head_dim] within "
                                f"[{spec.num_heads}, {spec.head_dim}]")
    heads, dim = layout
    return [h * spec.head_dim + d for h in range(spec.num_heads) for d in range(spec.head_dim)
            if h >= heads or d >= dim]


def cost_touch(group: object) -> list[tuple[str, str, Tensor]]:
    """The attention modules whose own MACs (attention products; MultiheadAttention's ``in_proj``, a functional
    call) a group's channels change, as ``(module, "in"/"out", channels per group channel)`` cost entries."""
    spec = getattr(group, "heads", None)
    if spec is None:
        return []
    ones = torch.ones(group.channels, dtype=torch.float64)
    sides = ("out",) if spec.kind == "qkv" else ("in", "out")
    return [(n, side, ones) for n in spec.modules for side in sides]


def cost_shape(module: nn.Module) -> tuple[str, int, int] | None:
    """How an attention module's own MACs scale, as ``(kind, width, weights)`` for the cost model: timm-style
    attention products (``QKᵀ`` and ``AV``) are linear in the inner width ("depthwise"); a MultiheadAttention's
    ``in_proj`` is quadratic in its embedding width ("linear"; its products, linear, are a small part)."""
    if isinstance(module, nn.MultiheadAttention):
        weight = module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight
        return "linear", module.embed_dim, int(weight.numel()) * (1 if module.in_proj_weight is not None else 3)
    if _is_qkv_attention(module):
        return "depthwise", module.proj.in_features, 0
    return None
