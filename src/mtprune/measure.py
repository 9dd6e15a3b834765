"""Cost of a multi-task model: parameters, MACs (overall, per part, per task subset) and real latency.

MACs count the multiply-accumulates of convolutions (incl. transposed) and linear layers, the layers that
dominate and that pruning changes; element-wise layers are left out, as in most pruning papers.
Which layers a task needs is read from the autograd graph of its output, so the per-subset cost works
for any model that returns a dict, not only for ``MultiTaskModel``.
"""

from __future__ import annotations

import inspect
import itertools
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .models.validate import check_multitask_output
from .utils.runtime import eval_mode

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def _layer_macs(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    n = max(int(out.shape[0]), 1)
    if isinstance(module, nn.Linear):
        return int(out.numel() // n) * module.in_features
    if isinstance(module, nn.ConvTranspose2d):
        k = module.weight[0].numel()  # (out/groups) * kh * kw
        return int(inp.numel() // n) * k
    k = module.weight[0].numel()  # (in/groups) * kh * kw
    return int(out.numel() // n) * k


def layer_macs(model: nn.Module, example_inputs: Tensor | tuple) -> tuple[dict[str, int], dict[str, Tensor]]:
    """Per-sample MACs of every conv/linear layer on one forward, and the model's outputs."""
    macs: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
            def hook(mod, args, out, name=name):
                macs[name] = macs.get(name, 0) + _layer_macs(mod, args[0], out)
            hooks.append(module.register_forward_hook(hook))
    try:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        out = check_multitask_output(model(*inputs))
    finally:
        for h in hooks:
            h.remove()
    return macs, out


def task_layers(model: nn.Module, outputs: Mapping[str, Tensor]) -> dict[str, set[str]]:
    """For each task, the conv/linear layers its output depends on (read from the autograd graph)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    names, weights = list(layers), [m.weight for m in layers.values()]
    used: dict[str, set[str]] = {}
    for task, out in outputs.items():
        grads = torch.autograd.grad(out.float().sum(), weights, retain_graph=True, allow_unused=True)
        used[task] = {n for n, g in zip(names, grads, strict=True) if g is not None}
    return used


def part_of(name: str, tasks: Iterable[str]) -> str:
    """``heads.<task>.…`` belongs to that task's head; everything else to the shared part."""
    for task in tasks:
        if name == f"heads.{task}" or name.startswith(f"heads.{task}."):  # a head may be a single layer
            return task
    return "backbone"


@dataclass
class Profile:
    params: int
    macs: int
    params_per_part: dict[str, int]
    macs_per_part: dict[str, int]
    macs_per_subset: dict[str, int]
    latency_ms: float | None = None
    latency_per_subset_ms: dict[str, float] = field(default_factory=dict)
    setting: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _supports_task_subsets(model: nn.Module) -> bool:
    try:
        return "tasks" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def measure_latency(fn, *, warmup: int = 3, repeats: int = 10, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds; CUDA events on GPU."""
    cuda = device is not None and device.type == "cuda"
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)




def profile(model: nn.Module, example_inputs: Tensor | tuple, *, latency: bool = True, batch_size: int | None = None,
            warmup: int = 3, repeats: int = 10, subsets_latency: bool = False) -> Profile:
    """Parameters and MACs (overall, per part, for every subset of tasks) and measured latency.

    MACs are per sample. Latency is the median of ``repeats`` timed forwards after ``warmup`` runs, at the
    batch size of ``example_inputs`` (or ``batch_size``), with the current ``torch.get_num_threads()``.
    """
    with eval_mode(model):
        x = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
        probe = x[:1]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        try:  # which layers a task uses is read from autograd: frozen layers must show up in it
            for p in frozen:
                p.requires_grad_(True)
            with torch.enable_grad():
                macs, outputs = layer_macs(model, probe)
                used = task_layers(model, outputs)
        finally:
            for p in frozen:
                p.requires_grad_(False)
        tasks = list(outputs)
        params_per_part: dict[str, int] = {}
        for name, p in model.named_parameters():
            part = part_of(name, tasks)
            params_per_part[part] = params_per_part.get(part, 0) + p.numel()
        macs_per_part: dict[str, int] = {}
        for name, m in macs.items():
            part = part_of(name, tasks)
            macs_per_part[part] = macs_per_part.get(part, 0) + m
        per_subset = {}
        for r in range(1, len(tasks) + 1):
            for subset in itertools.combinations(tasks, r):
                layers = set().union(*(used[t] for t in subset))
                per_subset["+".join(subset)] = sum(macs[n] for n in layers)
        result = Profile(
            params=sum(p.numel() for p in model.parameters()),
            macs=sum(macs.values()),
            params_per_part=params_per_part,
            macs_per_part=macs_per_part,
            macs_per_subset=per_subset,
        )
        if latency:
            device = next(model.parameters()).device
            if batch_size is not None:
                x = x[:1].expand(batch_size, *x.shape[1:]).contiguous()
            x = x.to(device)
            result.latency_ms = measure_latency(lambda: model(x), warmup=warmup, repeats=repeats, device=device)
            if subsets_latency and _supports_task_subsets(model):
                for key in per_subset:
                    subset = key.split("+")
                    result.latency_per_subset_ms[key] = measure_latency(
                        lambda s=subset: model(x, tasks=s), warmup=warmup, repeats=repeats, device=device)
            result.setting = {"batch_size": int(x.shape[0]), "input_shape": list(x.shape[1:]),
                              "threads": torch.get_num_threads(), "device": str(device),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "warmup": warmup, "repeats": repeats}
        return result
