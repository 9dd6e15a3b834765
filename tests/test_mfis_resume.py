"""``mtprune merge`` with MFIS resumes its NSGA-III search generation by generation, bit-identically
(``solve(..., checkpoint=)``; ``search_state.pt`` in a run directory)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from mtprune.utils.errors import MTPruneInputError
from test_mfis import random_landscape
from test_reliability_resume_sparsify_merge import MFIS, cli, killed_after, same_files, scramble_rngs, write

solve_mod = importlib.import_module("mtprune.merging.mfis.solve")  # the package exports a function of that name

torch.set_num_threads(1)
N_GEN = 8


class Killed(BaseException):
    """A simulated kill, right after a generation's state is written."""


def interrupted_then_resumed(land, path: Path, k: int, counts=None):
    real = solve_mod._save_state

    def save_then_die(where, algorithm, *args):
        real(where, algorithm, *args)
        if algorithm.n_iter - 1 == k:
            raise Killed

    with mock.patch.object(solve_mod, "_save_state", save_then_die), pytest.raises(Killed):
        solve_mod.solve(land, pop_size=16, n_gen=N_GEN, seed=3, counts=counts, checkpoint=path)
    np.random.seed(12345)  # the resumed search must not depend on the global generator
    saves = []

    def counted(*args):
        saves.append(args[1].n_iter - 1)
        real(*args)

    with mock.patch.object(solve_mod, "_save_state", counted):
        front = solve_mod.solve(land, pop_size=16, n_gen=N_GEN, seed=3, counts=counts, checkpoint=path)
    assert saves == list(range(k + 1, N_GEN + 1))  # it went on from generation k, not from the start
    return front


@pytest.mark.parametrize("rate", [False, True])
def test_search_resumes_after_any_generation_bit_identically(tmp_path, rate):
    land = random_landscape(np.random.default_rng(0))
    counts = [max(1, layer.width // 2) for layer in land.layers] if rate else None
    ref = solve_mod.solve(land, pop_size=16, n_gen=N_GEN, seed=3, counts=counts)
    for k in (1, 2, 5, N_GEN - 1, N_GEN):
        front = interrupted_then_resumed(land, tmp_path / f"state{k}.pt", k, counts)
        assert np.array_equal(front.X, ref.X) and np.array_equal(front.F, ref.F), k
        assert front.history == ref.history and front.settings == ref.settings
        assert not list(tmp_path.glob("*.tmp"))


def test_damaged_or_foreign_state_file_is_an_input_error_naming_it(tmp_path):
    land = random_landscape(np.random.default_rng(0))
    path = tmp_path / "search_state.pt"
    solve_mod.solve(land, pop_size=16, n_gen=2, seed=3, checkpoint=path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(MTPruneInputError, match="search_state.pt"):
        solve_mod.solve(land, pop_size=16, n_gen=4, seed=3, checkpoint=path)
    path.write_bytes(good)  # other settings, or another landscape
    with pytest.raises(MTPruneInputError, match="search_state.pt.*seed"):
        solve_mod.solve(land, pop_size=16, n_gen=2, seed=4, checkpoint=path)
    other = random_landscape(np.random.default_rng(1))
    with pytest.raises(MTPruneInputError, match="search_state.pt.*other networks"):
        solve_mod.solve(other, pop_size=16, n_gen=2, seed=3, checkpoint=path)


def test_merge_resumes_the_search_after_a_generation(tmp_path, env):
    config = {**MFIS, "train": {**MFIS["train"], "epochs": 1}, "merge": {**MFIS["merge"], "generations": 3,
                                                                          "finetune": {"epochs": 0}}}
    cfg = write(tmp_path / "mfis.yaml", config)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("merge", cfg, "--out", ref) == 0
    with killed_after("search_state.pt", nth=2):
        cli("merge", cfg, "--out", run)
    assert (run / "search_state.pt").is_file() and not (run / "search.pt").exists()
    scramble_rngs()
    assert cli("merge", cfg, "--out", run, "--resume") == 0
    assert not (run / "search_state.pt").exists() and (run / "search.pt").is_file()
    same_files(ref / "mfis.mtp", run / "mfis.mtp")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert a["mfis"]["front"]["F"] == b["mfis"]["front"]["F"]
