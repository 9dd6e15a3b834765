"""Suite ``disparse2022``: DiSparse (Sun et al., CVPR 2022) against its baselines on ``synthetic_scenes``.

``mtprune bench disparse2022 [--scale small|cpu|gpu]`` or ``python -m mtprune.bench.disparse2022 --out DIR``.
Per seed, one dense model is trained first (the Δm reference and the start of the pretrained methods); then every
method runs at every sparsity through the ``mtprune sparsify`` pipeline (``sparsity/run.py``), each in its own run
directory (runs already finished are skipped, so the suite always resumes). Results: ``results.json``,
``results.md`` (mean ± std over seeds) and ``delta_m.png`` under ``benchmarks/results/disparse2022/``; the
command line is recorded.

Besides mtprune's DiSparse (the paper's text), two variants follow the released code
(SHI-Labs/DiSparse-Multitask-Model-Compression): ``disparse_static_released`` scores a Xavier-normal
re-initialised copy; ``disparse_dynamic_released`` uses ERK with exponent 0.9 and each task's own top-n regrowth,
united in the backbone.

Scales: ``cpu`` (the default; 3 seeds, 50/70/90 %, CPU-sized settings in ``SETTINGS``), ``gpu`` (the same runs;
the device is picked by ``device: auto``), ``small`` (a smoke run: one seed, 90 %, one epoch on 32 scenes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from ..config import apply_overrides, parse_config
from ..sparsity.analysis import watershed, watershed_share
from ..sparsity.run import run_sparsify
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from .common import command_line

SUITE = "disparse2022"
VARIANTS: dict[str, list[str]] = {  # name → overrides; the released code's choices (see the module docstring)
    "disparse_static_released": ["sparsify.method=disparse_static", "sparsify.score_init=xavier_normal"],
    "disparse_dynamic_released": ["sparsify.method=disparse_dynamic", "sparsify.dynamic.erk_power=0.9",
                                  "sparsify.dynamic.regrowth=per_task_union"],
}
METHODS = ["disparse_static", "disparse_pretrained", "disparse_dynamic", "snip", "random", "imp", "rigl",
           *VARIANTS]
SPARSITIES = [0.5, 0.7, 0.9]
FROM_DENSE = {"disparse_pretrained", "imp"}
SETTINGS = [  # CPU scale: a small Deeplab-ResNet-18 (width 0.125, conv heads), 512 training scenes, 20 epochs
    "model.width=0.125", "train.epochs=20", "train.lr=0.002",
    "sparsify.train={epochs: 20, batch_size: 16, lr: 0.002, scheduler: cosine}", "sparsify.batches=50",
    "sparsify.dynamic.delta_t=16", "sparsify.rounds=3", "sparsify.round_steps=32",
]
FINETUNE = "sparsify.train={epochs: 5, batch_size: 16, lr: 0.0005, scheduler: cosine}"  # pretrained methods
SMALL = [  # --scale small: a smoke run of the whole harness, minutes
    "data.kwargs={n_train: 32, n_val: 16}", "train.epochs=1",
    "sparsify.train={epochs: 1, batch_size: 16, lr: 0.002, scheduler: cosine}", "sparsify.batches=2",
    "sparsify.dynamic.delta_t=1", "sparsify.rounds=2", "sparsify.round_steps=2",
]
SCALES = {"small": {"seeds": [0], "sparsities": [0.9], "extra": SMALL,
                    "finetune": "sparsify.train={epochs: 1, batch_size: 16, lr: 0.0005, scheduler: cosine}"},
          "cpu": {"seeds": [0, 1, 2], "sparsities": SPARSITIES, "extra": [], "finetune": FINETUNE},
          "gpu": {"seeds": [0, 1, 2], "sparsities": SPARSITIES, "extra": [], "finetune": FINETUNE}}
KEYS = {"seg": ("miou", "pixel_acc"), "normal": ("mean", "median")}


def method_overrides(method: str) -> list[str]:
    """The config overrides that select ``method`` (a sparsify method or one of ``VARIANTS``)."""
    return list(VARIANTS.get(method, [f"sparsify.method={method}"]))


def _config(base: Path, overrides: list[str]):
    raw = yaml.safe_load(base.read_text())
    return parse_config(apply_overrides(raw, overrides), str(base))


def _dense(base: Path, run_dir: Path, overrides: list[str], quiet: bool) -> Path:
    """Train the dense model of one seed (the Δm reference and the start of the pretrained methods)."""
    path = run_dir / "model.mtp"
    if not path.is_file():
        from .. import recipe
        from ..engine.trainer import Trainer
        from ..io import save
        from ..utils.runtime import seed_everything

        cfg = _config(base, overrides)
        tasks = recipe.build_tasks(cfg)
        train_set, val_set = recipe.build_datasets(cfg, tasks)
        seed_everything(cfg.seed)
        model = recipe.build_configured_model(cfg, tasks)
        Trainer(model, tasks, train_set, val_set, run_dir, recipe.train_options(cfg, quiet=quiet)).fit()
        save(model, path, example_inputs=val_set[0][0].unsqueeze(0))
    return path


def run_all(base: Path, out: Path, methods: list[str], sparsities: list[float], seeds: list[int],
            extra: list[str], quiet: bool = True, finetune: str = FINETUNE) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        common = [*SETTINGS, *extra, f"seed={seed}"]
        dense_mtp = _dense(base, out / "runs" / f"dense_seed{seed}", common, quiet)
        for method in methods:
            for s in sparsities:
                name = f"{method}_{int(round(s * 100))}_seed{seed}"
                run_dir = out / "runs" / name
                overrides = [*common, *method_overrides(method), f"sparsify.sparsity={s}",
                             f"sparsify.start={dense_mtp}", f"name={name}"]
                if method in FROM_DENSE:
                    overrides.append(finetune)
                if _stale(run_dir, overrides):  # another setting's run: never reported as this one
                    shutil.rmtree(run_dir)
                if not (run_dir / "summary.json").is_file():
                    run_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(run_dir / "overrides.json", overrides)
                    start = time.perf_counter()
                    summary = run_sparsify(_config(base, overrides), run_dir, quiet=quiet)
                    summary["wall_s"] = time.perf_counter() - start
                    atomic_write_json(run_dir / "summary.json", summary)
                summary = json.loads((run_dir / "summary.json").read_text())
                dense_row, sparse_row = summary["models"][0], summary["models"][-1]
                rows.append({"method": method, "target": s, "seed": seed,
                             "sparsity": summary["sparsity"]["sparsity"], "metrics": sparse_row["metrics"],
                             "dense": dense_row["metrics"], "delta_m": sparse_row["delta_m"],
                             "keep_ratio": summary["sparsity"].get("keep_ratio"),
                             "agreement": summary["sparsity"].get("agreement"),
                             "watershed": _watershed_of(summary["sparsity"]),
                             "latency_masked_ms": summary["latency"]["masked_ms"],
                             "latency_baked_ms": summary["latency"]["dense_ms"],
                             "bitmask_bytes": summary["sparsity"]["storage"]["bitmask_bytes"],
                             "dense_bytes": summary["sparsity"]["storage"]["dense_bytes"],
                             "wall_s": summary.get("wall_s")})
    result = {"command": command_line(SUITE),
              "settings": SETTINGS + extra, "finetune": finetune, "variants": VARIANTS, "seeds": seeds, "rows": rows}
    atomic_write_json(out / "results.json", result)
    write_results(out, result)
    return result


def _stale(run_dir: Path, overrides: list[str]) -> bool:
    """A run directory made with other overrides (recorded in ``overrides.json``; directories from before the
    record existed are taken as they are)."""
    path = run_dir / "overrides.json"
    return path.is_file() and json.loads(path.read_text()) != overrides


def _stat(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


PAIRS = [("disparse_static", "snip"), ("disparse_dynamic", "rigl"), ("disparse_pretrained", "imp"),
         ("disparse_static_released", "snip"), ("disparse_dynamic_released", "rigl")]


def _comparisons(rows: list[dict]) -> list[str]:
    """For each DiSparse variant and its counterpart, per target: mean Δm and the seeds where DiSparse wins."""
    out = []
    for ours, theirs in PAIRS:
        for target in sorted({r["target"] for r in rows}):
            by_seed = {}
            for r in rows:
                if r["target"] == target and r["method"] in (ours, theirs) and r["delta_m"] is not None:
                    by_seed.setdefault(r["seed"], {})[r["method"]] = r["delta_m"]
            pairs = [v for v in by_seed.values() if len(v) == 2]
            if not pairs:
                continue
            wins = sum(v[ours] >= v[theirs] for v in pairs)
            a, b = statistics.fmean(v[ours] for v in pairs), statistics.fmean(v[theirs] for v in pairs)
            verdict = "holds" if a >= b else "does not hold"
            out.append(f"- {target:.0%}: {ours} Δm {a:+.2f} vs {theirs} {b:+.2f}: {verdict} on the mean; "
                       f"{ours} ≥ {theirs} in {wins} of {len(pairs)} seeds.")
    return out


def _watershed_of(sparsity: dict) -> str | None:
    """A run's watershed layer, recomputed from its recorded agreement with the current definition (runs made
    before a change of ``sparsity.analysis.watershed`` keep their masks' agreement, not a stale layer name)."""
    agreement = sparsity.get("agreement")
    return watershed(agreement) if agreement else sparsity.get("watershed")


