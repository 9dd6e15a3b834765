"""Channel blocking of the device's kernels, read off measured latencies (``round_to="measured"``).

Convolution kernels process channels in blocks (oneDNN on AVX-512 CPUs: 16 fp32 channels per vector register;
tensor cores: multiples of 8): a layer of 65 output channels runs as one of 80, so its latency against its width is
a **staircase** whose treads are the block. A width just above a multiple of the block pays for a whole block more
than it computes; one on the multiple pays for nothing it does not use. Rounding kept widths to the block
(``round_to``) makes every MAC kept a MAC that runs at full speed, which is what lets latency fall as MACs do
(fidelity, ``mtprune bench speed``).

This module finds the block per layer kind from timings instead of assuming it (``latency.hardware_round_to``
assumes it from the CPU's instruction set):

- :func:`detect_block` tests a latency-against-width sweep over contiguous widths for a staircase of period b
  (b = 2, 4, ..., 32): a step function whose treads are the intervals (kb - b, kb] fits the sweep much better
  (mean absolute deviation from each tread's median) than the same step function shifted by 1, ..., b - 1
  (the median of those b - 1 misfits: the control). Noise and smooth trends fit every phase alike; a real
  staircase of period B fits every b dividing B aligned far better than shifted, and b = 2B no better aligned
  than shifted by B. The largest b that passes, with steps large enough to matter, is the block; none: 1. In
  simulation (a linear trend times one-sided Gaussian noise, sweeps of widths 33-128, 100 seeds each), a
  staircase of 16 was found in 89 % of sweeps at 5 % noise, of 32 in all, and a smooth sweep got no block in
  98 %; on a loaded machine (noise 15-20 %) it finds nothing, which leaves widths unrounded.
- :func:`measured_round_to` sweeps one representative prunable layer of each kind in a model (the MACs-weighted
  median one among those wide enough for the sweep, feature maps only) over its output width and over its input
  width, the other width dense, and returns the largest block found per kind, as a ``round_to`` dict per layer kind
  (``allocate.group_round_to``). Sweeps are timed by the latency table (``LatencyTable.sweep``: same setting,
  cached per device with the table), or read from an injected table (``LatencySetting.table``: no timing).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence

from ..utils.errors import MTPruneInputError
from .cost import CostModel, LayerShape
from .latency import LatencySetting, LatencyTable

__all__ = ["BLOCKS", "detect_block", "device_round_to", "measured_round_to", "sweep_widths"]

BLOCKS = (2, 4, 8, 16, 32)  # block sizes tested, smallest first
MIN_GAIN = 1.25  # aligned treads must fit at least this much better than the median shifted phase
MIN_STEP = 0.03  # ... with a median step of at least this share of the sweep's median latency
Sweep = Callable[[LayerShape, str, Sequence[int]], list[float]]


def _treads(widths: Sequence[int], ms: Sequence[float], b: int, shift: int) -> list[list[float]]:
    """The sweep's latencies grouped by tread ((kb - b, kb] shifted by ``shift``), complete treads only."""
    by: dict[int, list[float]] = {}
    for w, t in zip(widths, ms, strict=True):
        by.setdefault((w + shift - 1) // b, []).append(t)
    return [v for v in by.values() if len(v) == b]


def _misfit(treads: list[list[float]]) -> float:
    """Mean absolute deviation from each tread's median."""
    n = sum(len(t) for t in treads)
    return sum(abs(v - statistics.median(t)) for t in treads for v in t) / n


def detect_block(widths: Sequence[int], ms: Sequence[float], blocks: Iterable[int] = BLOCKS,
                 min_gain: float = MIN_GAIN, min_step: float = MIN_STEP) -> int:
    """The channel block of a latency sweep over contiguous ``widths`` (ascending, step 1): the largest ``b`` in
    ``blocks`` whose aligned staircase fits ``min_gain`` times better than its shifted phases (median; at least two
    complete treads in each phase) with a median step between aligned treads of at least ``min_step`` × the median
    latency; 1 when none does (module docstring)."""
    widths, ms = list(widths), [float(v) for v in ms]
    if len(widths) != len(ms) or any(b - a != 1 for a, b in zip(widths, widths[1:], strict=False)):
        raise MTPruneInputError("detect_block: widths must be contiguous ascending integers, one latency each")
    level = statistics.median(ms) if ms else 0.0
    found = 1
    for b in sorted(blocks):
        phases = [_treads(widths, ms, b, shift) for shift in range(b)]
        if any(len(p) < 2 for p in phases):
            continue
        aligned = phases[0]
        steps = [statistics.median(hi) - statistics.median(lo) for lo, hi in zip(aligned, aligned[1:], strict=False)]
        fit, control = _misfit(aligned), statistics.median(_misfit(p) for p in phases[1:])
        if statistics.median(steps) >= min_step * level and control >= min_gain * fit and control > 0:
            found = b
    return found


def sweep_widths(width: int, block: int) -> list[int]:
    """The contiguous widths a layer of dense ``width`` is swept over to find blocks up to ``block``: three treads
    of the largest block (two when it is narrower), from ``block + 1`` up, where a block's step is a large share of
    the latency (``block`` + 1 to 4 × ``block`` for a wide layer)."""
    top = min(width // block, 4) * block
    span = 3 * block if top >= 3 * block else 2 * block
    return list(range(max(top - span + 1, 1), top + 1))


def _largest_block(width: int) -> int:
    """The largest block a sweep below ``width`` can test (two treads of it must fit)."""
    fits = [b for b in BLOCKS if width >= 2 * b]
    return fits[-1] if fits else 1


def _representatives(cost: CostModel) -> dict[tuple[str, str], LayerShape]:
    """Per (layer kind, side swept), the layer where the MACs of the kind's prunable layers (those on feature maps
    wide enough for the widest sweep) pass half their total: a layer like those the time goes to."""
    pools: dict[tuple[str, str], list[tuple[int, LayerShape]]] = {}
    for s in cost.layers.values():
        if not s.in_shape or s.kind in ("grouped",):  # grouped: widths move by whole groups, round_to by hand
            continue
        spatial = s.out_shape[:-1] if s.kind == "linear" else s.out_shape[1:]
        if s.kind != "linear" and all(d == 1 for d in spatial):  # a pooled branch: a matrix-vector product
            continue
        sides = [("out", s.cout)] if s.prune_out else []
        if s.prune_in and s.kind != "depthwise":  # depthwise: one width, its output's
            sides.append(("in", s.cin))
        for side, width in sides:
            pools.setdefault((s.kind, side), []).append((_largest_block(width), s))
    out = {}
    for key, pool in pools.items():
        widest = max(b for b, _ in pool)
        if widest <= 1:
            continue
        layers = sorted((s for b, s in pool if b == widest), key=lambda s: (s.macs, s.name))
        half, run = sum(s.macs for s in layers) / 2, 0
        for s in layers:
            run += s.macs
            if run >= half:
                out[key] = s
                break
    return out


def table_sweep(table: Callable[[LayerShape, int, int], float]) -> Sweep:
    """A sweep read from a table function ``table(layer, cin, cout)`` (an injected table: no timing)."""
    def sweep(layer: LayerShape, side: str, widths: Sequence[int]) -> list[float]:
        if side == "out":
            return [table(layer, w if layer.kind == "depthwise" else layer.cin, w) for w in widths]
        return [table(layer, w, layer.cout) for w in widths]
    return sweep


def measured_round_to(cost: CostModel, sweep: Sweep) -> dict[str, int]:
    """``round_to`` per layer kind from sweeps of each kind's representative layer (module docstring): the
    largest block detected on its output or input width; kinds without a staircase get 1 (no rounding)."""
    found: dict[str, int] = {"default": 1}
    for (kind, side), layer in sorted(_representatives(cost).items()):
        width = layer.cout if side == "out" else layer.cin
        widths = sweep_widths(width, _largest_block(width))
        found[kind] = max(found.get(kind, 1), detect_block(widths, sweep(layer, side, widths)))
    return found


def device_round_to(cost: CostModel, setting: LatencySetting) -> dict[str, int]:
    """``round_to="measured"``: :func:`measured_round_to` on the setting's device, sweeps timed by its latency
    table (cached per device and setting), or read from its injected table."""
    sweep = table_sweep(setting.table) if setting.table is not None else LatencyTable(setting).sweep
    return measured_round_to(cost, sweep)
