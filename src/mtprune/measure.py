"""Cost of a multi-task model: parameters, MACs (overall, per part, per task, per task subset) and real latency.

**MAC convention.** One MAC is one multiply-add. Counted is every matrix product and convolution that runs in
one forward pass of one sample, whatever calls it: ``nn.Conv*`` / ``nn.ConvTranspose*`` / ``nn.Linear`` modules,
``F.linear`` / ``F.conv*`` calls on any weight (``nn.MultiheadAttention``'s projections, torchvision Swin),
``matmul`` / ``bmm`` / ``einsum`` and scaled-dot-product attention (``QK^T`` and ``AV``: two products of
``T x T x head_dim`` per head). Not counted: bias additions, normalisation, activations, softmax, pooling and other
element-wise work (as in most pruning papers). The count is ``torch.utils.flop_counter.FlopCounterMode``'s
FLOPs / 2, taken with autograd enabled so that ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` run their
ordinary (countable) path instead of the fused inference kernel; CPU's fused attention kernel is given its formula.

Each counted call is attributed to a module name: the module that owns the weight it uses (so ``out_proj`` of an
``nn.MultiheadAttention`` is ``...attn.out_proj`` even though it is called through ``F.linear``), else the innermost
module that runs it (attention products land on the attention module).

Which tasks need a call is read from the autograd graph: a call is needed by task ``t`` when ``t``'s output is
reachable from the call's result. A layer run once per task is thus counted, for a task subset, with only the calls
that subset needs; a call needed by more than one task is *shared*, one needed by one task is that task's
*exclusive* cost. This works for any model that returns a dict, not only for ``MultiTaskModel``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .models.validate import check_multitask_output
from .utils.errors import MTPruneInputError
from .utils.inputs import call_model, first_samples, leaves, to_device
from .utils.runtime import eval_mode, steady_allocator

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
ALL_SUBSETS_UP_TO = 5  # by default every task subset is listed for at most this many tasks
MAX_SUBSETS_TASKS = 20  # subsets=True refuses more tasks than this (2^20 subsets)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU's (and MPS's) fused attention kernel: the same two products as the CUDA kernels'."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math_for_mps")
    return {getattr(aten, n): _sdpa_cpu_flop for n in names if hasattr(aten, n)}


@dataclass
class OpCall:
    """One counted matrix product or convolution of a forward pass (per sample)."""

    name: str  # the module owning the weight it uses, else the innermost module running it ("" = the model)
    op: str  # the aten operator
    macs: int
    weighted: bool  # True when one operand is a parameter of ``name``
    node: Any = field(default=None, repr=False)  # autograd node of its result (None: no task can be told apart)


class _Counter(flop_counter.FlopCounterMode):
    """``FlopCounterMode`` that also keeps every counted call with its module and autograd node."""

    def __init__(self, owners: Mapping[int, str], stack: list[str]) -> None:
        super().__init__(display=False, custom_mapping=_extra_formulas())
        self.owners, self.stack, self.calls = owners, stack, []
        self.mod_tracker = contextlib.nullcontext()  # modules are tracked by ``stack`` (its hooks cost more)

    def _count_flops(self, func_packet, out, args, kwargs):  # noqa: ANN001, ANN202 (FlopCounterMode's hook)
        formula = self.flop_registry.get(func_packet)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            owner = _owner_of(self.owners, args, kwargs)
            first = next((t for t in tree_flatten(out)[0] if isinstance(t, Tensor)), None)
            found = (first, first._version) if first is not None else None  # autograd adds its node later
            self.calls.append(OpCall(owner if owner is not None else self.stack[-1], str(func_packet.__name__),
                                     flops // 2, owner is not None, found))
            self.flop_counts["Global"][func_packet] += flops
        return out


def _owner_of(owners: Mapping[int, str], args: Any, kwargs: Any) -> str | None:
    """The module owning the first operand of a call that is (a view of) one of its parameters (operands in
    ``tree_flatten`` order: depth first, left to right)."""
    return _first_owner(owners, (args, kwargs))


def _first_owner(owners: Mapping[int, str], tree: Any) -> str | None:
    if isinstance(tree, Tensor):
        return owners.get(tree.untyped_storage().data_ptr()) if tree.numel() else None
    if isinstance(tree, Mapping):
        tree = tree.values()
    elif not isinstance(tree, list | tuple):
        return None
    for a in tree:
        owner = _first_owner(owners, a)
        if owner is not None:
            return owner
    return None


class _LeanCounter(TorchDispatchMode):
    """MACs by module of every call ``FlopCounterMode`` counts, with its formulas and its rule for operators
    without one (decomposed when they can be, their parts counted), but without its module tracking: a call is
    given to the module owning one of its operands (:func:`_owner_of`); ``weighted`` turns False at the first call
    that uses no parameter (attention matmuls), whose module only :func:`count_calls`'s hooks can tell."""

    _registry: dict | None = None
    _decomposable: dict = {}  # operator -> whether it has a CompositeImplicitAutograd kernel

    def __init__(self, owners: Mapping[int, str]) -> None:
        super().__init__()
        if _LeanCounter._registry is None:
            _LeanCounter._registry = {k: _raw_formula(f) for k, f in flop_counter.FlopCounterMode(
                display=False, custom_mapping=_extra_formulas()).flop_registry.items()}
        self.owners, self.macs, self.weighted = owners, {}, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (the mode's hook)
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            self.weighted = False  # control flow, flex attention: not costed here (the exact count runs)
            return NotImplemented
        decomposable = self._decomposable.get(func)
        if decomposable is None:
            decomposable = self._decomposable[func] = func is not torch.ops.prim.device.default and \
                torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _IMPLICIT)
        if decomposable:  # as FlopCounterMode: its parts are counted
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = self._registry.get(func._overloadpacket)
        if formula is not None:
            owner = _owner_of(self.owners, args, kwargs)
            self.weighted = self.weighted and owner is not None
            key = owner if owner is not None else ""
            raw, shapes = formula
            flops = raw(*_shapes(args), **_shapes(kwargs), out_shape=_shapes(out)) if shapes else \
                raw(*args, **kwargs, out_val=out)
            self.macs[key] = self.macs.get(key, 0) + int(flops) // 2
        return out


