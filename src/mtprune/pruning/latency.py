"""Latency of a pruned configuration on the user's device, from a per-layer lookup table (HALP-style).

Shen et al., "Structural Pruning via Latency-Saliency Knapsack" (HALP, NeurIPS 2022) prune to a latency budget
with a latency lookup table: each layer's latency as a function of its input and output widths. This module
builds such a table for a multi-task model and predicts the latency of any pruned configuration without surgery:

- **Signature of a layer**: op kind (conv, pointwise, depthwise, grouped, linear, conv_transpose), kernel,
  stride, padding, dilation, groups, bias, the dense in/out widths, the input's spatial (or token) size and batch.
  Layers with the same signature (ResNet blocks repeat) are measured once.
- **Table**: each layer kind is run alone (fresh weights, random input) at a grid of widths, ``grid`` points per
  prunable width dimension (depthwise: one dimension), median of ``repeats`` runs after ``warmup``, then made
  non-decreasing in each width; between grid points it is interpolated (bilinear).
- **Cache**: one JSON file per device and setting (device name, threads, batch, dtype, torch version) under
  ``~/.cache/mtprune/latency/`` (``$MTPRUNE_CACHE/latency`` if set, or ``LatencySetting.cache_dir``), written
  atomically; entries measured once are reused by every later run with the same setting.
- **Calibration**: the dense model is timed once as a whole. What the table does not cover (norms, activations,
  adds, upsampling: memory-bound, roughly proportional to the activations) is spread over the layers in
  proportion to their output activations; if the isolated layers sum to more than the whole model, the table is
  scaled down instead.

- **Real timings** (:func:`interleaved_times`, :class:`PairedTimer`): the one timing function of the feedback
  loop (:func:`close_the_loop`) and of ``mtprune bench speed``. Candidates are timed alternately with the dense
  model, each timed call right after an untimed one of the same model, and judged by the median over rounds of
  their time / the dense time of the same round: a ratio measured alongside, not against a figure remembered
  from earlier (load drifts between the two).
- **Floor** (:func:`check_floor`): the latency of the model with every prunable layer at its minimum width. No
  allocation goes below it (norms, activations, the unprunable first and last layers, per-call overheads remain),
  so a goal below it is refused instead of cutting every layer to the minimum.

``LatencySetting.table`` injects a table (``fn(layer, cin, cout) -> ms``; no timing), e.g. for tests.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..measure import measure_latency
from ..utils.atomic import atomic_write_json
from ..utils.errors import MTPruneInputError
from ..utils.inputs import call_model, first_samples, map_tensors
from ..utils.runtime import device_name, steady_allocator
from .cost import CostModel, LayerShape, Plan

__all__ = ["LatencyModel", "LatencySetting", "LatencyTable", "PairedTimer", "check_floor", "hardware_round_to",
           "interleaved_times", "latency_model", "median_ratios", "model_latency", "pick_by_importance"]

Table = Callable[[LayerShape, int, int], float]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    root = os.environ.get("MTPRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mtprune") / "latency"


@dataclass(frozen=True)
class LatencySetting:
    """Where and how latency is measured: ``device`` ("cpu", "cuda", "cuda:N"), CPU ``threads`` (default: the
    current ``torch.get_num_threads()``), ``batch``, ``dtype`` ("float32", "float16", "bfloat16"), ``grid``
    points per width dimension, ``warmup``/``repeats`` per timing, the cache folder, whether the dense model is
    timed to calibrate the table, ``feedback``: how many times at most the pruned configuration is built and
    timed to correct the goal when the prediction misses (0: trust the table), ``macs_candidate``: with feedback and
    the global allocator, also time the importance ranking cut at the MACs that meet the goal, and keep whichever
    plan keeps more importance (:func:`pick_by_importance`), ``precision``: the relative standard error the
    feedback's paired timings aim at (rounds added up to 4 × ``repeats``, :func:`times_to_precision`; 0: one block),
    and an optional injected ``table`` (no timing at all)."""

    device: str = "cpu"
    threads: int | None = None
    batch: int = 1
    dtype: str = "float32"
    grid: int = 6
    warmup: int = 2
    repeats: int = 5
    cache_dir: str | None = None
    calibrate: bool = True
    feedback: int = 4
    macs_candidate: bool = True
    precision: float = 0.02
    table: Table | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, value: LatencySetting | Mapping[str, Any] | None) -> LatencySetting:
        """A setting from itself, a dict of its fields, or ``None`` (the defaults); bad values are refused."""
        if value is None:
            return cls()
        if isinstance(value, LatencySetting):
            s = value
        elif isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise MTPruneInputError(f"latency setting: unknown keys {unknown}; known: "
                                        f"{[f.name for f in fields(cls)]}")
            s = cls(**value)
        else:
            raise MTPruneInputError(f"latency must be a LatencySetting or a dict, got {type(value).__name__}")
        s._check()
        return s

    def _check(self) -> None:
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise MTPruneInputError(f"latency device {self.device!r} is not a device name (cpu, cuda, cuda:N)"
                                    ) from None
        if dev.type not in ("cpu", "cuda"):
            raise MTPruneInputError(f"latency device must be cpu or cuda, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available() and self.table is None:
            raise MTPruneInputError(f"latency device {self.device!r}: CUDA is not available")
        if self.dtype not in DTYPES:
            raise MTPruneInputError(f"latency dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.feedback, bool) or not isinstance(self.feedback, int) or self.feedback < 0:
            raise MTPruneInputError(f"latency feedback must be an int >= 0, got {self.feedback!r}")
        if isinstance(self.precision, bool) or not isinstance(self.precision, int | float) \
                or not 0 <= self.precision < 1:
            raise MTPruneInputError(f"latency precision must be a number in [0, 1), got {self.precision!r}")
        if not isinstance(self.macs_candidate, bool):
            raise MTPruneInputError(f"latency macs_candidate must be true or false, got {self.macs_candidate!r}")
        for name in ("batch", "grid", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "grid" else 1):
                raise MTPruneInputError(f"latency {name} must be an int >= {2 if name == 'grid' else 1}, got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise MTPruneInputError(f"latency threads must be a positive int, got {self.threads!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def describe(self) -> dict[str, Any]:
        """The setting as recorded in reports and cache files (the device named)."""
        dev = self.torch_device
        return {"device": str(dev), "device_name": device_name(dev),
                "threads": self.threads or torch.get_num_threads() if dev.type == "cpu" else None,
                "batch": self.batch, "dtype": self.dtype, "torch": torch.__version__, "grid": self.grid}

    def key(self) -> str:
        """The cache file's name: readable, plus a hash of everything that changes the timings."""
        d = self.describe()
        digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
        dev = self.torch_device.type
        return f"{dev}-{d['threads'] or 'gpu'}t-b{self.batch}-{self.dtype}-{digest}"


