"""Deployment: a model that computes only some tasks (``extract_tasks``), ONNX export checked against PyTorch
(``export_onnx``), and ONNX Runtime latency (``onnx_latency``); plus the ``export`` command and ``profile``'s
``--tasks`` / ``--runtime onnx``.

``extract_tasks`` drops what only the other tasks need:

- a model whose heads are an ``nn.ModuleDict`` named ``heads`` with one head per output (``MultiTaskModel``, every
  zoo model) loses the other heads; it stays the same class, so a zoo model saves and loads as ``.mtp`` (its
  stored spec names only the kept tasks);
- any other model is traced with ``torch.fx`` and every node, and every submodule, that no kept output depends on
  is removed (a ``GraphModule``; save it with ``mtprune.save`` and load it with ``base=`` an extracted fresh one).

Then channels that no remaining layer reads and no output returns (a slice of a feature map only a dropped head
used) are removed with the pruning graph (``drop_dead_channels``). The result is checked: on ``example_inputs``
its outputs equal the model's for the kept tasks, and its measured MACs equal what ``mtprune.profile`` reports
for that subset, or are lower where dead channels were removed (``extract_tasks`` refuses otherwise). A zoo model
whose backbone still runs layers only dropped heads read, or whose forward names its heads, is traced with
``torch.fx`` instead.

onnx and onnxruntime are optional (``pip install mtprune[onnx]``). Export uses PyTorch's TorchScript-based
exporter (``dynamo=False``, no onnxscript needed) with a dynamic batch dimension, then runs the file in ONNX
Runtime on ``example_inputs`` and refuses (deleting the file) when any output differs from PyTorch's by more
than ``atol + rtol * |torch|`` (1e-4 each by default).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .measure import count_macs, profile
from .models.validate import check_multitask_output
from .utils.errors import MTPruneInputError
from .utils.inputs import batch_size, call_model, first_samples, map_tensors
from .utils.runtime import eval_mode

MISSING_ONNX = "ONNX export needs the optional packages onnx and onnxruntime: pip install 'mtprune[onnx]'"


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"seg,depth"``, ``"seg+depth"`` or a list -> ``["seg", "depth"]`` (order kept, duplicates dropped)."""
    names = tasks.replace("+", ",").split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() if isinstance(t, str) else t for t in names]
    if not names or any(not isinstance(t, str) or not t for t in names):
        raise MTPruneInputError(f"tasks must be non-empty task names, got {tasks!r}")
    return list(dict.fromkeys(names))


def _outputs(model: nn.Module, example_inputs: Any) -> dict[str, Tensor]:
    with eval_mode(model), torch.no_grad():
        return check_multitask_output(call_model(model, example_inputs))


def _check_known(names: Sequence[str], available: Iterable[str]) -> None:
    available = list(available)
    unknown = [t for t in names if t not in available]
    if unknown:
        raise MTPruneInputError(f"unknown task(s) {unknown}; this model has {available}")


def _drop_heads(model: nn.Module, names: Sequence[str]) -> nn.Module:
    sub = copy.deepcopy(model)
    for t in list(sub.heads.keys()):
        if t not in names:
            del sub.heads[t]
    spec = getattr(model, "mtprune_spec", None)
    if isinstance(spec, dict) and isinstance(spec.get("kwargs", {}).get("tasks"), Mapping):
        spec = copy.deepcopy(spec)
        spec["kwargs"]["tasks"] = {t: c for t, c in spec["kwargs"]["tasks"].items() if t in names}
        sub.mtprune_spec = spec
    return sub


