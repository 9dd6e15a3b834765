"""Suite ``speed``: does removing MACs buy real latency, what do sparse models store, what does the statistics
engine cost in time and memory?

1. **Latency against MACs.** Deeplab-ResNet-34 + ASPP-v2 heads (DiSparse), MobileNetV2 + DeepLab-v3 ASPP heads
   and VGG-16 + SmallASPP heads (Garg et al. 2023), each with seg/depth/normal heads, pruned with ``l1`` and
   global ranking at several MACs targets. Dense and pruned forwards are timed in alternating pairs in one
   process (same threads, batch and input); the table gives the minimum of each and the median of the per-pair
   speed-ups. On CUDA the times are CUDA-event times (synchronised), and AMP (autocast fp16) is timed too.
2. **Stored size of sparse models.** Magnitude masks (per layer) at 50/70/90/98 % on every conv/linear weight of
   the Deeplab-ResNet-34 model: bytes of the dense fp32 tensors, of the ``.mtp`` file actually written (dense
   weights + bit-packed masks), of the bitmask encoding (bit-packed masks + kept values, computed) and of the
   tensors of the CSR export (``sparsity.export.export_csr``, int64 indices as torch stores them).
3. **Statistics engine against the loop.** One forward + T backward passes against T forward+backward passes
   (DiSparse's released code), both gathering the same per-task weight gradients.
4. **Peak memory against model size.** One statistics step of Deeplab-ResNet-18 at increasing widths, for a
   reduction-only criterion (``taylor``: per-channel gate statistics), a per-task weight-gradient criterion
   (``cosprune``) and, for reference, one plain forward + summed-loss backward.
5. and 6. **Side by side** (dense, mtprune at equal MACs, mtprune at equal latency, Torch-Pruning; fidelity =
   speed-up × MACs kept; 5b: mtprune at equal MACs with widths on the device's measured channel blocks, and with
   the ranking's near-ties reordered by latency) and **time to prune** against Torch-Pruning's MetaPruner:
   ``bench/speed_compare.py``.
7. **Latency floor and fidelity ceiling.** Per model, every prunable layer cut to its minimum width
   (``min_channels``, as the pruned rows) and timed alongside the dense model. No allocation runs faster than
   this floor (norms, activations, upsampling, the unprunable first and last layers and per-call overheads
   remain), so at MACs t the speed-up is at most dense / floor and the fidelity at most t × dense / floor (capped
   at 1.0, latency falling exactly as MACs do): how far each method is from what is achievable at all.

How peak memory is measured (CPU): the measurements run in a fresh Python subprocess started with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so every tensor buffer is its own ``mmap`` and is returned to the OS
when freed: the resident set then follows live memory. Before each measurement the kernel's peak-RSS counter is
reset (``5`` written to ``/proc/self/clear_refs``) and the baseline ``VmRSS`` read; the peak ``VmHWM`` minus that
baseline is the step's peak extra memory, and ``VmRSS`` after the steps minus the baseline what it keeps across
batches. Every step runs once before any measurement, so one-time allocations (thread pools, kernel caches) are
not counted. On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` gives the same
directly. Without a writable ``/proc/self/clear_refs`` (not Linux) the CPU peaks are not recorded.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.ticker import FuncFormatter
from torch import Tensor, nn

from ..io import save
from ..models import build_model
from ..pruning.criteria import Criterion, get_criterion
from ..pruning.graph import PruningGraph
from ..pruning.latency import interleaved_times, median_ratios
from ..pruning.prune import as_losses, prune
from ..pruning.stats import TASK_WEIGHT_GRADS, StatisticsEngine
from ..report.plots import _save, plt
from ..sparsity.export import export_csr
from ..sparsity.masks import apply_masks, maskable_layers, param_name
from ..sparsity.storage import stored_size
from ..tasks import preset
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from .common import Entries, command_line, fingerprint, machine, results_dir, timing_identity, where
from .speed_compare import (
    COMPARE,
    SIDE_VERSION,
    hardware_entry,
    hardware_fingerprint,
    prune_time_entry,
    side_by_side_entry,
)
from .speed_compare import markdown as compare_markdown

# label: (zoo model, head, head arguments at width 1); the heads' widths scale with the model's width
CPU_MODELS = {
    "Deeplab-ResNet-34 + ASPP-v2": ("deeplab_resnet34", "aspp_v2", {"hidden": 1024}),
    "MobileNetV2 + DeepLab-v3 ASPP": ("mobilenetv2", "deeplabv3_aspp", {"channels": 256}),
    "VGG-16 + SmallASPP": ("vgg16", "small_aspp", {"hidden": 1024}),
    "MobileNetV2 + DeepLab-v3 ASPP, widths rounded to 16": ("mobilenetv2", "deeplabv3_aspp", {"channels": 256}),
}
# prune with round_to: oneDNN's depthwise and 1×1 kernels run in blocks of 8/16 channels on x86 CPUs
ROUND_TO = {"MobileNetV2 + DeepLab-v3 ASPP, widths rounded to 16": 16}
SMALL_MODELS = {  # the same models with thin heads of two ASPP branches (one atrous + pooling for DeepLab-v3)
    "Deeplab-ResNet-34 + ASPP-v2": ("deeplab_resnet34", "aspp_v2", {"hidden": 64, "dilations": [6, 12]}),
    "MobileNetV2 + DeepLab-v3 ASPP": ("mobilenetv2", "deeplabv3_aspp", {"channels": 64, "rates": [12]}),
    "VGG-16 + SmallASPP": ("vgg16", "small_aspp", {"hidden": 64, "dilations": [1, 2]}),
}
MEMORY_MODES = ("backward", "taylor", "cosprune")
MEMORY_BATCHES = 2  # batches per memory measurement: what is kept across batches shows
SPARSITIES = (0.5, 0.7, 0.9, 0.98)


@dataclass(frozen=True)
class Scale:
    models: dict
    width: float
    input: tuple[int, int]
    batch: int
    repeats: int
    tolerance: float  # of the MACs-target search
    memory_widths: tuple[float, ...]
    memory_hidden: int
    memory_input: tuple[int, int]
    memory_batch: int


SCALES = {
    "small": Scale(SMALL_MODELS, 0.25, (32, 40), 2, 3, 0.03, (0.125, 0.25), 64, (32, 40), 2),
    "cpu": Scale(CPU_MODELS, 1.0, (128, 160), 4, 10, 0.005, (0.25, 0.5, 1.0), 1024, (128, 160), 4),
    "gpu": Scale(CPU_MODELS, 1.0, (288, 384), 8, 20, 0.005, (0.25, 0.5, 1.0), 1024, (288, 384), 8),
}
MIN_CHANNELS = 8


def _channels(tasks) -> dict[str, int]:
    return {t: k.out_channels for t, k in tasks.items()}


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
    """Time dense and pruned forwards alternately (``latency.interleaved_times``, the timing function of latency
    targets too), so load drift hits both alike. Returns the minimum of each (the least disturbed run) and the
    per-pair speed-ups; the table reports the minima and the median of the per-pair speed-ups."""
    times = interleaved_times({"dense": dense, "pruned": pruned}, repeats, device=device)
    return min(times["dense"]), min(times["pruned"]), [d / p for d, p in zip(times["dense"], times["pruned"],
                                                                            strict=True)]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _build(spec: tuple, tasks, width: float) -> nn.Module:
    name, head, head_kwargs = spec
    torch.manual_seed(0)
    return build_model(name, _channels(tasks), width=width, head=head, head_kwargs=head_kwargs).eval()


# --------------------------------------------------------------------------------------- 1. latency vs MACs
def _latency_entry(dense: nn.Module, target: float, sc: Scale, device: torch.device, round_to: int = 1) -> dict:
    h, w = sc.input
    x1 = torch.zeros(1, 3, h, w)
    pruned = copy.deepcopy(dense)
    report = prune(pruned, x1, "l1", target_macs=target, min_channels=MIN_CHANNELS, tolerance=sc.tolerance,
                   round_to=round_to)
    dense, pruned = dense.to(device), pruned.to(device).eval()
    xb = torch.rand(sc.batch, 3, h, w, device=device)
    ld, lp, ratios = _paired_latency(lambda: dense(xb), lambda: pruned(xb), sc.repeats, device)
    reduction = report.macs_before / report.macs_after
    row = {"target_macs": target, "macs_ratio": report.macs_ratio, "params_ratio": report.params_ratio,
           "params_dense": report.params_before, "macs_dense": report.macs_before,
           "latency_dense_ms": ld, "latency_pruned_ms": lp, "speedup": statistics.median(ratios),
           "speedup_per_pair": ratios, "macs_reduction": reduction,
           "speedup_over_macs_reduction": statistics.median(ratios) / reduction}
    if device.type == "cuda":  # the same pairs under autocast fp16
        def amp(net):
            def fn():
                with torch.autocast("cuda", dtype=torch.float16):
                    return net(xb)
            return fn
        ad, ap, amp_ratios = _paired_latency(amp(dense), amp(pruned), sc.repeats, device)
        row["amp"] = {"latency_dense_ms": ad, "latency_pruned_ms": ap, "speedup": statistics.median(amp_ratios)}
    dense.cpu()
    return row


# ------------------------------------------------------------------------- 7. latency floor, fidelity ceiling
def floor_entry(dense: nn.Module, sc: Scale, device: torch.device) -> dict:
    """The model with every prunable layer at ``MIN_CHANNELS`` (``l1``, every group cut to the minimum), timed
    alongside the dense model with ``latency.interleaved_times``: its latency ratio bounds every allocation's."""
    h, w = sc.input
    x1 = torch.zeros(1, 3, h, w)
    thin = copy.deepcopy(dense)
    report = prune(thin, x1, "l1", channel_ratio=1 - 1e-9, allocator="layer", min_channels=MIN_CHANNELS)
    xb = torch.rand(sc.batch, 3, h, w, device=device)
    dense, thin = dense.to(device), thin.to(device).eval()
    times = interleaved_times({"dense": lambda: dense(xb), "floor": lambda: thin(xb)}, sc.repeats, device=device)
    dense.cpu()
    ratio = median_ratios(times, "dense")["floor"]
    return {"floor_ratio": ratio, "max_speedup": 1 / ratio, "macs_kept": report.macs_ratio,
            "params_kept": report.params_ratio, "dense_ms": min(times["dense"]), "floor_ms": min(times["floor"])}