def hardware_round_to(setting: LatencySetting | None = None) -> dict[str, int]:
    """Per-kind ``round_to`` that suits the device: on x86 CPUs oneDNN runs depthwise and 1×1 convolutions in
    blocks of 8 channels (AVX2) or 16 (AVX-512); on CUDA, tensor cores want multiples of 8."""
    setting = setting or LatencySetting()
    if setting.torch_device.type == "cuda":
        return {"default": 8}
    block = 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8
    return {"depthwise": block, "pointwise": block}


# ------------------------------------------------------------------ the measured table
def _signature(layer: LayerShape) -> str:
    spatial = layer.in_shape[:-1] if layer.kind == "linear" else layer.in_shape[1:]
    bits = [layer.kind, f"k{list(layer.kernel)}", f"s{list(layer.stride)}", f"p{layer.padding}",
            f"d{list(layer.dilation)}", f"g{layer.groups}", f"bias{int(layer.bias)}", f"x{list(spatial)}",
            f"c{layer.cin}x{layer.cout}", f"prune{int(layer.prune_in)}{int(layer.prune_out)}"]
    return "|".join(bits)


def _points(width: int, prunable: bool, grid: int) -> list[int]:
    if not prunable:
        return [width]
    return sorted({max(1, round(width * i / grid)) for i in range(1, grid + 1)})


