"""Distributed data parallel under ``torchrun``; every helper is a no-op in a single process.

``torchrun --nproc_per_node N ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; ``init_distributed`` reads them
and starts the process group (NCCL on CUDA, Gloo on CPU). A process group started by the caller (e.g. with
``torch.multiprocessing.spawn``) is used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler

from ..utils.runtime import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def rank_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device for this process: ``auto``/``cuda`` map to this rank's GPU (LOCAL_RANK) under torchrun."""
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Start the process group from torchrun's variables when WORLD_SIZE > 1 (once); return this rank."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", rank()))
    return DistInfo(rank=rank(), world_size=world_size(), local_rank=local)


def shutdown_distributed() -> None:
    """Wait for every rank, then end the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _comm_device(t: Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks (a new tensor on ``t``'s device); returns ``t`` itself in one process."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(t)).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of parameters that DDP does not see (e.g. a weighting's log-variances)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            p.grad.copy_(all_reduce_sum(p.grad) / world_size())


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj_rank0, obj_rank1, ...]`` (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def train_sampler(dataset: Sized, seed: int, drop_last: bool = False) -> DistributedSampler:
    """A shuffling sampler whose order depends only on ``(seed, epoch)`` (call ``set_epoch``).

    Used in one process too: rank r takes positions r, r+W, ... of one permutation, so W ranks with batch
    B see exactly the samples of one process with batch W·B.
    """
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=drop_last
    )


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank+W, ...`` without padding, so that sums over ranks cover the split exactly once."""

    def __init__(self, dataset: Sized) -> None:
        self.indices = range(rank(), len(dataset), world_size())

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def wrap_model(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap in DDP when distributed (the model must already be on ``device``); else return it as is."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