def _watersheds(rows: list[dict]) -> list[str]:
    """Per DiSparse method and target, the watershed layers of its seeds (where the tasks' mask agreement falls
    most, ``sparsity.analysis.watershed``), the most frequent first, and the mean agreement of the first and the
    last shared layer."""
    groups: dict[tuple, list[str]] = {}
    ends: dict[tuple, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r.get("watershed"):
            groups.setdefault((r["method"], r["target"]), []).append(r["watershed"])
        if r.get("agreement"):
            values = list(r["agreement"].values())
            ends.setdefault((r["method"], r["target"]), []).append((values[0], values[-1],
                                                                    watershed_share(r["agreement"])))
    if not groups:
        return ["- No run recorded per-task masks (only the DiSparse methods do)."]
    every = Counter(layer for layers in groups.values() for layer in layers)
    (top, n), total = every.most_common(1)[0], sum(every.values())
    out = [f"- Most frequent: `{top}` in {n} of {total} DiSparse runs."]
    for (method, target), layers in sorted(groups.items()):
        counts = Counter(layers).most_common()
        pairs = ends.get((method, target))
        span = (f"; agreement {statistics.fmean(p[0] for p in pairs):.2f} at the first shared layer, "
                f"{statistics.fmean(p[1] for p in pairs):.2f} at the last; the watershed's step is "
                f"{statistics.fmean(p[2] for p in pairs):.0%} of the whole fall" if pairs else "")
        out.append(f"- {method} {target:.0%}: " + ", ".join(f"`{layer}` ({k} of {len(layers)} seeds)"
                                                           for layer, k in counts) + span)
    return out


def _speed(rows: list[dict]) -> list[str]:
    out = []
    for target in sorted({r["target"] for r in rows}):
        rs = [r for r in rows if r["target"] == target]
        masked = statistics.fmean(r["latency_masked_ms"] for r in rs)
        baked = statistics.fmean(r["latency_baked_ms"] for r in rs)
        ratio = statistics.fmean(r["bitmask_bytes"] / r["dense_bytes"] for r in rs)
        out.append(f"- {target:.0%}: latency {masked:.2f} ms with the masks attached, {baked:.2f} ms with them "
                   f"baked in (dense kernels: no speed-up); stored size with a bitmask encoding {ratio:.1%} of "
                   "the dense size.")
    out.append("- Latencies: batch 1 on the CPU with the benchmark's thread count (see each run's summary.json).")
    return out


def write_results(out: Path, result: dict) -> None:
    """results.md: mean ± std over seeds of each metric and of Δm; delta_m.png: Δm against sparsity."""
    rows = result["rows"]
    cols = [f"{t} {m}" for t, ms in KEYS.items() for m in ms]
    lines = ["| method | target | achieved | " + " | ".join(cols) + " | Δm % |", "|---" * (len(cols) + 4) + "|"]
    dense = {}
    for r in rows:
        dense.setdefault(r["seed"], r["dense"])
    cells = [_stat([d[t][m] for d in dense.values()]) for t, ms in KEYS.items() for m in ms]
    lines.append("| dense | 0 % | 0 % | " + " | ".join(cells) + " | 0.00 |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    for (target, method), rs in sorted(groups.items()):
        cells = [_stat([r["metrics"][t][m] for r in rs]) for t, ms in KEYS.items() for m in ms]
        dms = [r["delta_m"] for r in rs if r["delta_m"] is not None]
        lines.append(f"| {method} | {target:.0%} | {statistics.fmean(r['sparsity'] for r in rs):.2%} | "
                     + " | ".join(cells) + f" | {_stat(dms) if dms else '–'} |")
    text = ["# DiSparse and baselines on synthetic_scenes (seg + normal)", "",
            f"Command: `{result['command']}` (seeds {result['seeds']}; mean ± std over seeds).", "",
            f"Settings: `{'; '.join(result['settings'])}`; the pretrained methods (disparse_pretrained, imp) start "
            f"from the dense model of the same seed and fine-tune with `{result['finetune']}`; the others start "
            "from the seed's initialisation. IMP trains 3 rounds × 32 iterations before its fine-tuning, "
            "disparse_pretrained only fine-tunes. Metrics are the final weights' on the validation split; Δm "
            "(higher is better) is against the dense model of the same seed. The `_released` variants follow "
            "the released DiSparse code: "
            + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in result.get("variants", {}).items()) + ".", "",
            "\n".join(lines), "",
            "## The paper's direction (Sun et al. 2022: DiSparse ≥ its single-ranking counterpart)", "",
            *_comparisons(rows), "",
            "## The watershed layer (Sun et al. 2022: the tasks' masks agree up to a layer, then diverge)", "",
            *_watersheds(rows), "", "## Storage and speed", "", *_speed(rows), ""]
    atomic_write_text(out / "results.md", "\n".join(text))
    from ..report.plots import _save, plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = []
        for target in sorted({r["target"] for r in rows}):
            dms = [r["delta_m"] for r in rows if r["method"] == method and r["target"] == target
                   and r["delta_m"] is not None]
            if dms:
                pts.append((target * 100, statistics.fmean(dms), statistics.stdev(dms) if len(dms) > 1 else 0.0))
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=method)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("Δm vs dense (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Multi-task score against sparsity (higher is better)")
    _save(fig, out / "delta_m.png")