def _standalone(layer: LayerShape, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The layer alone at widths (``cin``, ``cout``), and its input's shape (batch excluded)."""
    if layer.kind == "linear":
        return nn.Linear(cin, cout, bias=layer.bias), (*layer.in_shape[:-1], cin)
    dims = len(layer.kernel)
    transposed = layer.kind == "conv_transpose"
    cls = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d),
           3: (nn.Conv3d, nn.ConvTranspose3d)}[dims][int(transposed)]
    groups = cin if layer.kind == "depthwise" else layer.groups
    kw = {"padding": layer.padding} if not transposed or not isinstance(layer.padding, str) else {}
    module = cls(cin, cout, layer.kernel, stride=layer.stride, dilation=layer.dilation, groups=groups,
                 bias=layer.bias, **kw)
    return module, (cin, *layer.in_shape[1:])


class _Threads:
    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


class LatencyTable:
    """Per-layer latency over widths, measured on the setting's device and cached on disk (see the module doc)."""

    def __init__(self, setting: LatencySetting) -> None:
        self.setting = setting
        self.path = Path(setting.cache_dir or default_cache_dir()) / f"{setting.key()}.json"
        self.entries: dict[str, dict[str, list]] = self._read()
        self.measured = 0  # entries timed by this object (the rest came from the cache)

    def _read(self) -> dict[str, dict[str, list]]:
        try:
            return dict(json.loads(self.path.read_text()).get("entries", {}))
        except (OSError, ValueError, AttributeError):
            return {}  # no cache yet, or a damaged one: measured again

    def _time(self, layer: LayerShape, cin: int, cout: int, least: bool = False) -> float:
        """Median (``least``: minimum, the least disturbed run) of ``repeats`` timings after ``warmup``."""
        s = self.setting
        dev, dtype = s.torch_device, DTYPES[s.dtype]
        torch.manual_seed(0)
        module, shape = _standalone(layer, cin, cout)
        module = module.to(dev, dtype).eval()
        x = torch.randn(s.batch, *shape, device=dev, dtype=dtype)
        if least:
            return min(interleaved_times({"layer": lambda: module(x)}, s.repeats, warm=max(s.warmup, 1),
                                         device=dev)["layer"])
        return measure_latency(lambda: module(x), warmup=s.warmup, repeats=s.repeats, device=dev)

    def _measure(self, layer: LayerShape) -> dict[str, list]:
        if not layer.in_shape:  # never called as a module (a functional call on its weight): left to calibration
            return {"cin": [layer.cin], "cout": [layer.cout], "ms": [[0.0]]}
        g = self.setting.grid
        ins = [layer.cout] if layer.kind == "depthwise" else _points(layer.cin, layer.prune_in, g)
        outs = _points(layer.cout, layer.prune_out, g)
        with _Threads(self.setting.threads), torch.inference_mode():
            ms = [[self._time(layer, ci if layer.kind != "depthwise" else co, co) for co in outs] for ci in ins]
        for i in range(len(ins)):  # more channels never run faster: the table is made non-decreasing
            for j in range(len(outs)):
                ms[i][j] = max([ms[i][j]] + ([ms[i - 1][j]] if i else []) + ([ms[i][j - 1]] if j else []))
        return {"cin": ins, "cout": outs, "ms": ms}

    def prepare(self, layers: Iterable[LayerShape]) -> None:
        """Measure every layer signature not in the cache yet, then write the cache (atomically)."""
        missing = {}
        for layer in layers:
            key = _signature(layer)
            if key not in self.entries and key not in missing:
                missing[key] = layer
        if not missing:
            return
        for key, layer in missing.items():
            self.entries[key] = self._measure(layer)
            self.measured += 1
        merged = {**self._read(), **self.entries}  # keep what another process wrote meanwhile
        atomic_write_json(self.path, {"setting": self.setting.describe(), "entries": merged})

    def sweep(self, layer: LayerShape, side: str, widths: Sequence[int]) -> list[float]:
        """The layer's latency at each of ``widths`` on one side (``"out"``, or ``"in"``), the other width dense:
        the staircases of ``blocking.measured_round_to``. Timed once per setting and cached with the table."""
        key = f"sweep|{side}|{widths[0]}-{widths[-1]}|{_signature(layer)}"
        if key not in self.entries:
            def one(w: int) -> float:  # the least disturbed run: steps of a few % must stand out of the noise
                if side == "out":
                    return self._time(layer, w if layer.kind == "depthwise" else layer.cin, w, least=True)
                return self._time(layer, w, layer.cout, least=True)
            with _Threads(self.setting.threads), torch.inference_mode():
                self.entries[key] = {"widths": list(widths), "ms": [one(w) for w in widths]}
            self.measured += 1
            merged = {**self._read(), **self.entries}  # keep what another process wrote meanwhile
            atomic_write_json(self.path, {"setting": self.setting.describe(), "entries": merged})
        return list(self.entries[key]["ms"])

    def __call__(self, layer: LayerShape, cin: int, cout: int) -> float:
        e = self.entries[_signature(layer)]
        if layer.kind == "depthwise":
            return _interp1(e["cout"], e["ms"][0], cout)
        return _interp2(e["cin"], e["cout"], e["ms"], cin, cout)


