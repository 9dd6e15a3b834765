"""Device choice and seeding. Nothing in mtprune hard-codes a device."""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def check_device(device: str | None) -> None:
    """Refuse a device name that is not ``auto``, ``cpu``, ``cuda``/``cuda:N`` or ``mps``, or that this machine
    does not have (``MTPruneInputError`` naming it)."""
    from .errors import MTPruneInputError

    if device in (None, "auto"):
        return
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise MTPruneInputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise MTPruneInputError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MTPruneInputError(f"device {device!r} was asked for but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MTPruneInputError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MTPruneInputError(f"device {device!r} was asked for but MPS is not available")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    check_device(device)
    return torch.device(device)


def cpu_model() -> str:
    """The processor's name as the OS gives it (``model name`` in /proc/cpuinfo on Linux), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device = "cpu") -> str:
    """What a timing depends on, in words: the GPU's name, or the CPU's model with its vector instruction set
    (oneDNN picks its kernels by it: the latency_quality suite's dense model ran a batch in 67-77 ms on a 2-core
    AVX2 EPYC and in 19-24 ms on a 2-core AVX-512 machine, 2026-12-04)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return f"{cpu_model()} ({platform.machine()} {torch.backends.cpu.get_cpu_capability()})"
    return dev.type


#: just under glibc's ceiling on its dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit)
_STEADY_BLOCK = 31 << 20


def steady_allocator() -> None:
    """Put malloc in the state a long-running process settles in before anything is timed on the CPU.

    glibc serves large blocks with fresh mmaps (each page faulted in on every call) until the process frees a
    mapped block bigger than its threshold; the threshold then rises to that block's size, and later blocks come
    from the reused heap. Timings taken before and after that moment differ: the same pruned model timed 2-7 %
    slower against its dense model after the latency table was measured than before it, in 3 of 4 runs, and within
    1 % in 3 of 3 runs after this warm-up (Deeplab-ResNet-18 testbed, MACs 0.5 and 0.1, 2026-12-04). Allocating
    and freeing one block just under the ceiling raises the threshold once and for all; elsewhere it is a no-op."""
    block = torch.empty(_STEADY_BLOCK, dtype=torch.uint8)
    del block


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside; afterwards every module gets its own ``training`` flag back (mixed modes survive)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was