def _trace_subset(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """``torch.fx`` trace of a copy of ``model`` returning only ``names``; dead nodes and unused submodules
    removed (a GraphModule holds the traced model's own submodules: they are copied first)."""
    import torch.fx as fx

    model = copy.deepcopy(model)

    try:  # arguments with defaults (e.g. MultiTaskModel's ``tasks=None``) keep them
        params = inspect.signature(model.forward).parameters.values()
        gm = fx.symbolic_trace(model, concrete_args={p.name: p.default for p in params
                                                     if p.default is not inspect.Parameter.empty})
    except Exception as err:  # noqa: BLE001 (any tracing failure is the same refusal)
        first = (str(err).splitlines() or [""])[0]
        raise MTPruneInputError(f"cannot extract tasks from {type(model).__name__}: its forward cannot be traced by "
                                f"torch.fx ({type(err).__name__}: {first}); give the model an nn.ModuleDict "
                                "`heads` with one head per task") from None
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, dict):
        raise MTPruneInputError(f"cannot extract tasks from {type(model).__name__}: its traced forward does not "
                                "return a literal dict of task outputs")
    output.args = ({t: result[t] for t in names},)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def drop_dead_channels(model: nn.Module, example_inputs: Any, rounds: int = 8) -> int:
    """Remove, in place, the channels no layer reads any more and no output returns (e.g. the part of a feature
    map only a dropped head sliced out): for each group of the pruning graph, the channels outside every
    consumer's channel map. Returns how many were removed; a model the graph cannot trace is left as it is."""
    from .pruning.graph import PruningGraph

    removed = 0
    for _ in range(rounds):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = PruningGraph(model, example_inputs)
        except (MTPruneInputError, RuntimeError, TypeError, ValueError, KeyError, IndexError):
            return removed
        plan = {}
        for g in graph.groups:
            used = set().union(*(set(m.root) for m in g.in_maps.values()))
            dead = [c for c in range(g.channels) if c not in used]
            if dead and len(dead) < g.channels:
                plan[g.index] = dead
        if not plan:
            break
        try:
            graph.prune(plan)
        except ValueError:  # e.g. a depthwise group that would keep fewer than 2 channels: keep them
            break
        removed += sum(len(v) for v in plan.values())
    return removed


def extract_tasks(model: nn.Module, tasks: str | Iterable[str], example_inputs: Any) -> nn.Module:
    """A copy of ``model`` that computes only ``tasks`` (see the module docstring); ``model`` is not changed.

    ``example_inputs`` (a tensor, tuple or dict) is used to check the copy: the same outputs for the kept tasks,
    and MACs equal to ``mtprune.profile(model, ..., subsets=[tasks])`` (lower only where channels that only the
    dropped tasks read were removed). The cost of serving a task subset as in PAM (He et al., KDD 2021).
    """
    if not isinstance(model, nn.Module):
        raise MTPruneInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = parse_tasks(tasks)
    probe = first_samples(example_inputs)
    want = _outputs(model, probe)
    _check_known(names, want)
    expected = sum(profile(model, probe, latency=False, subsets=[names]).macs_per_subset.values())
    sub = None
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.ModuleDict) and set(heads.keys()) == set(want):
        sub = _drop_heads(model, names)
        try:  # a forward that runs whatever heads there are; else (e.g. it names them) trace the model
            if count_macs(sub, probe) > expected:  # the backbone still runs layers only dropped heads read
                sub = None
        except (KeyError, AttributeError, IndexError, MTPruneInputError):
            sub = None
    if sub is None:
        sub = _trace_subset(model, names)
    drop_dead_channels(sub, probe)
    sub.train(model.training)
    got = _outputs(sub, probe)
    if list(got) != [t for t in want if t in names] or any(
            not torch.allclose(got[t], want[t], rtol=1e-5, atol=1e-6) for t in names):
        raise MTPruneInputError(f"cannot extract tasks {names} from {type(model).__name__}: the extracted model "
                                "does not reproduce their outputs (its forward depends on the dropped heads)")
    measured = count_macs(sub, probe)
    if measured > expected:
        raise MTPruneInputError(f"cannot extract tasks {names} from {type(model).__name__}: the extracted model "
                                f"still runs {measured} MACs, but the tasks need {expected}")
    return sub


# ---------------------------------------------------------------- ONNX
def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or one clear ``MTPruneInputError`` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise MTPruneInputError(MISSING_ONNX) from None
    return onnx, onnxruntime


