"""Suite ``vit``: head-aware pruning of a small multi-task ViT against Torch-Pruning's own ViT recipe.

A timm ``VisionTransformer`` (28×28 input, 7×7 patches, 4 blocks of 4 heads, width 64) with two classification
heads is trained on ``multidigits`` (left and right digit). Each method then prunes a copy one-shot to the same
MAC targets:

- ``l1`` and ``taylor``: ``mtprune.prune`` (heads as units, ``pruning/attention.py``), global allocation;
- ``Torch-Pruning ViT recipe``: ``MetaPruner`` with ``GroupMagnitudeImportance``, ``num_heads`` per ``qkv`` and
  head-dim pruning, at the uniform channel ratio found by bisection to reach the same MACs (Fang et al.,
  DepGraph, CVPR 2023; its ``examples/transformers`` recipe).

Accuracy is reported one-shot and after ``ft_epochs`` of fine-tuning (the same for every method, and for the
dense model's "fine-tuned" column, so that extra training is not credited to pruning); MACs are measured with one
counter (``pruning.prune.count``) for every method. Results: ``benchmarks/results/vit/``. Timings in the JSON
are wall-clock seconds on whatever load the machine had.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..utils.atomic import atomic_write_json
from .common import machine, results_dir

TP_METHOD = "Torch-Pruning ViT recipe"
METHODS = ["l1", "taylor", TP_METHOD]
SETTINGS = {  # scale -> data, training and targets
    "small": {"n_train": 256, "n_val": 128, "epochs": 1, "ft_epochs": 0, "targets": [0.5]},
    "cpu": {"n_train": 6000, "n_val": 1000, "epochs": 10, "ft_epochs": 1, "targets": [0.7, 0.5]},
    "gpu": {"n_train": 6000, "n_val": 1000, "epochs": 30, "ft_epochs": 3, "targets": [0.7, 0.5, 0.3]},
}
TASKS = ("left", "right")


class DigitViT(nn.Module):
    """A ViT trunk (class token) with one linear head per digit."""

    def __init__(self, width: int = 64, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(img_size=28, patch_size=7, embed_dim=width, depth=depth, num_heads=heads,
                                       mlp_ratio=2.0, num_classes=0)
        self.heads = nn.ModuleDict({t: nn.Linear(width, 10) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        return {t: h(f) for t, h in self.heads.items()}


def _loaders(s: dict, seed: int) -> tuple[DataLoader, DataLoader]:
    from .. import data

    train = data.load("multidigits", split="train")
    val = data.load("multidigits", split="val")
    train = Subset(train, range(min(s["n_train"], len(train))))
    val = Subset(val, range(min(s["n_val"], len(val))))
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=64, shuffle=True, generator=gen),
            DataLoader(val, batch_size=256, shuffle=False))


def _loss(out: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
    return sum(nn.functional.cross_entropy(out[t], y[t]) for t in TASKS)


def _train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            _loss(model(x), y).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    model.eval()
    hits = dict.fromkeys(TASKS, 0)
    n = 0
    for x, y in loader:
        out = model(x)
        for t in TASKS:
            hits[t] += int((out[t].argmax(1) == y[t]).sum())
        n += len(x)
    acc = {t: 100.0 * hits[t] / n for t in TASKS}
    return {**acc, "mean": sum(acc.values()) / len(TASKS)}


def _tp_to_macs(model: nn.Module, x: Tensor, target: float) -> float:
    """Torch-Pruning's ViT recipe at the uniform channel ratio that keeps ``target`` of the MACs (bisection)."""
    from ..pruning.graph import PruningGraph, torch_pruning_magnitude
    from ..pruning.prune import count

    protected = PruningGraph(model, x).protected
    macs0 = count(model, x)[1]
    lo, hi = 0.0, 0.95
    best: tuple[float, float] | None = None  # (ratio, MACs kept)
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        torch_pruning_magnitude(trial, x, mid, protected, heads=True)
        kept = count(trial, x)[1] / macs0
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (mid, kept)
        lo, hi = (mid, hi) if kept > target else (lo, mid)
    torch_pruning_magnitude(model, x, best[0], protected, heads=True)
    return best[0]


