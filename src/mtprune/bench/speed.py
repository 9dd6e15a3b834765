"""Suite ``speed``: does removing MACs buy real latency, and what does the statistics engine cost?

1. Latency speed-up against MACs reduction after structured pruning (L1, global ranking) at several MACs
   targets, for a 3-task Deeplab-ResNet-34 with ASPP-v2 heads: dense and pruned are timed side by side in one
   process (same threads, batch and input).
2. The statistics engine (one forward, T backward passes) against the loop of T forward+backward passes that
   DiSparse's released code runs, both gathering the same per-task weight gradients.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from ..measure import measure_latency
from ..models import build_model
from ..pruning.criteria import Criterion
from ..pruning.graph import PruningGraph
from ..pruning.prune import as_losses, count, prune
from ..pruning.stats import TASK_WEIGHT_GRADS, StatisticsEngine
from ..report.plots import _save, plt
from ..tasks import preset
from ..utils.atomic import atomic_write_json, atomic_write_text
from .common import machine, results_dir

SCALES = {
    # name: (model, width, head hidden, input H, W, batch)
    "cpu": ("deeplab_resnet34", 1.0, 1024, 128, 160, 4),
    "small": ("deeplab_resnet34", 0.25, 128, 64, 80, 4),
    "gpu": ("deeplab_resnet34", 1.0, 1024, 288, 384, 8),
}




def _fake_batch(tasks, batch: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, h, w, generator=g)
    targets = {
        "seg": torch.randint(0, tasks["seg"].out_channels, (batch, h, w), generator=g),
        "depth": torch.rand(batch, 1, h, w, generator=g) + 0.1,
        "normal": torch.nn.functional.normalize(torch.randn(batch, 3, h, w, generator=g), dim=1),
    }
    return x, targets


def _loop_stats(model, graph, losses, x, targets) -> None:
    """DiSparse's way: T separate forward+backward passes, copying each task's weight gradients."""
    modules = dict(model.named_modules())
    producers = sorted({n for g in graph.groups for n in g.producers})
    for task, fn in losses.items():
        model.zero_grad(set_to_none=True)
        fn(model(x)[task], targets[task]).backward()
        _ = [modules[n].weight.grad.clone() for n in producers if modules[n].weight.grad is not None]


def _paired_latency(dense, pruned, repeats: int, device) -> tuple[float, float, list[float]]:
    """Time dense and pruned forwards alternately, one pair at a time, so load drift hits both alike.
    Returns the minimum of each (the least disturbed run) and the per-pair speed-ups; the table reports the
    minima and the median of the per-pair speed-ups."""
    pairs = []
    for _ in range(repeats):
        pairs.append((measure_latency(dense, warmup=1, repeats=1, device=device),
                      measure_latency(pruned, warmup=1, repeats=1, device=device)))
    return min(d for d, _ in pairs), min(p for _, p in pairs), [d / p for d, p in pairs]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(scale: str = "cpu", out: str | Path | None = None, targets=(0.5, 0.25, 0.1), repeats: int = 10,
        threads: int | None = 2, seed: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    name, width, hidden, h, w, batch = SCALES[scale]
    device = torch.device("cuda" if scale == "gpu" and torch.cuda.is_available() else "cpu")
    tasks = preset("nyuv2")
    torch.manual_seed(seed)
    dense = build_model(name, {t: k.out_channels for t, k in tasks.items()}, width=width,
                        head_kwargs={"hidden": hidden}).eval()
    x1 = torch.zeros(1, 3, h, w)
    xb = torch.rand(batch, 3, h, w, device=device)
    rows = []
    params0, macs0 = count(dense, x1)
    for target in targets:
        pruned = copy.deepcopy(dense)
        report = prune(pruned, x1, "l1", target_macs=target, min_channels=8)
        dense.to(device)
        pruned.to(device).eval()
        ld, lp, ratios = _paired_latency(lambda: dense(xb), lambda p=pruned: p(xb), repeats, device)
        macs_reduction = report.macs_before / report.macs_after
        rows.append({"target_macs": target, "macs_ratio": report.macs_ratio, "params_ratio": report.params_ratio,
                     "latency_dense_ms": ld, "latency_pruned_ms": lp, "speedup": statistics.median(ratios),
                     "speedup_per_pair": ratios,
                     "macs_reduction": macs_reduction, "speedup_over_macs_reduction": (ld / lp) / macs_reduction})
        dense.cpu()
        del pruned
    # statistics engine against the T-forward-backward loop
    model = copy.deepcopy(dense).to(device).train()
    graph = PruningGraph(model, x1.to(device))

    class _Needs(Criterion):  # asks the engine for per-task weight gradients and keeps nothing
        name, needs = "grads", frozenset({TASK_WEIGHT_GRADS})

        def batch_score(self, stats):
            return None

    losses = as_losses(tasks)
    engine = StatisticsEngine(model, graph, losses, [_Needs()], device=device)
    x, tg = _fake_batch(tasks, batch, h, w, seed)
    x, tg = x.to(device), {k: v.to(device) for k, v in tg.items()}
    t_engine = _time(lambda: engine.step(x, tg), max(repeats // 2, 3))
    t_loop = _time(lambda: _loop_stats(model, graph, losses, x, tg), max(repeats // 2, 3))
    result = {
        "suite": "speed", "scale": scale, "machine": machine(),
        "setting": {"model": name, "width": width, "head_hidden": hidden, "input": [3, h, w], "batch": batch,
                    "tasks": list(tasks), "device": str(device), "criterion": "l1", "allocator": "global"},
        "dense": {"params": params0, "macs": macs0},
        "latency": rows,
        "stats_engine": {"engine_s_per_batch": t_engine, "loop_s_per_batch": t_loop,
                         "ratio": t_engine / t_loop, "tasks": len(tasks)},
    }
    folder = results_dir("speed", out)
    atomic_write_json(folder / f"speed_{scale}.json", result)
    _plot(rows, folder / f"speed_{scale}.png", result["setting"])
    atomic_write_text(folder / f"speed_{scale}.md", _markdown(result))
    return result


def _plot(rows, path: Path, setting) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    red = [r["macs_reduction"] for r in rows]
    ax.plot(red, [r["speedup"] for r in rows], "o-", label="measured latency speed-up")
    top = max(red) * 1.1
    ax.plot([1, top], [1, top], "--", color="grey", label="ideal (= MACs reduction)")
    ax.set_xlabel("MACs reduction (×)")
    ax.set_ylabel("latency speed-up (×)")
    ax.set_title(f"{setting['model']} ×{setting['width']}, batch {setting['batch']}, {setting['device']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _markdown(r: dict) -> str:
    m, s = r["machine"], r["setting"]
    lines = [f"# speed ({r['scale']})", "",
             f"{s['model']} width {s['width']} with ASPP-v2 heads (hidden {s['head_hidden']}), tasks "
             f"{', '.join(s['tasks'])}, input {s['input']}, batch {s['batch']}, {m['threads']} threads on "
             f"{m['device']} ({m['cores']} cores), torch {m['torch']}, {m['date']}.", "",
             "| MACs kept (target) | MACs kept | params kept | dense ms | pruned ms | speed-up "
             "| MACs reduction "
             "| speed-up / MACs reduction |", "|---|---|---|---|---|---|---|---|"]
    for row in r["latency"]:
        lines.append(f"| {row['target_macs']} | {row['macs_ratio']:.3f} | {row['params_ratio']:.3f} | "
                     f"{row['latency_dense_ms']:.1f} | {row['latency_pruned_ms']:.1f} | {row['speedup']:.2f}× | "
                     f"{row['macs_reduction']:.2f}× | {row['speedup_over_macs_reduction']:.2f} |")
    e = r["stats_engine"]
    lines += ["", f"Statistics engine (1 forward + {e['tasks']} backward) {e['engine_s_per_batch'] * 1e3:.0f} ms per "
              f"batch against {e['loop_s_per_batch'] * 1e3:.0f} ms for {e['tasks']} forward+backward passes: "
              f"ratio **{e['ratio']:.2f}**.", ""]
    return "\n".join(lines)