def ceiling(floor_ratio: float, macs_kept: float) -> float:
    """The highest fidelity (speed-up × MACs kept) a model keeping ``macs_kept`` can reach above a latency floor
    of ``floor_ratio`` × dense: its speed-up is at most 1 / floor_ratio; capped at 1.0."""
    return min(1.0, macs_kept / floor_ratio)


def dense_efficiency_fidelity(floor_ratio: float, floor_macs: float, macs_kept: float) -> float:
    """The fidelity of a model keeping ``macs_kept`` if its compute above the floor (latency ``floor_ratio``, MACs
    ``floor_macs``, both relative to dense) costs per MAC what the dense model's compute above that floor costs:
    latency ratio f + (t - m_f) / (1 - m_f) × (1 - f). Not a hard bound (thin layers that fit a cache better can
    beat it); a fidelity aim above it asks thin layers to run faster per MAC than the dense ones do."""
    share = max(macs_kept - floor_macs, 0.0) / (1.0 - floor_macs)
    return min(1.0, macs_kept / (floor_ratio + share * (1.0 - floor_ratio)))


def _best_macs_variant(side_row: dict) -> tuple[str, float]:
    """The fastest mtprune model at MACs t in a side-by-side row (the plain ranking, or the hardware widths)."""
    hw = side_row.get("hardware", {})
    found = [("mtprune_macs", side_row["mtprune_macs"]["fidelity"])]
    found += [(k, hw[k]["fidelity"]) for k in ("mtprune_macs_hw", "mtprune_macs_hw_ties") if k in hw]
    return max(found, key=lambda kv: kv[1])