def _layout(model: nn.Module) -> list[list[int]]:
    from ..pruning.attention import head_layout

    return list(head_layout(model).values())


def _prune(dense: nn.Module, method: str, target: float, x: Tensor, stats: DataLoader) -> tuple[nn.Module, dict]:
    from .. import tasks
    from ..pruning.prune import count, prune

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    if method == TP_METHOD:
        extra = {"channel_ratio": _tp_to_macs(model, x, target)}
    else:
        losses = {t: tasks.preset("multidigits")[t] for t in TASKS}
        report = prune(model, x, method, target_macs=target, data=stats, losses=losses, batches=8, min_channels=4)
        extra = {"fraction": report.extra.get("fraction")}
    seconds = time.perf_counter() - start
    params, macs = count(model, x)
    return model, {"params": params, "macs": macs, "prune_seconds": seconds, "heads": _layout(model), **extra}


def run(scale: str = "cpu", out=None, threads: int | None = 1, resume: bool = False, seed: int = 0,
        methods: list[str] | None = None, **_) -> dict:
    """Train the dense ViT, prune it with every method to every target, fine-tune, evaluate; write
    ``results.json`` and ``results.md``."""
    from ..pruning.prune import count

    if threads:
        torch.set_num_threads(int(threads))
    s = SETTINGS[scale]
    folder = results_dir("vit", out)
    torch.manual_seed(seed)
    train, val = _loaders(s, seed)
    x = next(iter(val))[0][:1]
    dense = DigitViT().eval()
    start = time.perf_counter()
    _train(dense, train, s["epochs"], lr=1e-3)
    params0, macs0 = count(dense, x)
    rows = [{"method": "dense", "target": 1.0, "macs_ratio": 1.0, "params": params0, "macs": macs0,
             "acc_oneshot": _accuracy(dense, val), "heads": _layout(dense),
             "train_seconds": time.perf_counter() - start}]
    tuned = copy.deepcopy(dense)  # the dense model trained as long as the pruned ones: the fine-tuned reference
    torch.manual_seed(seed)
    _train(tuned, train, s["ft_epochs"], lr=5e-4)
    rows[0]["acc_finetuned"] = _accuracy(tuned, val)
    for target in s["targets"]:
        for method in methods or METHODS:
            torch.manual_seed(seed)
            model, row = _prune(dense, method, target, x, train)
            row.update(method=method, target=target, macs_ratio=row["macs"] / macs0, acc_oneshot=_accuracy(model, val))
            torch.manual_seed(seed)
            _train(model, train, s["ft_epochs"], lr=5e-4)
            row["acc_finetuned"] = _accuracy(model, val)
            rows.append(row)
    result = {"suite": "vit", "scale": scale, "machine": machine(), "settings": s, "seed": seed, "rows": rows}
    atomic_write_json(folder / "results.json", result)
    (folder / "results.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """A table of mean accuracy (one-shot and fine-tuned) against measured MACs, per method and target."""
    lines = [f"# ViT: head-aware pruning against Torch-Pruning's ViT recipe ({result['scale']} scale)", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} thread(s). Mean accuracy "
             "(%) over the left/right digit tasks of multidigits; MACs measured by one counter for every method.",
             "", "| method | target | MACs kept | params | heads × head_dim | acc one-shot | acc fine-tuned |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        heads = ", ".join(f"{h}×{d}" for h, d in r["heads"])
        lines.append(f"| {r['method']} | {r['target']:.2f} | {r['macs_ratio']:.3f} | {r['params']:,} | {heads} | "
                     f"{r['acc_oneshot']['mean']:.1f} | {r['acc_finetuned']['mean']:.1f} |")
    return "\n".join(lines) + "\n"