def _bracket(points: list[int], v: float) -> tuple[int, int, float]:
    if len(points) == 1 or v <= points[0]:
        return 0, 0, 0.0
    if v >= points[-1]:
        return len(points) - 1, len(points) - 1, 0.0
    j = bisect.bisect_left(points, v)
    i = j - 1
    return i, j, (v - points[i]) / (points[j] - points[i])


def _interp1(points: list[int], values: list[float], v: float) -> float:
    i, j, t = _bracket(points, v)
    return values[i] * (1 - t) + values[j] * t


def _interp2(rows: list[int], cols: list[int], ms: list[list[float]], r: float, c: float) -> float:
    i0, i1, u = _bracket(rows, r)
    a, b = _interp1(cols, ms[i0], c), _interp1(cols, ms[i1], c)
    return a * (1 - u) + b * u


# ------------------------------------------------------------------ the model's latency
class LatencyModel:
    """Predicted latency (ms) of pruned configurations of one model: Σ over layers of ``layer_cost``.

    ``layer_cost(layer, cin, cout) = alpha * table(layer, cin, cout) + beta * (its output activations / all
    output activations of the dense model)``, where ``alpha``/``beta`` calibrate the sum of the isolated layers to
    the measured dense latency (``dense_measured_ms``; without it ``alpha = 1, beta = 0``).
    """

    def __init__(self, cost: CostModel, table: Table, dense_measured_ms: float | None = None,
                 setting: LatencySetting | None = None) -> None:
        self.cost, self.table, self.setting = cost, table, setting
        self._volume = {n: (_numel(s.out_shape) / s.cout if s.cout else 0.0) for n, s in cost.layers.items()}
        volume0 = sum(v * cost.layers[n].cout for n, v in self._volume.items()) or 1.0
        layers0 = sum(table(s, s.cin, s.cout) for s in cost.layers.values())
        self.table_dense_ms = layers0
        self.measured_ms = dense_measured_ms
        self.alpha, self.beta = 1.0, 0.0
        if dense_measured_ms is not None and layers0 > 0:
            if dense_measured_ms >= layers0:
                self.beta = (dense_measured_ms - layers0) / volume0
            else:
                self.alpha = dense_measured_ms / layers0

    def layer_cost(self, name: str, cin: int, cout: int) -> float:
        s = self.cost.layers[name]
        return self.alpha * self.table(s, cin, cout) + self.beta * self._volume[name] * cout

    def predict(self, plan: Plan) -> float:
        """Predicted latency (ms) once ``plan`` is applied."""
        return self.cost.total(plan, self.layer_cost)

    @property
    def dense_ms(self) -> float:
        return self.predict({})

    def describe(self) -> dict[str, Any]:
        return {"setting": self.setting.describe() if self.setting else None, "dense_predicted_ms": self.dense_ms,
                "dense_measured_ms": self.measured_ms, "table_dense_ms": self.table_dense_ms,
                "alpha": self.alpha, "beta_ms": self.beta}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def measure_model_ms(model: nn.Module, example_inputs: Any, setting: LatencySetting) -> float:
    """Median latency (ms) of the whole model in the setting (a copy is moved to the device and dtype)."""
    dev, dtype = setting.torch_device, DTYPES[setting.dtype]
    net = copy.deepcopy(model).to(dev, dtype).eval()
    x = map_tensors(first_samples(example_inputs),
                    lambda t: t.expand(setting.batch, *t.shape[1:]).contiguous().to(dev, dtype)
                    if t.is_floating_point() else t.expand(setting.batch, *t.shape[1:]).to(dev))
    with _Threads(setting.threads):
        return measure_latency(lambda: call_model(net, x), warmup=setting.warmup, repeats=max(setting.repeats, 5),
                               device=dev)