class _AsTuple(nn.Module):
    """The task dict as a tuple in a fixed order: ONNX graphs have positional, named outputs."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        out = self.model(*args)
        return tuple(out[t] for t in self.names)


def _input_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise MTPruneInputError("ONNX export takes a tensor or a tuple of tensors as example inputs")
    return inputs


def _session(path: Path, threads: int | None = None) -> Any:
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(session: Any, inputs: Sequence[Tensor]) -> dict[str, Any]:
    return {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}


def export_onnx(model: nn.Module, path: str | Path, example_inputs: Any, *, tasks: str | Iterable[str] | None = None,
                rtol: float = 1e-4, atol: float = 1e-4, opset: int = 17) -> dict[str, Any]:
    """Write ``model`` (only ``tasks`` when given, see :func:`extract_tasks`) as ONNX to ``path``; checked.

    Inputs are named ``input`` (``input_0``, ``input_1``, ... for several), outputs by task; the batch dimension
    is dynamic. Returns ``{"path", "tasks", "max_abs_diff", "macs"}``.
    """
    require_onnx()
    inputs = tuple(t.detach().cpu() for t in _input_tuple(example_inputs))
    model = copy.deepcopy(model).cpu()
    if tasks is not None:
        model = extract_tasks(model, tasks, inputs)
    names = list(_outputs(model, inputs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    in_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    axes = {n: {0: "batch"} for n in [*in_names, *names]}
    wrapped = _AsTuple(model, names).requires_grad_(True)  # a copy: keeps MultiheadAttention off its fused
    with eval_mode(wrapped), torch.enable_grad(), warnings.catch_warnings():  # inference kernel (not in ONNX)
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(wrapped, inputs, str(path), dynamo=False, input_names=in_names, output_names=names,
                              dynamic_axes=axes, opset_version=opset)
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as err:
            path.unlink(missing_ok=True)
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise MTPruneInputError(f"cannot export {type(model).__name__} to ONNX (opset {opset}): {first}") from None
        want = [t.detach() for t in wrapped(*inputs)]
    got = _session(path).run(names, _feeds(_session(path), inputs))
    worst = 0.0
    for name, ref, arr in zip(names, want, got, strict=True):
        ort_out = torch.from_numpy(arr)
        if ort_out.shape != ref.shape or not torch.allclose(ort_out, ref, rtol=rtol, atol=atol):
            diff = (ort_out - ref).abs().max().item() if ort_out.shape == ref.shape else float("inf")
            path.unlink(missing_ok=True)
            raise MTPruneInputError(f"ONNX output {name!r} differs from PyTorch by up to {diff:.3g} (allowed "
                                    f"{atol:g} + {rtol:g}*|x|); nothing was written")
        worst = max(worst, (ort_out - ref).abs().max().item())
    return {"path": str(path), "tasks": names, "max_abs_diff": worst, "macs": count_macs(model, inputs)}


def onnx_latency(path: str | Path, example_inputs: Any, *, warmup: int = 3, repeats: int = 10,
                 threads: int | None = None) -> float:
    """Median ONNX Runtime (CPU) wall time of one run on ``example_inputs``, in milliseconds."""
    session = _session(Path(path), threads or torch.get_num_threads())
    feeds = _feeds(session, _input_tuple(example_inputs))
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------- commands
def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export MODEL.mtp --format onnx [--tasks a,b] [--out FILE]`` to the ``mtprune`` sub-commands."""
    p = sub.add_parser("export", help="export a .mtp model (or only some of its tasks) to ONNX, checked against "
                                      "PyTorch")
    p.add_argument("model", help="a .mtp model file")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks to keep (default: all)")
    p.add_argument("--out", default=None, help="output file (default: MODEL with .onnx, or MODEL.TASKS.onnx)")
    from .cli import input_shape

    p.add_argument("--input-shape", type=input_shape, default=None,
                   help="C,H,W (default: the shape stored in the file)")
    from .commands import COMMANDS

    COMMANDS["export"] = export_command
    return p