# ----------------------------------------------------------------------------------- 2. stored size of sparsity
def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's state tensors; a sparse CSR tensor counts its values and both index arrays."""
    total = 0
    for t in module.state_dict().values():
        if t.layout == torch.sparse_csr:
            total += sum(p.numel() * p.element_size() for p in (t.values(), t.crow_indices(), t.col_indices()))
        else:
            total += t.numel() * t.element_size()
    return total


def _magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, Tensor]:
    """Per layer, keep the ``1 - sparsity`` largest weights by magnitude."""
    masks = {}
    for name, layer in maskable_layers(model).items():
        magnitude = layer.weight.detach().abs()
        k = int(round(sparsity * magnitude.numel()))
        if k == 0:
            masks[param_name(name)] = torch.ones_like(magnitude, dtype=torch.bool)
            continue
        threshold = magnitude.flatten().kthvalue(k).values
        masks[param_name(name)] = magnitude > threshold
    return masks


def _storage_entry(dense: nn.Module, sparsity: float, x1: Tensor) -> dict:
    model = copy.deepcopy(dense)
    masks = _magnitude_masks(model, sparsity)
    apply_masks(model, masks)
    with tempfile.TemporaryDirectory() as tmp:
        mtp = save(model, Path(tmp) / "sparse.mtp", example_inputs=x1).stat().st_size
    csr = _tensor_bytes(export_csr(model))
    dense_bytes = _tensor_bytes(dense)
    bitmask = stored_size(model)["bitmask_bytes"]
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    return {"sparsity": sparsity, "measured_sparsity": 1 - kept, "dense_bytes": dense_bytes, "mtp_bytes": mtp,
            "bitmask_bytes": bitmask, "csr_bytes": csr, "mtp_ratio": mtp / dense_bytes,
            "bitmask_ratio": bitmask / dense_bytes, "csr_ratio": csr / dense_bytes}


