"""DDP on CPU: 2 processes with Gloo train a tiny 2-task problem and are checked against one process."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtprune.engine import Trainer, evaluate
from mtprune.engine.distributed import shutdown_distributed
from test_engine import ToyScenes, make_model, one_thread, quick, read_jsonl, toy_tasks  # noqa: F401

WORLD = 2
HEADS = ("seg", "depth", "extra")  # "extra" is no task here: DDP must find its unused parameters
OPTIONS = {"epochs": 2, "optimizer": "sgd", "momentum": 0.0, "lr": 0.1, "weighting": "uncertainty"}


def _val_data():
    return ToyScenes(7, seed=1)  # odd: the two shards differ in size


def _fit(run_dir, batch_size: int):
    model = make_model(heads=HEADS)
    config = quick(batch_size=batch_size, **OPTIONS)
    trainer = Trainer(model, toy_tasks(), ToyScenes(16), _val_data(), run_dir, config)
    return model, trainer, trainer.fit()


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model, trainer, summary = _fit(f"{tmp}/run", batch_size=2)
        torch.save({
            "model": model.state_dict(),
            "weighting": trainer.weighting.state_dict(),
            "final": summary.final_metrics,
            "evaluated": evaluate(model, _val_data(), toy_tasks(), device="cpu", batch_size=3),
        }, f"{tmp}/rank{rank}.pt")
    finally:
        shutdown_distributed()


def _spawn(tmp, timeout: float = 120.0) -> None:
    ctx = mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            pytest.fail(f"DDP workers did not finish within {timeout} s")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    _spawn(tmp)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ranks_end_with_identical_weights(ddp_run):
    tmp, ranks = ddp_run
    for key in ("model", "weighting"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), name
    assert len(read_jsonl(tmp / "run" / "metrics.jsonl")) == OPTIONS["epochs"]  # rank 0 alone writes


def test_reduced_evaluation_equals_single_process_evaluation(ddp_run):
    _, ranks = ddp_run
    model = make_model(heads=HEADS)
    model.load_state_dict(ranks[0]["model"])
    single = evaluate(model, _val_data(), toy_tasks(), device="cpu", batch_size=4, with_loss=True)
    for rank in ranks:  # the depth meter sums each batch in float32, hence rel=1e-6
        assert set(rank["evaluated"]) == set(rank["final"]) == set(single)
        for task, metrics in single.items():
            assert rank["final"][task] == pytest.approx(metrics, rel=1e-6)
            assert rank["evaluated"][task] == pytest.approx({m: metrics[m] for m in metrics if m != "loss"}, rel=1e-6)


def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(ddp_run, tmp_path):
    _, ranks = ddp_run
    model, trainer, _ = _fit(tmp_path, batch_size=2 * 2)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, ranks[0]["model"][name], rtol=1e-5, atol=1e-6), name
    assert torch.allclose(trainer.weighting.log_vars.detach(), ranks[0]["weighting"]["log_vars"], atol=1e-6)
    assert not torch.equal(model.state_dict()["backbone.0.weight"], make_model().state_dict()["backbone.0.weight"])
