"""The one timing function of latency targets and of ``mtprune bench speed`` (pruning/latency.interleaved_times,
median_ratios, PairedTimer). Deterministic: a fake clock advanced by the functions (or models) themselves, so
nothing is timed for real."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from mtprune.pruning.latency import (
    LatencySetting,
    PairedTimer,
    interleaved_times,
    median_ratios,
    ratio_error,
    times_to_precision,
)
from mtprune.utils.errors import MTPruneInputError


class FakeClock:
    """Seconds that advance only when a timed function says so; ``load`` multiplies every cost (drift)."""

    def __init__(self) -> None:
        self.now, self.load, self.log = 0.0, 1.0, []

    def __call__(self) -> float:
        return self.now

    def run(self, name: str, ms: float) -> None:
        self.log.append(name)
        self.now += ms * self.load / 1e3


def test_rounds_alternate_and_each_timed_call_follows_a_warm_one():
    clock = FakeClock()
    fns = {"a": lambda: clock.run("a", 10.0), "b": lambda: clock.run("b", 4.0)}
    times = interleaved_times(fns, 3, clock=clock)
    # round 0: a b, round 1: b a (reversed), round 2: a b; each timed call right after an untimed one of itself
    assert clock.log == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert times == {"a": [pytest.approx(10.0)] * 3, "b": [pytest.approx(4.0)] * 3}
    clock.log.clear()
    interleaved_times(fns, 2, warm=0, clock=clock)
    assert clock.log == ["a", "b", "b", "a"]


def test_ratio_measured_alongside_survives_load_drift():
    """Load doubles every round: absolute times drift 8×, the per-round ratio does not move."""
    clock = FakeClock()

    def slow_down():  # called first in each round (even rounds: ``a`` is first; odd ones: ``b``)
        clock.load *= 2

    fns = {"a": lambda: clock.run("a", 10.0), "b": lambda: clock.run("b", 4.0)}
    rounds = []

    def first(name):
        def fn():
            if not rounds or rounds[-1] != len(clock.log) // 4:
                rounds.append(len(clock.log) // 4)
                slow_down()
            fns[name]()
        return fn

    times = interleaved_times({"a": first("a"), "b": first("b")}, 4, clock=clock)
    assert max(times["a"]) / min(times["a"]) == pytest.approx(8.0)  # the absolute figure is useless here
    assert median_ratios(times, "a") == {"a": pytest.approx(1.0), "b": pytest.approx(0.4)}


def test_bad_rounds_are_refused():
    with pytest.raises(MTPruneInputError, match="rounds"):
        interleaved_times({"a": lambda: None}, 0)


def test_rounds_are_added_until_the_ratio_is_as_certain_as_asked():
    """b's rounds cycle through 4, 5 and 6 ms against a's 10: per-round ratios 0.4 / 0.5 / 0.6, relative standard
    error of their median 0.372 / √n. Asked for 0.1, 5-round blocks stop at 15 rounds (0.096; 10 give 0.118);
    asked for 0.01 they stop at the limit; precision 0 times one block."""
    def fns(clock):
        calls = {"b": 0}

        def b():
            clock.run("b", 4.0 + (calls["b"] // 2) % 3)  # the same for a round's warm and timed call
            calls["b"] += 1
        return {"a": lambda: clock.run("a", 10.0), "b": b}

    for precision, max_rounds, rounds in [(0.1, None, 15), (0.01, None, 20), (0.01, 12, 12), (0.0, None, 5)]:
        clock = FakeClock()
        times = times_to_precision(fns(clock), "a", 5, precision=precision, max_rounds=max_rounds, clock=clock)
        assert len(times["a"]) == len(times["b"]) == rounds
        assert sorted({round(t, 6) for t in times["b"]}) == [4.0, 5.0, 6.0]
    assert ratio_error(times, "a") == pytest.approx(1.2533 * 1.4826 * 0.1 / 5 ** 0.5 / 0.5)


def test_bad_precision_is_refused():
    with pytest.raises(MTPruneInputError, match="precision"):
        LatencySetting.parse({"precision": 1.5})


CLOCK = FakeClock()  # module-level: the models below find it by name, so copies of them share it


class Costly(nn.Module):
    """A model whose forward 'takes' ``ms`` on the fake clock (its width sets the cost)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        CLOCK.run(f"w{self.conv.out_channels}", float(self.conv.out_channels))
        return {"seg": self.conv(x)}


def test_paired_timer_times_candidate_against_the_reference_alongside():
    CLOCK.log.clear()
    setting = LatencySetting(batch=2)
    dense = Costly(20)
    timer = PairedTimer(dense, torch.zeros(1, 3, 4, 4), setting, rounds=3, clock=CLOCK)
    assert timer.inputs.shape == (2, 3, 4, 4) and float(timer.inputs.abs().sum()) > 0  # the batch, not zeros
    CLOCK.load = 3.0  # a loaded machine: both models slow down alike
    got = timer(Costly(5))
    assert got["ratio"] == pytest.approx(0.25)
    assert got["reference_ms"] == pytest.approx(60.0) and got["candidate_ms"] == pytest.approx(15.0)
    assert CLOCK.log == ["w20", "w20", "w5", "w5", "w5", "w5", "w20", "w20", "w20", "w20", "w5", "w5"]
    assert timer.reference is not dense  # the caller's model is not moved or changed
    CLOCK.load = 1.0


_MAPS_PROBE = """
import sys, torch
from mtprune.pruning.latency import interleaved_times
if sys.argv[1] == "timed":
    interleaved_times({"noop": lambda: None}, 1)
def maps():
    return set(open("/proc/self/maps").read().splitlines())
def size(line):
    lo, hi = line.split()[0].split("-")
    return int(hi, 16) - int(lo, 16)
before = maps()
block = torch.empty(8 << 20, dtype=torch.uint8)
print(sum(len(line.split()) == 5 and size(line) >= 8 << 20 for line in maps() - before))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_timing_starts_from_the_allocators_steady_state():
    """A fresh process maps every large block anew (an anonymous mapping appears for it); once anything has been
    timed, large blocks come from the heap, as in a process that has run a while (utils.runtime.steady_allocator)."""
    def new_mappings(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _MAPS_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert new_mappings("fresh") == 1
    assert new_mappings("timed") == 0
