"""Shared test settings: one intra-op thread (tiny ops on 2 busy cores are far slower with more)."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """For tests that start real ``mtprune`` processes: one data cache shared by the test and its processes,
    one thread per process, fixed hashing."""
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    out = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    out.pop("PYTEST_CURRENT_TEST", None)
    return out