# ------------------------------------------------------------------ real timings, side by side
Clock = Callable[[], float]


def interleaved_times(fns: Mapping[str, Callable[[], Any]], rounds: int, *, warm: int = 1,
                      device: torch.device | str | None = None, clock: Clock = time.perf_counter
                      ) -> dict[str, list[float]]:
    """Wall times (ms) of each function over ``rounds`` rounds, measured alternately.

    Each round calls every function once, timed, right after ``warm`` untimed calls of the same function (each is
    timed warm, as one model runs over and over in deployment); even rounds go in the given order and odd rounds
    in reverse (A B, B A, ...), so that load drifting during the run hits every function alike. On CUDA the
    device is synchronised before and after each timed call. ``clock`` (seconds) is injectable for tests. This is
    the one timing function of latency targets' feedback loop and of ``mtprune bench speed``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise MTPruneInputError(f"interleaved_times: rounds must be an int >= 1, got {rounds!r}")
    dev = torch.device(device) if device is not None else None
    cuda = dev is not None and dev.type == "cuda"
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    steady_allocator()  # as after hours of serving: timings early in a process agree with later ones
    with torch.inference_mode():
        for r in range(rounds):
            for k in keys if r % 2 == 0 else keys[::-1]:
                for _ in range(warm):
                    fns[k]()
                if cuda:
                    torch.cuda.synchronize(dev)
                t0 = clock()
                fns[k]()
                if cuda:
                    torch.cuda.synchronize(dev)
                times[k].append((clock() - t0) * 1e3)
    return times


def times_to_precision(fns: Mapping[str, Callable[[], Any]], reference: str, rounds: int, *,
                       precision: float = 0.0, max_rounds: int | None = None,
                       device: torch.device | str | None = None, clock: Clock = time.perf_counter
                       ) -> dict[str, list[float]]:
    """:func:`interleaved_times` in blocks of ``rounds`` rounds, more blocks while some function's median ratio to
    ``reference`` (:func:`median_ratios`) is less certain than ``precision`` (relative standard error, estimated
    robustly as 1.2533 × 1.4826 × MAD of the per-round ratios / √n / median), up to ``max_rounds`` (default 4 ×
    ``rounds``); ``precision`` 0: one block. On the 2-core benchmark machine two 5-round timings of one plan
    came out 43.3 and 50.3 ms: more than the whole 5 % tolerance of a latency target."""
    limit = max(rounds, max_rounds if max_rounds is not None else 4 * rounds)
    times: dict[str, list[float]] = {k: [] for k in fns}
    while True:
        block = interleaved_times(fns, min(rounds, limit - len(times[reference])), device=device, clock=clock)
        for k, v in block.items():
            times[k].extend(v)
        if precision <= 0 or len(times[reference]) >= limit or ratio_error(times, reference) <= precision:
            return times


def ratio_error(times: Mapping[str, Sequence[float]], reference: str) -> float:
    """The largest relative standard error of the functions' median ratios to ``reference`` (0 for one round)."""
    ref, worst = times[reference], 0.0
    for k, v in times.items():
        if k == reference or len(v) < 2:
            continue
        ratios = _round_ratios(v, ref)
        mid = statistics.median(ratios)
        mad = statistics.median(abs(x - mid) for x in ratios)
        worst = max(worst, 1.2533 * 1.4826 * mad / math.sqrt(len(ratios)) / mid)
    return worst