def _example(args: argparse.Namespace, batch: int = 2) -> tuple[nn.Module, Any]:
    """The ``.mtp`` model of a command and a seeded random input for it: ``--input-shape`` or the stored
    description (one tensor, or several for a multi-input model)."""
    from .io import load, read
    from .utils.inputs import example_from_spec

    _, meta = read(args.model)
    model = load(args.model)
    spec = args.input_shape or meta.get("input_shape") or meta.get("inputs")
    if not spec:
        raise MTPruneInputError(f"{args.model}: no input shape stored; pass --input-shape C,H,W")
    gen = torch.Generator().manual_seed(0)
    return model, map_tensors(example_from_spec(spec, batch),
                              lambda t: torch.randn(t.shape, generator=gen).to(t.dtype) if t.is_floating_point()
                              else t)


def export_command(args: argparse.Namespace) -> int:
    """``mtprune export``: write the ONNX file and print where it went and how close it is to PyTorch."""
    require_onnx()
    model, x = _example(args)
    tasks = parse_tasks(args.tasks) if args.tasks else None
    out = args.out or str(Path(args.model).with_suffix("")) + (f".{'+'.join(tasks)}" if tasks else "") + ".onnx"
    info = export_onnx(model, out, x, tasks=tasks)
    print(f"{info['path']}: tasks {', '.join(info['tasks'])}; {info['macs'] / 1e6:.1f} MMACs per sample; max |ONNX - "
          f"PyTorch| = {info['max_abs_diff']:.2e}")
    return 0


def profile_options(args: argparse.Namespace) -> dict[str, Any]:
    """``profile()`` options of ``mtprune profile``: ``--tasks`` as the one subset to cost; with ``--runtime
    onnx``, onnx and onnxruntime must be installed (checked here, before any work)."""
    if getattr(args, "runtime", "torch") == "onnx":
        require_onnx()
    tasks = getattr(args, "tasks", None)
    return {"subsets": [parse_tasks(tasks)]} if tasks else {}


def profile_extras(args: argparse.Namespace, prof: Any, model: nn.Module, x: Tensor) -> None:
    """After ``mtprune profile``'s table: shared and exclusive MACs, and with ``--runtime onnx`` the ONNX Runtime
    latency (of the ``--tasks`` model when given) next to PyTorch's, also stored in ``prof.runtime_latency_ms``."""
    import tempfile

    items = list(prof.macs_exclusive.items())
    excl = ", ".join(f"{t} {v / 1e6:.3g}" for t, v in items[:12]) + (", ... (all in --json)" if len(items) > 12 else "")
    print(f"MMACs shared by several tasks {prof.macs_shared / 1e6:.3g}; each task's own: {excl}")
    if getattr(args, "runtime", "torch") != "onnx":
        return
    tasks = getattr(args, "tasks", None)
    subset = parse_tasks(tasks) if tasks else None
    gen = torch.Generator().manual_seed(0)  # random, not zero, inputs for the check against PyTorch
    x = map_tensors(x, lambda t: torch.randn(t.shape, generator=gen) if t.is_floating_point() else t.cpu())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, x, tasks=subset)
        ms = onnx_latency(path, x, threads=torch.get_num_threads())
    prof.runtime_latency_ms["onnx"] = ms
    key = "+".join(subset) if subset else None
    torch_ms = prof.latency_per_subset_ms.get(key) if key else prof.latency_ms
    what = f"tasks {key}" if key else "all tasks"
    torch_text = f"{torch_ms:.2f} ms" if torch_ms is not None else "not measured for this subset"
    print(f"latency ({what}, batch {batch_size(x)}, {torch.get_num_threads()} threads): ONNX Runtime {ms:.2f} ms, "
          f"PyTorch {torch_text}")


__all__ = ["export_onnx", "extract_tasks", "onnx_latency", "parse_tasks", "require_onnx"]
