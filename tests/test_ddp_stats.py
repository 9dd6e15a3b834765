"""Pruning statistics under DDP (2 Gloo processes on CPU): reduced across ranks, they equal one process's
statistics over all the batches, so every rank takes the same pruning decision."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtprune.models import build_model
from mtprune.pruning.criteria import get_criterion
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.prune import criterion_scores
from mtprune.pruning.stats import StatisticsEngine
from mtprune.tasks import preset

WORLD = 2
CRITERIA = ("taylor", "cosprune", "task_taylor")


def _setup():
    torch.manual_seed(0)
    tasks = preset("nyuv2", num_classes=4)
    model = build_model("deeplab_resnet18", {t: k.out_channels for t, k in tasks.items()}, width=0.125,
                        head="conv").eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x = torch.rand(2, 3, 24, 32, generator=g)
        batches.append((x, {"seg": torch.randint(0, 4, (2, 24, 32), generator=g),
                            "depth": torch.rand(2, 1, 24, 32, generator=g) + 0.1,
                            "normal": torch.nn.functional.normalize(torch.randn(2, 3, 24, 32, generator=g), dim=1)}))
    return model, tasks, batches


def _scores(batches):
    model, tasks, _ = _setup()
    graph = PruningGraph(model, batches[0][0][:1])
    crits = [get_criterion(c) for c in CRITERIA]
    engine = StatisticsEngine(model, graph, {t: k.loss for t, k in tasks.items()}, crits)
    engine.run(batches)
    return {c.name: criterion_scores(model, graph, c, engine=engine) for c in crits}


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        _, _, batches = _setup()
        torch.save(_scores(batches[rank::WORLD]), f"{tmp}/rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_statistics_reduced_across_ranks_equal_single_process(tmp_path):
    ctx = mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            pytest.fail("DDP workers did not finish in time")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    _, _, batches = _setup()
    single = _scores(batches)
    local = _scores(batches[0::WORLD])  # what rank 0 would decide without the reduction
    for name in CRITERIA:
        assert set(ranks[0][name]) == set(single[name])
        differs = False
        for k, expected in single[name].items():
            for r in ranks:
                torch.testing.assert_close(r[name][k], expected, rtol=1e-4, atol=1e-12)
            differs |= not torch.allclose(local[name][k], expected, rtol=1e-4)
        assert differs, f"{name}: the test cannot tell reduced from unreduced statistics"