# ------------------------------------------------------------------------------- 3. engine against the loop
class _Needs(Criterion):  # asks the engine for per-task weight gradients and keeps nothing
    name, needs = "grads", frozenset({TASK_WEIGHT_GRADS})

    def batch_score(self, stats):
        return None


def _engine_entry(dense: nn.Module, tasks, sc: Scale, device: torch.device, seed: int) -> dict:
    h, w = sc.input
    model = copy.deepcopy(dense).to(device).train()
    graph = PruningGraph(model, torch.zeros(1, 3, h, w, device=device))
    losses = as_losses(tasks)
    engine = StatisticsEngine(model, graph, losses, [_Needs()], device=device)
    x, tg = _fake_batch(tasks, sc.batch, h, w, seed)
    x, tg = x.to(device), {k: v.to(device) for k, v in tg.items()}
    repeats = max(sc.repeats // 2, 3)
    t_engine = _time(lambda: engine.step(x, tg), repeats)
    t_loop = _time(lambda: _loop_stats(model, graph, losses, x, tg), repeats)
    return {"engine_s_per_batch": t_engine, "loop_s_per_batch": t_loop, "ratio": t_engine / t_loop,
            "tasks": len(tasks)}


# ------------------------------------------------------------------------------------------- 4. peak memory
def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def can_reset_peak() -> bool:
    """Whether the kernel's peak-RSS counter of this process can be reset (Linux ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status("VmHWM")
    except (OSError, KeyError):
        return False
    return True


class PeakMeter:
    """Peak and retained extra memory of the code between ``start()`` and ``read()`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _proc_status("VmRSS")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")
        self.base = self._now()

    def read(self) -> tuple[int, int]:
        """(peak, retained) bytes above the baseline taken at ``start()``."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base, self._now() - self.base
        return _proc_status("VmHWM") - self.base, self._now() - self.base


def _memory_step(model: nn.Module, graph: PruningGraph, losses: dict, mode: str):
    if mode == "backward":  # reference: one forward and one backward of the summed loss, as a training step
        def step(x, tg):
            out = model(x)
            sum(fn(out[t], tg[t]) for t, fn in losses.items()).backward()
        return step
    return StatisticsEngine(model, graph, losses, [get_criterion(mode)]).step


def memory_probe(widths: list[float], hidden: int, h: int, w: int, batch: int, threads: int, device: str,
                 modes: list[str], batches: int = MEMORY_BATCHES) -> list[dict]:
    """Peak memory of one statistics step (over ``batches`` batches) per mode, Deeplab-ResNet-18 at each width.
    Meant to run in a fresh process (``_memory_section``)."""
    torch.set_num_threads(threads)
    gc.freeze()  # what exists now is never garbage: keeps each gc.collect() of PeakMeter.start() cheap
    dev = torch.device(device)
    tasks = preset("nyuv2")
    losses = as_losses(tasks)
    meter = PeakMeter(dev)
    rows = []
    for width in widths:
        model = _build(("deeplab_resnet18", "aspp_v2", {"hidden": hidden}), tasks, width).to(dev)
        graph = PruningGraph(model, torch.zeros(1, 3, h, w, device=dev))
        x, tg = _fake_batch(tasks, batch, h, w)
        x, tg = x.to(dev), {k: v.to(dev) for k, v in tg.items()}
        steps = {mode: _memory_step(model, graph, losses, mode) for mode in modes}
        for step in steps.values():  # warm-up: one-time allocations are not the step's
            step(x, tg)
            model.zero_grad(set_to_none=True)
        peak, kept = {}, {}
        for mode, step in steps.items():
            meter.start()
            for _ in range(batches):
                step(x, tg)
            peak[mode], kept[mode] = meter.read()
            model.zero_grad(set_to_none=True)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"width": width, "params": params, "weights_mb": params * 4 / 2**20,
                     "peak_mb": {k: v / 2**20 for k, v in peak.items()},
                     "retained_mb": {k: v / 2**20 for k, v in kept.items()}})
        del model, graph, steps
    return rows


def _memory_section(sc: Scale, threads: int, device: torch.device) -> dict:
    h, w = sc.memory_input
    info = {"model": "deeplab_resnet18", "head": "aspp_v2", "hidden": sc.memory_hidden, "input": [3, h, w],
            "batch": sc.memory_batch, "batches": MEMORY_BATCHES, "modes": list(MEMORY_MODES)}
    if device.type == "cpu" and not can_reset_peak():
        return {**info, "method": None, "rows": []}
    args = {"widths": list(sc.memory_widths), "hidden": sc.memory_hidden, "h": h, "w": w,
            "batch": sc.memory_batch, "threads": threads, "device": str(device), "modes": list(MEMORY_MODES)}
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = ("import json, sys; from mtprune.bench.speed import memory_probe; "
            "print(json.dumps(memory_probe(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe failed: {proc.stderr.strip()[-2000:]}")
    method = "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS (clear_refs), mmap'd tensors"
    return {**info, "method": method, "rows": json.loads(proc.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------------------------------- suite
def run(scale: str = "cpu", out: str | Path | None = None, threads: int | None = 2, resume: bool = False,
        targets: tuple[float, ...] = (0.5, 0.25, 0.1), sparsities: tuple[float, ...] = SPARSITIES,
        seed: int = 0, **_) -> dict:
    """Run the suite; one resumable entry per model × target, per sparsity, for the engine and for memory."""
    if scale not in SCALES:
        raise MTPruneInputError(f"unknown scale {scale!r} for the speed suite; known: {', '.join(SCALES)}")
    if threads:
        torch.set_num_threads(threads)
    sc = SCALES[scale]
    device = torch.device("cuda" if scale == "gpu" and torch.cuda.is_available() else "cpu")
    tasks = preset("nyuv2")
    h, w = sc.input
    x1 = torch.zeros(1, 3, h, w)
    folder = results_dir("speed", out)
    entries = Entries(folder, resume=resume)
    machine_id = timing_identity(device, threads)  # every entry here is measured: --resume elsewhere measures it again
    dense: dict[str, nn.Module] = {}

    def model(label: str) -> nn.Module:
        if label not in dense:
            dense[label] = _build(sc.models[label], tasks, sc.width)
        return dense[label]

    rows, side, floors = [], [], []
    cmp = COMPARE[scale]
    for label in sc.models:
        if label not in ROUND_TO:  # 7. the latency floor
            floors.append({"model": label, **entries.get(f"floor_{scale}_{sc.models[label][0]}",
                                                         lambda label=label: floor_entry(model(label), sc, device),
                                                         fingerprint("floor", machine_id))})
        for target in targets:
            r = ROUND_TO.get(label, 1)
            row = entries.get(f"latency_{scale}_{sc.models[label][0]}{f'_round{r}' if r > 1 else ''}_{target}",
                              lambda label=label, target=target, r=r: _latency_entry(model(label), target, sc, device,
                                                                                     round_to=r),
                              fingerprint("latency", machine_id))
            rows.append({"model": label, **row})
        # 5. side by side (the latency row rounds widths to the device's own channel blocking)
        if label not in ROUND_TO and (cmp.models is None or label in cmp.models):
            for target in cmp.targets:
                args = (target, sc.input, sc.batch, sc.repeats, sc.tolerance, MIN_CHANNELS, device,
                        threads or torch.get_num_threads(), cmp, folder / "latency_tables")
                row = entries.get(f"side_{scale}_{sc.models[label][0]}_{target}",
                                  lambda label=label, args=args: side_by_side_entry(model(label), *args),
                                  fingerprint("side", SIDE_VERSION, machine_id))
                # 5b. hardware widths at MACs t: entries of their own, so that those of section 5 stay valid
                hw = entries.get(f"side_hw_{scale}_{sc.models[label][0]}_{target}",
                                 lambda label=label, args=args: hardware_entry(model(label), *args),
                                 fingerprint(hardware_fingerprint(cmp, MIN_CHANNELS, sc.tolerance), machine_id))
                side.append({"model": label, **row, "hardware": hw})
        dense.pop(label, None)
    prune_time = [entries.get(f"prune_time_{scale}_{m}_{t}",
                              lambda m=m, t=t: prune_time_entry(m, cmp.prune_input, t, seed, cmp.prune_repeats),
                              fingerprint("prune_time", 2, cmp.prune_repeats, machine_id))  # 2: rounds on fresh copies
                  for m in cmp.prune_models for t in cmp.prune_targets]
    first = next(iter(sc.models))
    storage = [entries.get(f"storage_{scale}_{s}", lambda s=s: _storage_entry(model(first), s, x1))
               for s in sparsities]
    engine = entries.get(f"stats_engine_{scale}", lambda: _engine_entry(model(first), tasks, sc, device, seed),
                         fingerprint("stats_engine", machine_id))
    memory = entries.get(f"memory_{scale}", lambda: _memory_section(sc, threads or torch.get_num_threads(), device),
                         fingerprint("memory", machine_id))
    result = {
        "suite": "speed", "scale": scale, "machine": machine(), "command": command_line("speed"),
        "setting": {"input": [3, h, w], "batch": sc.batch, "width": sc.width, "tasks": list(tasks),
                    "device": str(device), "criterion": "l1", "allocator": "global", "min_channels": MIN_CHANNELS,
                    "pairs": sc.repeats, "models": {k: dict(zip(("model", "head", "head_kwargs"), v, strict=True))
                                                    for k, v in sc.models.items()}},
        "latency": rows,
        "storage": {"model": first, "masks": "magnitude, per layer, every conv/linear weight", "rows": storage},
        "stats_engine": {"model": first, **engine},
        "side_by_side": side,
        "floor": floors,
        "prune_time": prune_time,
        "memory": memory,
        "scale_config": asdict(sc),
    }
    atomic_write_json(folder / f"speed_{scale}.json", result)
    _plot_speed(rows, folder / f"speed_{scale}.png", result["setting"])
    _plot_memory(memory, folder / f"speed_memory_{scale}.png", len(tasks))
    atomic_write_text(folder / f"speed_{scale}.md", _markdown(result))
    return result


def _plot_speed(rows: list[dict], path: Path, setting: dict) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    top = max(r["macs_reduction"] for r in rows) * 1.1
    ax.plot([1, top], [1, top], "--", color="grey", label="ideal: speed-up = MACs reduction")
    for i, label in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = sorted((r for r in rows if r["model"] == label), key=lambda r: r["macs_reduction"])
        color = f"C{i}"
        ax.plot([r["macs_reduction"] for r in mine], [r["speedup"] for r in mine], "o-", color=color, label=label)
        if all("amp" in r for r in mine):
            ax.plot([r["macs_reduction"] for r in mine], [r["amp"]["speedup"] for r in mine], "s:", color=color,
                    label=f"{label} (AMP fp16)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("MACs reduction, dense / pruned (×)")
    ax.set_ylabel("latency speed-up, dense / pruned (×)")
    ax.set_title(f"width {setting['width']}, input {setting['input']}, batch {setting['batch']}, "
                 f"{setting['device']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def _plot_memory(memory: dict, path: Path, tasks: int) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    rows = memory["rows"]
    if rows:
        params = [r["params"] / 1e6 for r in rows]
        for mode in memory["modes"]:
            ax.plot(params, [r["peak_mb"][mode] for r in rows], "o-", label=f"{mode}: peak")
        ax.plot(params, [r["weights_mb"] for r in rows], ":", color="grey", label="fp32 weights")
        ax.plot(params, [tasks * r["weights_mb"] for r in rows], "--", color="grey",
                label=f"{tasks} × fp32 weights")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    else:
        ax.text(0.5, 0.5, "peak memory not measurable here", ha="center", transform=ax.transAxes)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("peak extra memory of the step (MiB)")
    ax.set_title(f"{memory['model']} + {memory['head']}, input {memory['input']}, batch {memory['batch']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def _markdown(r: dict) -> str:
    m, s = r["machine"], r["setting"]
    lines = [f"# speed ({r['scale']})", "", f"Command: `{r.get('command', 'mtprune bench speed')}`.", "",
             f"Tasks {', '.join(s['tasks'])}, width {s['width']}, input {s['input']}, batch {s['batch']}, "
             f"{m['threads']} threads on {where(m)} ({m['cores']} cores), torch {m['torch']}, {m['date']}.", "",
             "## Latency against MACs", "",
             f"`l1`, global ranking, min {s['min_channels']} channels; {s['pairs']} alternating dense/pruned pairs: "
             "minimum of each, median of the per-pair speed-ups.", "",
             "| model | MACs kept (target) | MACs kept | params kept | dense ms | pruned ms | speed-up "
             "| MACs reduction | speed-up / MACs reduction |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["latency"]:
        amp = f" (AMP {row['amp']['speedup']:.2f}×)" if "amp" in row else ""
        lines.append(f"| {row['model']} | {row['target_macs']} | {row['macs_ratio']:.3f} | {row['params_ratio']:.3f} "
                     f"| {row['latency_dense_ms']:.1f} | {row['latency_pruned_ms']:.1f} | {row['speedup']:.2f}×{amp} "
                     f"| {row['macs_reduction']:.2f}× | {row['speedup_over_macs_reduction']:.2f} |")
    st = r["storage"]
    lines += ["", f"## Stored size of sparse models ({st['model']}, {st['masks']})", "",
              "Ratios to the dense fp32 tensors. The `.mtp` file stores the weights dense plus the masks "
              "bit-packed, so it does not shrink; the bitmask encoding (masks + kept values) and the CSR export "
              "(int64 indices) do.", "",
              "| sparsity | dense MiB | `.mtp` file | bitmask + values | CSR export |", "|---|---|---|---|---|"]
    for row in st["rows"]:
        lines.append(f"| {row['sparsity']:.0%} | {row['dense_bytes'] / 2**20:.1f} | {row['mtp_ratio']:.3f} | "
                     f"{row['bitmask_ratio']:.3f} | {row['csr_ratio']:.3f} |")
    lines += compare_markdown(r["side_by_side"], r["prune_time"])
    lines += _ceiling_markdown(r.get("floor", []), r["side_by_side"], r["latency"])
    e = r["stats_engine"]
    lines += ["", "## Statistics engine against the loop", "",
              f"{e['model']}: the engine (1 forward + {e['tasks']} backward) {e['engine_s_per_batch'] * 1e3:.0f} ms "
              f"per batch against {e['loop_s_per_batch'] * 1e3:.0f} ms for {e['tasks']} forward+backward passes: "
              f"ratio **{e['ratio']:.2f}**."]
    mem = r["memory"]
    lines += ["", "## Peak memory of one statistics step against model size", "",
              f"{mem['model']} + {mem['head']} (hidden {mem['hidden']} at width 1), input {mem['input']}, batch "
              f"{mem['batch']}, {mem['batches']} batches per measurement; method: {mem['method']}. "
              "`backward` is one forward + summed-loss backward, for reference; `taylor` needs per-channel gate "
              "statistics only, `cosprune` the per-task weight gradients. Peak and (in brackets) kept after the "
              "batches, MiB above the baseline.", ""]
    if mem["rows"]:
        lines += ["| width | params | fp32 weights MiB | " + " | ".join(mem["modes"]) + " |",
                  "|---|---|---|" + "---|" * len(mem["modes"])]
        for row in mem["rows"]:
            cells = " | ".join(f"{row['peak_mb'][k]:.1f} ({row['retained_mb'][k]:.1f})" for k in mem["modes"])
            lines.append(f"| {row['width']} | {row['params']:,} | {row['weights_mb']:.1f} | {cells} |")
    else:
        lines.append("Not measured: this platform has no /proc/self/clear_refs.")
    return "\n".join(lines) + "\n"


def _ceiling_markdown(floors: list[dict], side: list[dict], latency: list[dict]) -> list[str]:
    """Section 7: each model's latency floor, and measured fidelity beside the ceiling it implies."""
    if not floors:
        return []
    lines = ["", "## Latency floor and fidelity ceiling", "",
             "Floor: every prunable layer at its minimum width, timed alongside the dense model (median per-round "
             "ratio). At MACs t no allocation's speed-up exceeds dense / floor, so fidelity ≤ ceiling = min(1, t × "
             "dense / floor). *At dense efficiency*: the fidelity if the compute kept above the floor cost per MAC "
             "what the dense model's does (latency f + (t − m_f) / (1 − m_f) × (1 − f) for a floor of latency f and "
             "MACs m_f); an aim above it needs thin layers to run faster per MAC than wide ones. Measured fidelity "
             "from the side-by-side rows (section 1 where a model has none): `mtprune_macs`, and the best of it and "
             "its hardware-width variants at the same MACs; the last column is that best one's share of the "
             "dense-efficiency figure.", "",
             "| model | floor (latency, MACs kept) | max speed-up | MACs target | ceiling | at dense efficiency | "
             "mtprune | best mtprune at MACs t | Torch-Pruning | best / dense efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in floors:
        targets = [s for s in side if s["model"] == f["model"]]
        if targets:
            measured = [(s["target"], s["mtprune_macs"]["fidelity"], s["mtprune_macs"]["macs_kept"],
                         _best_macs_variant(s), s["torch_pruning"]["fidelity"]) for s in targets]
        else:
            measured = [(r["target_macs"], r["speedup_over_macs_reduction"], r["macs_ratio"],
                         ("mtprune_macs", r["speedup_over_macs_reduction"]), None) for r in latency
                        if r["model"] == f["model"]]
        for t, fid, kept, (best_name, best), tp in measured:
            c = ceiling(f["floor_ratio"], kept)
            e = dense_efficiency_fidelity(f["floor_ratio"], f["macs_kept"], kept)
            lines.append(f"| {f['model']} | {f['floor_ratio']:.3f}, {f['macs_kept']:.4f} | {f['max_speedup']:.1f}× | "
                         f"{t} | {c:.2f} | {e:.2f} | {fid:.2f} | {best:.2f} (`{best_name}`) | "
                         f"{'' if tp is None else f'{tp:.2f}'} | {best / e:.2f} |")
    return lines