def run(scale: str = "cpu", out=None, threads: int | None = 1, resume: bool = False,
        seeds: tuple[int, ...] | None = None, **_) -> dict:
    """``mtprune bench disparse2022``: the suite at ``scale`` (``seeds``: a subset of its seeds); finished run
    directories are always skipped."""
    if scale not in SCALES:
        raise MTPruneInputError(f"{SUITE}: scale must be one of {sorted(SCALES)}, got {scale!r}")
    argv = ["--threads", str(threads or 1), "--scale", scale] + (["--out", str(out)] if out else [])
    argv += ["--seeds", ",".join(str(s) for s in seeds)] if seeds else []
    main(argv)
    return {"suite": SUITE, "scale": scale}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/sparsify_synthetic.yaml")
    p.add_argument("--out", default=f"benchmarks/results/{SUITE}")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sparsities", default=None, help="default: the scale's")
    p.add_argument("--seeds", default=None, help="default: the scale's")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (2 threads on 2 shared cores: 10× slower)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = SCALES[args.scale]
    sparsities = [float(x) for x in args.sparsities.split(",")] if args.sparsities else plan["sparsities"]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else plan["seeds"]
    run_all(Path(args.config), Path(args.out), args.methods.split(","), sparsities, seeds,
            [*plan["extra"], *args.overrides], finetune=plan["finetune"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
