"""A latency target through the iterative schedule and the run config (injected table: no timing)."""

from __future__ import annotations

import pytest
import torch

import mtprune
from mtprune.config import PruneSection
from mtprune.engine.trainer import TrainConfig
from mtprune.pruning.schedule import iterative_prune
from mtprune.tasks import preset
from test_latency import table_ms, work_table

NAMES = ["seg", "depth"]
TASKS = preset("synthetic_scenes")
X = torch.zeros(1, 3, 32, 40)


def make():
    torch.manual_seed(0)
    return mtprune.build_model("deeplab_resnet18", {n: TASKS[n].out_channels for n in NAMES}, width=0.125,
                               head="conv")


def test_iterative_schedule_reaches_latency_target_geometrically(tmp_path):
    kw = {"n_train": 4, "n_val": 2, "height": 32, "width": 40}
    train = mtprune.data.load("synthetic_scenes", root=tmp_path / "d", split="train", tasks=NAMES, **kw)
    val = mtprune.data.load("synthetic_scenes", root=tmp_path / "d", split="val", tasks=NAMES, **kw)
    table = work_table("pointwise", 4.0)
    dense = table_ms(make(), table)
    ft = TrainConfig(epochs=0, batch_size=2, quiet=True, tensorboard=False, device="cpu")
    model, records = iterative_prune(make(), X, {n: TASKS[n] for n in NAMES}, train, val, tmp_path / "run",
                                     criterion="l1", target_latency=0.5, steps=2, finetune=ft, stats_batches=1,
                                     stats_batch_size=2, latency={"table": table})
    assert records[0].extra["latency_ms"] == pytest.approx(dense)
    assert [r.step for r in records] == [0, 1, 2]
    # each step's model, costed afresh by the table: sqrt(0.5) after step 1, 0.5 after step 2 (reached from above)
    step1 = mtprune.load(tmp_path / "run" / "steps" / "1" / "model.mtp", base=make())
    assert 0.5 ** 0.5 - 0.02 <= table_ms(step1, table) / dense <= 0.5 ** 0.5 + 1e-9
    assert 0.48 <= table_ms(model, table) / dense <= 0.5 + 1e-9


def test_run_config_takes_a_latency_target():
    p = PruneSection(target_latency=0.5, latency={"device": "cpu", "threads": 2}, round_to={"depthwise": 16})
    assert p.target_latency == 0.5 and p.latency["threads"] == 2 and p.round_to == {"depthwise": 16}
    assert PruneSection(target_latency_ms=12.0, round_to="auto").target_latency_ms == 12.0
    with pytest.raises(ValueError, match="exactly one"):
        PruneSection(target_latency=0.5, target_macs=0.5)
    with pytest.raises(ValueError, match="interleaved"):
        PruneSection(target_latency=0.5, schedule="interleaved")