_SHAPE_WRAPPER = flop_counter.shape_wrapper(lambda: 0).__code__
_IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd


def _raw_formula(formula: Any) -> tuple[Any, bool]:
    """(the formula, whether it takes shapes): a formula that ``shape_wrapper`` wraps is called on shapes directly
    (:func:`_shapes`, what the wrapper passes it, without its pytree walk)."""
    raw = getattr(formula, "__wrapped__", None)
    if raw is not None and getattr(formula, "__code__", None) is _SHAPE_WRAPPER:
        return raw, True
    return formula, False


def _shapes(tree: Any) -> Any:
    """``tree`` with every tensor replaced by its shape (``flop_counter.get_shape`` over lists, tuples, dicts)."""
    if isinstance(tree, Tensor):
        return tree.shape
    if isinstance(tree, list | tuple):
        items = [_shapes(a) for a in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)  # a named tuple: by position
    if isinstance(tree, dict):
        return {k: _shapes(v) for k, v in tree.items()}
    return tree


def _owners(model: nn.Module) -> tuple[dict[nn.Module, str], dict[int, str]]:
    """Each module's (first) name, and the storage of every parameter -> the name of the module owning it."""
    names: dict[nn.Module, str] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
        for p in module.parameters(recurse=False):
            if p.numel():
                owners.setdefault(p.untyped_storage().data_ptr(), names[module])
    return names, owners