def median_ratios(times: Mapping[str, Sequence[float]], reference: str) -> dict[str, float]:
    """Per function, the median over rounds of its time / the ``reference``'s time in the same round (the
    reference's own ratio is 1). Speed-ups are the inverses."""
    return {k: statistics.median(_round_ratios(v, times[reference])) for k, v in times.items()}


def _round_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per round, a function's time over the reference's time in the same round."""
    return [t / r for t, r in zip(times, reference, strict=True)]


def timing_inputs(example_inputs: Any, setting: LatencySetting, seed: int = 0) -> Any:
    """The inputs the setting times a model on: the first sample of ``example_inputs`` expanded to the setting's
    batch, floating tensors replaced by seeded uniform noise (zeros can take kernels' fast paths), on the
    setting's device and dtype."""
    dev, dtype = setting.torch_device, DTYPES[setting.dtype]
    g = torch.Generator().manual_seed(seed)

    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.expand(setting.batch, *t.shape[1:])
        if t.is_floating_point():
            return torch.rand(t.shape, generator=g).to(dev, dtype)
        return t.contiguous().to(dev)

    return map_tensors(first_samples(example_inputs), one)


class PairedTimer:
    """Latency of candidate models as a ratio to a reference model (the dense one) timed alongside them.

    Each call times the reference and the candidate with :func:`interleaved_times` for ``rounds`` rounds (default
    ``max(setting.repeats, 5)``) in the setting (device, dtype, threads, batch), on :func:`timing_inputs`, and
    returns ``ratio`` (median over rounds of candidate / reference, :func:`median_ratios`), and the medians
    ``reference_ms`` and ``candidate_ms``; with ``setting.precision`` the rounds are repeated (up to 4 times) until
    the ratio is that certain (:func:`times_to_precision`), ``rounds_timed`` says how many were. The reference is
    copied once; a candidate is moved to the device as it is (pass a copy you can spare)."""

    def __init__(self, reference: nn.Module, example_inputs: Any, setting: LatencySetting,
                 rounds: int | None = None, clock: Clock = time.perf_counter) -> None:
        self.setting, self.clock = setting, clock
        self.rounds = rounds or max(setting.repeats, 5)
        self.reference = copy.deepcopy(reference).to(setting.torch_device, DTYPES[setting.dtype]).eval()
        self.inputs = timing_inputs(example_inputs, setting)

    def __call__(self, candidate: nn.Module) -> dict[str, float]:
        net = candidate.to(self.setting.torch_device, DTYPES[self.setting.dtype]).eval()
        fns = {"reference": lambda: call_model(self.reference, self.inputs),
               "candidate": lambda: call_model(net, self.inputs)}
        with _Threads(self.setting.threads):
            times = times_to_precision(fns, "reference", self.rounds, precision=self.setting.precision,
                                       device=self.setting.torch_device, clock=self.clock)
        return {"ratio": median_ratios(times, "reference")["candidate"],
                "reference_ms": statistics.median(times["reference"]),
                "candidate_ms": statistics.median(times["candidate"]), "rounds_timed": len(times["reference"])}


def check_floor(target: str, value: float, goal_ms: float, floor: Mapping[str, float], dense_ms: float,
                min_channels: int) -> None:
    """Refuse a latency goal below the floor: the latency with every prunable layer at its minimum width
    (``floor["measured_ms"]`` when it was timed, else ``floor["predicted_ms"]``). Below it no allocation can reach
    the goal, and trying cuts every layer to the minimum for nothing."""
    how = "measured" if "measured_ms" in floor else "predicted"
    ms = floor[f"{how}_ms"]
    if goal_ms < ms:
        raise MTPruneInputError(
            f"{target}={value} is below this model's latency floor: with every prunable layer at its minimum width "
            f"(min_channels={min_channels}) it runs in {ms:.4g} ms ({how}), {ms / dense_ms:.3f} of the dense "
            f"latency, against a goal of {goal_ms:.4g} ms; ask for more, or lower min_channels")


def latency_model(model: nn.Module, example_inputs: Any, cost: CostModel,
                  setting: LatencySetting | Mapping[str, Any] | None = None) -> LatencyModel:
    """The latency model of ``model`` (dense, as ``cost`` was built on it): the table is loaded from the cache or
    measured, and the dense model timed once to calibrate it (unless ``calibrate`` is off or a table injected)."""
    s = LatencySetting.parse(setting)
    table: Table = s.table if s.table is not None else LatencyTable(s)
    prepare = getattr(table, "prepare", None)
    if prepare is not None:
        prepare(cost.layers.values())
    dense = measure_model_ms(model, example_inputs, s) if s.calibrate and s.table is None else None
    return LatencyModel(cost, table, dense, s)


def model_latency(model: nn.Module, example_inputs: Any,
                  setting: LatencySetting | Mapping[str, Any] | None = None) -> float:
    """Predicted latency (ms) of ``model`` as it is, in ``setting`` (with a measured table: its measured latency)."""
    return latency_model(model, example_inputs, CostModel(model, example_inputs, None), setting).dense_ms


def setting_dict(setting: LatencySetting) -> dict[str, Any]:
    """The JSON-able fields of a setting (the injected table left out)."""
    return {f.name: getattr(setting, f.name) for f in fields(setting) if f.name != "table"}


def close_the_loop(goal_ms: float, plan: Any, replan: Any, measure: Any, rounds: int,
                   tolerance: float = 0.02, floor_ms: float | None = None,
                   known: Sequence[tuple[float, float]] = (), first_ask: float | None = None
                   ) -> tuple[Any, list[dict[str, float]]]:
    """Correct a latency plan with real timings: time the pruned configuration (``measure(plan)`` in ms; in
    ``prune``, its ratio to the dense model timed alongside, :class:`PairedTimer`, times the dense latency); while
    it misses ``goal_ms`` by more than ``tolerance``, ask the allocator for another predicted latency
    (``replan(ms)``, chosen by :func:`_next_ask` from the trials and the ``known`` (asked, measured) pairs: the
    dense model, asked its own predicted latency, measures the dense latency; the floor's pair when it was timed);
    at most ``rounds`` timings. Asks are in ``replan``'s unit: ``first_ask`` is what ``plan`` was asked with (by
    default ``goal_ms``: the allocator asked the goal itself; a MACs-asking replan passes the MACs it cut at).
    Asks never go below ``floor_ms`` (the predicted latency with every prunable layer at its minimum width), and
    the loop stops when a request at least 5 % lower bought less than 1 % of real latency: the latency has
    stopped falling, and asking for less would only remove MACs. Returns the plan measured closest to the goal
    (preferring those no more than 5 % over it; on a tie the earlier, less pruned one) and the trials (the
    returned plan's marked ``chosen``). The per-layer table misses what isolated layers do not show (cache
    effects, thin layers' fixed costs); this loop, not the table, is what brings the real latency within a few %."""
    trials: list[dict[str, float]] = []
    best: tuple[tuple[bool, float], Any, int] | None = None
    ask = goal_ms if first_ask is None else first_ask
    for _ in range(rounds):
        got = float(measure(plan))
        trials.append({"asked_ms": ask, "measured_ms": got})
        key = (got > goal_ms * 1.05, abs(got - goal_ms))
        if best is None or key < best[0]:
            best = (key, plan, len(trials) - 1)
        if abs(got - goal_ms) <= tolerance * goal_ms or got <= 0 or len(trials) == rounds:
            break
        if len(trials) >= 2:
            (a0, m0), (a1, m1) = ((t["asked_ms"], t["measured_ms"]) for t in trials[-2:])
            if m0 > goal_ms and a1 <= 0.95 * a0 and m1 >= 0.99 * m0:
                trials[-1]["flat"] = True  # the latency stopped falling: more cuts would only remove MACs
                break
        ask = _next_ask([*known, *((t["asked_ms"], t["measured_ms"]) for t in trials)], goal_ms)
        if floor_ms is not None:
            if ask <= floor_ms and trials[-1]["asked_ms"] <= floor_ms:
                break  # already at the floor
            ask = max(ask, floor_ms)
        if ask <= 0:
            break
        plan = replan(ask)
    if best is None:
        return plan, trials
    trials[best[2]]["chosen"] = True
    return best[1], trials


def pick_by_importance(goal_ms: float, candidates: Mapping[str, tuple[float, float]], slack: float = 0.05) -> str:
    """The candidate plan to keep at a latency goal: ``candidates[name] = (measured_ms, importance_removed)``.
    Among those measured no more than ``slack`` over the goal, the one that removed the least importance (HALP's
    objective, Shen et al., NeurIPS 2022: the most importance within the latency); if none is, the fastest."""
    within = [k for k, (ms, _) in candidates.items() if ms <= goal_ms * (1 + slack)]
    if within:
        return min(within, key=lambda k: candidates[k][1])
    return min(candidates, key=lambda k: candidates[k][0])


def _next_ask(points: list[tuple[float, float]], goal: float) -> float:
    """The next predicted latency to ask the allocator for, from the (asked, measured) pairs so far (all > 0).

    Real latency against the asked one is monotone but curved (convex: thin layers keep fixed costs), close to a
    power law, so steps are taken in log-log space. Once the goal is bracketed, by the pair measured nearest
    below it and the one nearest above (in ``prune`` the dense and floor pairs bracket it from the start):
    interpolation between them, which stays inside the bracket whatever the noise (a secant through two pairs on
    one side of a convex curve overshoots). Before that: the log-log secant through the two pairs measured
    nearest the goal when its slope is positive, else the nearest ask scaled by goal / measured, at most halving
    or doubling it."""
    below = [p for p in points if p[1] < goal]
    above = [p for p in points if p[1] > goal]
    if below and above:
        (a0, m0), (a1, m1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        return a0 * (a1 / a0) ** (math.log(goal / m0) / math.log(m1 / m0))
    near = sorted(points, key=lambda p: abs(math.log(p[1] / goal)))
    a1, m1 = near[0]
    ask = a1 * goal / m1
    if len(near) >= 2:
        a0, m0 = near[1]
        if a0 != a1 and m0 != m1 and math.log(m1 / m0) / math.log(a1 / a0) > 0:
            ask = a1 * (goal / m1) ** (math.log(a1 / a0) / math.log(m1 / m0))
    return min(max(ask, a1 / 2), 2 * a1)