@dataclass
class LayerRecord:
    """What :func:`recording_layers` saw in one forward: MACs by module name (counted by :func:`layer_macs`'s
    formulas), each conv/linear layer's first input and output shape (per sample), and what it was run on."""

    macs: dict[str, int]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    weighted: bool  # every counted call multiplied by a module's own parameter (no attention matmuls)
    input_shapes: list[tuple[int, ...]]
    params: tuple[tuple[str, tuple[int, ...]], ...]  # the model's parameter shapes when it ran

    def describes(self, model: nn.Module, example_inputs: Any) -> bool:
        """Whether these are exactly the per-sample MACs :func:`layer_macs` gives for ``model`` (as it is now) on
        ``example_inputs``: every call used a module's own weight (so the stack of modules plays no part), the
        record was taken at batch 1 on inputs of the same shapes, and no parameter changed shape since."""
        shapes = [tuple(t.shape) for t in leaves(first_samples(example_inputs))]
        return self.weighted and shapes == self.input_shapes and self.params == _param_shapes(model)


def _param_shapes(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


@contextlib.contextmanager
def recording_layers(model: nn.Module, example_inputs: Any) -> Iterator[dict[str, LayerRecord]]:
    """Count the MACs of a forward of ``model`` on ``example_inputs`` run inside this context (e.g. the forward
    Torch-Pruning traces, so that pruning needs no forward of its own to cost layers): yields a dict whose
    ``"record"`` is the :class:`LayerRecord` once the context exits without error. The caller sets the mode,
    autograd and ``requires_grad`` as :func:`count_calls` does (eval, enabled, every parameter requiring grad)."""
    _, owners = _owners(model)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
                if name not in shapes and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                    shapes[name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
            hooks.append(module.register_forward_hook(hook))
    counter = _LeanCounter(owners)
    holder: dict[str, LayerRecord] = {}
    try:
        with counter:
            yield holder
    finally:
        for h in hooks:
            h.remove()
    holder["record"] = LayerRecord(counter.macs, shapes, counter.weighted,
                                   [tuple(t.shape) for t in leaves(example_inputs)], _param_shapes(model))


def count_calls(model: nn.Module, example_inputs: Any) -> tuple[list[OpCall], dict[str, Tensor]]:
    """Every counted call of one eval-mode forward on the first sample, and the model's outputs (with autograd
    graph). The model is left as found (modes, ``requires_grad``)."""
    names, owners = _owners(model)
    stack = [""]

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(names[module])

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        stack.pop()

    hooks = []
    for module in names:
        if module is not model:
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(leave, always_call=True))
    grads = {p: p.requires_grad for p in model.parameters()}
    counter = _Counter(owners, stack)
    try:
        for p in grads:  # autograd on: the countable attention path, and the graph that tells tasks apart
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(True)
        with eval_mode(model), torch.enable_grad(), counter:
            out = check_multitask_output(call_model(model, first_samples(example_inputs)))
    finally:
        for h in hooks:
            h.remove()
        for p, req in grads.items():
            p.requires_grad_(req)
    for c in counter.calls:  # the result tensor, kept while counting, gets its autograd node after dispatch
        c.node = _result_node(*c.node) if c.node is not None else None
    return counter.calls, out


def _result_node(result: Tensor, version: int) -> Any:
    """The autograd node that produced ``result``: its ``grad_fn``, or, when in-place ops (``relu_``, ``+=``)
    modified it since, the node those ops were applied to (each in-place node's first input)."""
    node = result.grad_fn
    for _ in range(result._version - version):
        if node is None or not node.next_functions:
            break
        node = node.next_functions[0][0]
    return node


def layer_macs(model: nn.Module, example_inputs: Any) -> tuple[dict[str, int], dict[str, Tensor]]:
    """Per-sample MACs of one forward by module name (see the module docstring), and the model's outputs."""
    calls, out = count_calls(model, example_inputs)
    macs: dict[str, int] = {}
    for c in calls:
        macs[c.name] = macs.get(c.name, 0) + c.macs
    return macs, out


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Per-sample MACs of one forward of ``model`` (the convention of the module docstring)."""
    return sum(c.macs for c in count_calls(model, example_inputs)[0])


def call_tasks(calls: Sequence[OpCall], outputs: Mapping[str, Tensor]) -> list[int]:
    """For each call, the bit mask (bit i = i-th task of ``outputs``) of the tasks whose output needs it.

    A call with no autograd node (run without gradients inside the forward) is needed by every task."""
    reach: list[set] = []
    for out in outputs.values():
        seen: set = set()
        todo = [out.grad_fn] if out.grad_fn is not None else []
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            todo.extend(nxt for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
        reach.append(seen)
    everyone = (1 << len(reach)) - 1
    return [everyone if c.node is None else sum(1 << i for i, s in enumerate(reach) if c.node in s) for c in calls]


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
    """What :func:`profile` measured. MACs are per sample (module docstring); ``macs_per_task[t]`` is
    ``macs_shared_by[t] + macs_exclusive[t]``: the shared calls ``t`` needs plus the calls only ``t`` needs."""

    params: int
    macs: int
    params_per_part: dict[str, int]
    macs_per_part: dict[str, int]
    macs_per_subset: dict[str, int]
    latency_ms: float | None = None
    latency_per_subset_ms: dict[str, float] = field(default_factory=dict)
    setting: dict[str, object] = field(default_factory=dict)
    macs_per_task: dict[str, int] = field(default_factory=dict)
    macs_exclusive: dict[str, int] = field(default_factory=dict)
    macs_shared: int = 0  # calls needed by more than one task
    macs_unused: int = 0  # calls that run but no returned output needs
    runtime_latency_ms: dict[str, float] = field(default_factory=dict)  # other runtimes, e.g. {"onnx": 1.2}

    def to_dict(self) -> dict:
        return asdict(self)


class SubsetCosts:
    """MACs of any task subset from one forward: the calls grouped by the set of tasks that need them."""

    def __init__(self, tasks: Sequence[str], calls: Sequence[OpCall], masks: Sequence[int]) -> None:
        self.tasks = list(tasks)
        self.bit = {t: 1 << i for i, t in enumerate(self.tasks)}
        self.by_mask: dict[int, int] = {}
        for c, m in zip(calls, masks, strict=True):
            self.by_mask[m] = self.by_mask.get(m, 0) + c.macs

    def mask(self, subset: Iterable[str] | str) -> int:
        names = subset.split("+") if isinstance(subset, str) else list(subset)
        unknown = [t for t in names if t not in self.bit]
        if unknown or not names:
            raise MTPruneInputError(f"unknown task(s) {unknown or names} in a subset; the tasks are {self.tasks}")
        return sum(self.bit[t] for t in set(names))

    def macs(self, subset: Iterable[str] | str) -> int:
        """MACs of the calls that at least one task of ``subset`` needs."""
        m = self.mask(subset)
        return sum(v for k, v in self.by_mask.items() if k & m)

    def key(self, subset: Iterable[str] | str) -> str:
        m = self.mask(subset)
        return "+".join(t for t in self.tasks if self.bit[t] & m)

    def shared(self) -> int:
        return sum(v for k, v in self.by_mask.items() if k & (k - 1))

    def exclusive(self, task: str) -> int:
        return self.by_mask.get(self.bit[task], 0)

    def unused(self) -> int:
        return self.by_mask.get(0, 0)


def _subset_list(costs: SubsetCosts, subsets: bool | Iterable | None) -> list[str]:
    tasks = costs.tasks
    if subsets is None:
        subsets = len(tasks) <= ALL_SUBSETS_UP_TO
    if subsets is True:
        if len(tasks) > MAX_SUBSETS_TASKS:
            raise MTPruneInputError(f"subsets=True would list 2^{len(tasks)} - 1 subsets; pass a list of subsets "
                                    f"(at most {MAX_SUBSETS_TASKS} tasks for all of them)")
        return ["+".join(s) for r in range(1, len(tasks) + 1) for s in itertools.combinations(tasks, r)]
    if subsets is False:
        return list(dict.fromkeys([*tasks, "+".join(tasks)]))
    if isinstance(subsets, str):
        subsets = [subsets]
    return list(dict.fromkeys(costs.key(s) for s in subsets))


def _supports_task_subsets(model: nn.Module) -> bool:
    try:
        return "tasks" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def measure_latency(fn, *, warmup: int = 3, repeats: int = 10, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds; CUDA events on GPU."""
    cuda = device is not None and device.type == "cuda"
    steady_allocator()
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




def profile(model: nn.Module, example_inputs: Tensor | tuple | Mapping, *, latency: bool = True,
            batch_size: int | None = None, warmup: int = 3, repeats: int = 10, subsets_latency: bool = False,
            subsets: bool | Iterable[str | Sequence[str]] | None = None) -> Profile:
    """Parameters and MACs (overall, per part, per task, shared and exclusive, per task subset) and latency.

    MACs are per sample (see the module docstring for what is counted). ``subsets``: ``True`` lists every task
    subset, ``False`` each task alone and all tasks together, a list (``["seg+depth", ("seg", "normal")]``) just
    those; ``None`` (default) every subset for up to ``ALL_SUBSETS_UP_TO`` tasks, else as ``False``. Per-task,
    shared and exclusive costs are always there, for any number of tasks. Latency is the median of ``repeats``
    timed forwards after ``warmup`` runs, at the batch size of ``example_inputs`` (or ``batch_size``, for a
    tensor input), with the current ``torch.get_num_threads()``.
    """
    from .utils.statedict import check_input_dtype

    check_input_dtype(model, example_inputs)
    with eval_mode(model):
        calls, outputs = count_calls(model, example_inputs)
        tasks = list(outputs)
        costs = SubsetCosts(tasks, calls, call_tasks(calls, outputs))
        del outputs
        params_per_part: dict[str, int] = {}
        for name, p in model.named_parameters():
            part = part_of(name, tasks)
            params_per_part[part] = params_per_part.get(part, 0) + p.numel()
        macs_per_part: dict[str, int] = {}
        for c in calls:
            part = part_of(c.name, tasks)
            macs_per_part[part] = macs_per_part.get(part, 0) + c.macs
        per_subset = {key: costs.macs(key) for key in _subset_list(costs, subsets)}
        result = Profile(
            params=sum(p.numel() for p in model.parameters()),
            macs=sum(c.macs for c in calls),
            params_per_part=params_per_part,
            macs_per_part=macs_per_part,
            macs_per_subset=per_subset,
            macs_per_task={t: costs.macs([t]) for t in tasks},
            macs_exclusive={t: costs.exclusive(t) for t in tasks},
            macs_shared=costs.shared(),
            macs_unused=costs.unused(),
        )
        del calls
        if latency:
            device = next(model.parameters()).device
            x = example_inputs
            if batch_size is not None and isinstance(x, Tensor):
                x = x[:1].expand(batch_size, *x.shape[1:]).contiguous()
            x = to_device(x, device)
            result.latency_ms = measure_latency(lambda: call_model(model, x), warmup=warmup, repeats=repeats,
                                                device=device)
            if subsets_latency and _supports_task_subsets(model) and isinstance(x, Tensor):
                for key in per_subset:
                    subset = key.split("+")
                    result.latency_per_subset_ms[key] = measure_latency(
                        lambda s=subset: model(x, tasks=s), warmup=warmup, repeats=repeats, device=device)
            first = next(iter(leaves(x)), None)
            result.setting = {"batch_size": int(first.shape[0]) if first is not None and first.dim() else 1,
                              "input_shape": list(first.shape[1:]) if first is not None else [],
                              "threads": torch.get_num_threads(), "device": str(device),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "warmup": warmup, "repeats": repeats}
        return result
